"""fp32 P (``bits=None``): the paper's "TWA w/o quantization", one torch matmul per layer."""

from __future__ import annotations

import torch

from ..packing import PackedProjection
from .numerics import accumulation_dtype, apply_update


class DenseEngine:
    name = "dense"

    def __init__(self, projection: PackedProjection, device: torch.device):
        self.layout = projection.layout
        self.rows = projection.dense_rows.to(device)
        offs = self.layout.param_offsets.tolist()
        self.slices = [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(grad.dtype)
        g = grad.to(acc)
        rows = self.rows.to(acc)
        return torch.stack([rows[s].T @ g[s] for s in self.slices])

    def expand(self, weights, delta, compensation=None) -> None:
        acc = accumulation_dtype(weights.dtype)
        rows = self.rows.to(acc)
        delta = delta.to(acc)
        for l, s in enumerate(self.slices):
            apply_update(weights[s], rows[s] @ delta[l], None if compensation is None else compensation[s])
