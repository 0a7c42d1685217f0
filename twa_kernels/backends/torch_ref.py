"""The plain torch reference: dequantize a bounded chunk of rows, then matmul.

Everything else is tested against this. It never holds more than ``chunk_codes`` dequantized floats
at a time, whatever D is, and accumulates in float32 (float64 when the model is float64, which lets
tests compare against the equations at fp64 precision). It takes the same vectors as the kernel
engines: a flat vector of every layer, or the list of segment tensors (:mod:`.contract`).
"""

from __future__ import annotations

import torch

from ..packing import PackedProjection
from .contract import Segments, split_segments
from .numerics import accumulation_dtype, apply_update


class TorchEngine:
    name = "torch"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None,
                 chunk_codes: int = 1 << 21):
        self.proj = projection.to(device)
        self.layout = projection.layout
        self.segments = segments if segments is not None else Segments.per_layer(self.layout)
        self.chunk_rows = max(1, chunk_codes // self.layout.n)

    def _chunks(self):
        """(segment, layer, first row inside the layer, first row inside the segment, rows)."""
        seg = self.segments
        for i, (size, layer, row) in enumerate(zip(seg.sizes, seg.layer, seg.row)):
            for r0 in range(0, size, self.chunk_rows):
                yield i, layer, row + r0, r0, min(self.chunk_rows, size - r0)

    def project(self, grads) -> torch.Tensor:
        parts = split_segments(grads, self.segments)
        acc = accumulation_dtype(parts[0].dtype)
        out = torch.zeros(self.layout.num_layers, self.layout.n, dtype=acc, device=self.proj.device)
        for i, layer, a, r0, rows in self._chunks():
            p = self.proj.dequantize(layer, a, a + rows, acc)
            out[layer] += p.T @ parts[i][r0:r0 + rows].to(acc)
        return out

    def expand(self, weights, delta: torch.Tensor, compensation=None) -> None:
        parts = split_segments(weights, self.segments)
        comps = None if compensation is None else split_segments(compensation, self.segments)
        acc = accumulation_dtype(parts[0].dtype)
        delta = delta.to(acc)
        for i, layer, a, r0, rows in self._chunks():
            p = self.proj.dequantize(layer, a, a + rows, acc)
            sl = slice(r0, r0 + rows)
            apply_update(parts[i][sl], p @ delta[layer], None if comps is None else comps[i][sl])
