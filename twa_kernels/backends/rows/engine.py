"""What the rows backends (``triton``, ``cuda``, ``cpp``) share: the launch tables over P̃'s
row-major packed codes (:mod:`twa_kernels.packing`), the format it is saved in, and the affine fold
(:mod:`..contract` says where each family folds).

:class:`KernelTables` is the launch geometry every rows kernel reads, by field name (the C++ modules
read the same names, ``csrc/twa_tables.h``; the AOT compile too): the packed words, each layer's first
word, the segments, and the *programs* — runs of at most ``rows_per_program`` rows of one segment. A
program finds everything from three table loads, and per-layer reductions read the partials of
``[layer_prog[l], layer_prog[l + 1])`` in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...packing import PackedProjection, cumsum_from_zero
from ..contract import KernelEngine, Segments


@dataclass(frozen=True)
class KernelTables:
    """The launch geometry of one engine (built once). Index tables are int64 on the engine's device."""

    words: torch.Tensor  # int32 [W]: the packed codes (twa_kernels/packing.py)
    word_off: torch.Tensor  # [L]: first word of each layer
    seg_layer: torch.Tensor  # [S]: the layer of each segment
    seg_row: torch.Tensor  # [S]: the segment's first row inside its layer
    seg_size: torch.Tensor  # [S]: its rows
    prog_seg: torch.Tensor  # [P]: the segment a program works on
    prog_row: torch.Tensor  # [P]: the program's first row inside that segment
    layer_prog: torch.Tensor  # [L + 1]: programs of layer l are [layer_prog[l], layer_prog[l + 1])
    rows_per_program: int
    n: int
    bits: int

    @classmethod
    def build(cls, projection: PackedProjection, segments: Segments, rows_per_program: int,
              device) -> "KernelTables":
        lay = projection.layout
        long = dict(dtype=torch.int64)
        sizes = torch.tensor(segments.sizes, **long)
        counts = (sizes + rows_per_program - 1) // rows_per_program
        prog_seg = torch.repeat_interleave(torch.arange(segments.count, **long), counts)
        seg_first = cumsum_from_zero(counts.tolist())
        prog_row = (torch.arange(int(seg_first[-1]), **long) - seg_first[prog_seg]) * rows_per_program
        per_layer = torch.zeros(lay.num_layers, **long)
        per_layer.index_add_(0, torch.tensor(segments.layer, **long), counts)
        layer_prog = cumsum_from_zero(per_layer.tolist())
        to = lambda t: t.to(device)  # noqa: E731
        return cls(words=to(projection.words), word_off=to(lay.word_offsets[:-1]),
                   seg_layer=to(torch.tensor(segments.layer, **long)), seg_row=to(torch.tensor(segments.row, **long)),
                   seg_size=to(sizes), prog_seg=to(prog_seg), prog_row=to(prog_row), layer_prog=to(layer_prog),
                   rows_per_program=int(rows_per_program), n=lay.n, bits=lay.bits)

    @property
    def num_programs(self) -> int:
        return self.prog_seg.numel()

    @property
    def num_layers(self) -> int:
        return self.word_off.numel()

    @property
    def num_segments(self) -> int:
        return self.seg_size.numel()


class RowsEngine(KernelEngine):
    """What the rows backends share: the kernel tables and the affine fold (the kernels see codes
    only). A backend implements ``_project_codes`` and ``_expand_codes``."""

    name = "rows"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None,
                 rows_per_program: int):
        super().__init__(projection, device, segments)
        self.tables = KernelTables.build(projection, self.segments, rows_per_program, self.device)

    def project(self, grads) -> torch.Tensor:
        """c = P̃ᵀg, ``[L, n]`` float32, for a flat gradient vector or a list of segment tensors."""
        addresses, dtype = self.addresses.grads(grads)
        t, gsum = self._project_codes(addresses, dtype)
        return self.scale * t + self.zero * gsum[:, None]

    def expand(self, weights, delta: torch.Tensor, compensation=None) -> None:
        """weights += P̃Δβ in place; with ``compensation`` (bf16, like ``weights``), Kahan-compensated."""
        w_addr, dtype, c_addr = self.addresses.weights(weights, compensation)
        delta = delta.to(self.device, torch.float32)
        u = (self.scale * delta).contiguous()
        s = (self.zero * delta).sum(dim=1).contiguous()
        self._expand_codes(w_addr, dtype, c_addr, u, s)

    def _project_codes(self, addresses: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _expand_codes(self, addresses, dtype, comp_addresses, u, s) -> None:
        raise NotImplementedError  # pragma: no cover - abstract
