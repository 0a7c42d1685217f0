"""fp32 P (``bits=None``): the paper's "TWA w/o quantization", one torch matmul per segment."""

from __future__ import annotations

import torch

from ..packing import PackedProjection
from .contract import Segments, split_segments
from .numerics import accumulation_dtype, apply_update


class DenseEngine:
    name = "dense"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None):
        self.layout = projection.layout
        self.segments = segments if segments is not None else Segments.per_layer(self.layout)
        self.rows = projection.dense_rows.to(device)
        offs = self.layout.param_offsets.tolist()
        seg = self.segments
        self.slices = [slice(offs[l] + r, offs[l] + r + size) for size, l, r in zip(seg.sizes, seg.layer, seg.row)]

    def project(self, grads) -> torch.Tensor:
        parts = split_segments(grads, self.segments)
        acc = accumulation_dtype(parts[0].dtype)
        rows = self.rows.to(acc)
        out = torch.zeros(self.layout.num_layers, self.layout.n, dtype=acc, device=rows.device)
        for part, layer, sl in zip(parts, self.segments.layer, self.slices):
            out[layer] += rows[sl].T @ part.to(acc)
        return out

    def expand(self, weights, delta, compensation=None) -> None:
        parts = split_segments(weights, self.segments)
        comps = None if compensation is None else split_segments(compensation, self.segments)
        acc = accumulation_dtype(parts[0].dtype)
        rows = self.rows.to(acc)
        delta = delta.to(acc)
        for i, (part, layer, sl) in enumerate(zip(parts, self.segments.layer, self.slices)):
            apply_update(part, rows[sl] @ delta[layer], None if comps is None else comps[i])
