"""The plain torch reference: dequantize a bounded chunk of rows, then matmul.

Everything else is tested against this. It never holds more than ``chunk_codes`` dequantized floats
at a time, whatever D is, and accumulates in float32 (float64 when the model is float64, which lets
tests compare against the equations at fp64 precision).
"""

from __future__ import annotations

import torch

from ..packing import PackedProjection
from .numerics import accumulation_dtype, apply_update


class TorchEngine:
    name = "torch"

    def __init__(self, projection: PackedProjection, device: torch.device, chunk_codes: int = 1 << 21):
        self.proj = projection.to(device)
        self.layout = projection.layout
        self.offsets = self.layout.param_offsets.tolist()
        self.chunk_rows = max(1, chunk_codes // self.layout.n)

    def _chunks(self):
        for l, size in enumerate(self.layout.sizes):
            base = self.offsets[l]
            for r0 in range(0, size, self.chunk_rows):
                yield l, base, r0, min(size, r0 + self.chunk_rows)

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(grad.dtype)
        out = torch.zeros(self.layout.num_layers, self.layout.n, dtype=acc, device=grad.device)
        for l, base, r0, r1 in self._chunks():
            p = self.proj.dequantize(l, r0, r1, acc)
            out[l] += p.T @ grad[base + r0 : base + r1].to(acc)
        return out

    def expand(self, weights: torch.Tensor, delta: torch.Tensor,
               compensation: torch.Tensor | None = None) -> None:
        acc = accumulation_dtype(weights.dtype)
        delta = delta.to(acc)
        for l, base, r0, r1 in self._chunks():
            p = self.proj.dequantize(l, r0, r1, acc)
            sl = slice(base + r0, base + r1)
            apply_update(weights[sl], p @ delta[l],
                         None if compensation is None else compensation[sl])
