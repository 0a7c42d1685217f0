"""The contract between an engine and the kernels of the row-major packed backends (triton, cuda, cpp);
the plane family (triton_plane, cuda_plane) shares its segments and address tables and has its own
layout (:mod:`twa_kernels.backends.plane_layout`).

**Segments.** The vectors an engine works on — the gradients it projects, the weights it updates —
are not one flat buffer but the parameters' own tensors: a list of *segments*, the consecutive pieces
of each layer's rows (one per parameter tensor with ``layers="param"``; several per layer with
``layers="model"``; this rank's piece of each layer when row-sharded). Kernels find a segment by its
address in a small int64 table, so the user's parameters stay the user's tensors: a model that moved,
was cast or had its ``.data`` replaced only changes the addresses, never what is trained. A single
flat tensor is accepted too (its segments are computed from its one address, no views are made).

**Tables.** :class:`KernelTables` is the launch geometry every backend reads, by field name (the C++
modules read the same names): the packed words, each layer's first word, the segments, and the
*programs* — runs of at most ``rows_per_program`` rows of one segment, so no program straddles two
segments or two layers. A program finds everything from three table loads, and per-layer reductions
read the partials of ``[layer_prog[l], layer_prog[l + 1])`` in a fixed order: the same inputs give
the same bits every run, with no float atomics.

**Where the affine fold c = scale·t + zero·Σg happens, per family** (the one place this is said):

* row-major family (triton, cuda, cpp): here, in :class:`PackedEngine`, once for those backends. Kernels
  see codes only: project returns ``t = qᵀg`` and ``Σg`` per layer and the engine forms
  ``c = scale·t + zero·Σg``; expand takes ``u = scale∘Δβ`` and ``s = Σ_j zero_j Δβ_j`` per layer and
  adds ``q·u + s`` to every row;
* plane family (triton_plane, cuda_plane): inside its reduce launch, which sums the programs' partial
  rows of ``qᵀg`` in a fixed order and folds in the same launch; expand takes the same ``u`` and ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..packing import LayerLayout, PackedProjection, cumsum_from_zero

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Segments:
    """How the rows of every layer are cut into tensors: segment ``i`` holds ``sizes[i]`` elements,
    rows ``[row[i], row[i] + sizes[i])`` of layer ``layer[i]``. Segments come in layer order."""

    sizes: tuple[int, ...]
    layer: tuple[int, ...]
    row: tuple[int, ...]

    @classmethod
    def per_layer(cls, layout: LayerLayout) -> "Segments":
        """One segment per layer (a flat vector of all layers, cut at the layer boundaries)."""
        L = layout.num_layers
        return cls(tuple(layout.sizes), tuple(range(L)), (0,) * L)

    @classmethod
    def cut(cls, layout: LayerLayout, sizes: Sequence[int]) -> "Segments":
        """Segments of the given sizes laid one after another over the layers; each must fit inside one
        layer, and together they must cover every layer exactly. Layers of no rows take no segment."""
        sizes = tuple(int(s) for s in sizes)
        if any(s <= 0 for s in sizes):
            raise ValueError("every segment needs at least one element")
        layers, rows = [], []
        it = iter(sizes)
        for l, size in enumerate(layout.sizes):
            filled = 0
            while filled < size:
                s = next(it, None)
                if s is None:
                    raise ValueError(f"the segments cover {sum(sizes)} elements, the layers {layout.numel}")
                if filled + s > size:
                    raise ValueError(f"a segment of {s} elements would straddle layers {l} and {l + 1}")
                layers.append(l)
                rows.append(filled)
                filled += s
        if len(layers) != len(sizes):
            raise ValueError(f"the segments cover {sum(sizes)} elements, the layers {layout.numel}")
        return cls(sizes, tuple(layers), tuple(rows))

    @property
    def count(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)


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


class AddressTable:
    """int64 addresses of the segments of one role (gradients, weights, compensation) on the engine's
    device. The table is rebuilt (O(S) host work and one small copy) only when an address changed, so
    a step whose tensors stay put issues no work for it — which also keeps it out of a captured CUDA
    graph — and a model that moved is followed at the next call."""

    def __init__(self, segments: Segments, device: torch.device, role: str):
        self.segments, self.device, self.role = segments, device, role
        self._offsets = cumsum_from_zero(segments.sizes)[:-1]
        self._key = None
        self._table = None
        self._host = None

    def __call__(self, x) -> tuple[torch.Tensor, torch.dtype]:
        """(addresses [S], dtype) of ``x``: a flat tensor of every segment, or a list of segment tensors."""
        if isinstance(x, torch.Tensor):
            key = (x.dtype, x.data_ptr(), x.numel(), x.device)
            if key != self._key:
                self._check_flat(x)
                table = x.data_ptr() + self._offsets * x.element_size()
                self._store(key, table)
            return self._table, x.dtype
        if len(x) != self.segments.count:
            raise ValueError(f"{self.role}: expected {self.segments.count} segment tensors, got {len(x)}")
        first = x[0]
        key = (first.dtype, *(t.data_ptr() for t in x))
        if key != self._key:
            self._check_list(x)
            self._store(key, torch.tensor([t.data_ptr() for t in x], dtype=torch.int64))
        return self._table, first.dtype

    def _store(self, key, table: torch.Tensor) -> None:
        if self.device.type == "cuda":
            # The pinned source is kept with the table: a copy made while a CUDA graph is captured
            # reads it again at every replay.
            self._host = table.pin_memory()
            table = self._host.to(self.device, non_blocking=True)
        self._table, self._key = table, key

    def _check_flat(self, x: torch.Tensor) -> None:
        if x.dim() != 1 or x.numel() != self.segments.numel or not x.is_contiguous():
            raise ValueError(f"{self.role} must be a contiguous flat vector of {self.segments.numel} elements, "
                             f"got shape {tuple(x.shape)}")
        self._check_kind(x, self.role)

    def _check_list(self, x) -> None:
        dtype = x[0].dtype
        for i, (t, size) in enumerate(zip(x, self.segments.sizes)):
            what = f"{self.role} segment {i}"
            if t.numel() != size or not t.is_contiguous():
                raise ValueError(f"{what} must be a contiguous tensor of {size} elements, got shape "
                                 f"{tuple(t.shape)}{'' if t.is_contiguous() else ' (not contiguous)'}")
            if t.dtype != dtype:
                raise ValueError(f"{what} is {t.dtype}, segment 0 is {dtype}: one dtype for all")
            self._check_kind(t, what)

    def _check_kind(self, t: torch.Tensor, what: str) -> None:
        if t.device != self.device and not (t.device.type == self.device.type == "cuda" and t.device.index is None):
            raise ValueError(f"{what} is on {t.device}, the engine on {self.device}")
        if t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{what}: the kernels compute in fp32 and take fp32/bf16/fp16, not {t.dtype}; "
                             "use backend='torch' for float64")


class EngineAddresses:
    """The address tables of one engine: gradients (project), weights and their compensation (expand)."""

    def __init__(self, segments: Segments, device: torch.device):
        self._grads = AddressTable(segments, device, "gradients")
        self._weights = AddressTable(segments, device, "weights")
        self._comp = AddressTable(segments, device, "compensation")

    def grads(self, grads) -> tuple[torch.Tensor, torch.dtype]:
        return self._grads(grads)

    def weights(self, weights, compensation=None) -> tuple[torch.Tensor, torch.dtype, torch.Tensor | None]:
        """(weight addresses, their dtype, compensation addresses or None); the compensation is bf16."""
        w_addr, dtype = self._weights(weights)
        if compensation is None:
            return w_addr, dtype, None
        c_addr, c_dtype = self._comp(compensation)
        if c_dtype != torch.bfloat16:
            raise ValueError(f"the compensation buffer must be bfloat16, got {c_dtype}")
        return w_addr, dtype, c_addr


def split_segments(x, segments: Segments) -> list[torch.Tensor]:
    """``x`` (a flat tensor or a list of segment tensors) as a list of flat segment views, for the
    engines that work tensor by tensor (the torch reference, dense fp32)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != segments.numel:
            raise ValueError(f"expected a flat vector of {segments.numel} elements, got {x.numel()}")
        return list(x.reshape(-1).split(list(segments.sizes)))
    if len(x) != segments.count:
        raise ValueError(f"expected {segments.count} segment tensors, got {len(x)}")
    for i, (t, size) in enumerate(zip(x, segments.sizes)):
        if t.numel() != size:
            raise ValueError(f"segment {i} must have {size} elements, got {t.numel()}")
    return [t.view(-1) if t.is_contiguous() else t.reshape(-1) for t in x]


class PackedEngine:
    """What every packed backend shares: P̃'s scales and zeros on the device, the kernel tables, the
    address tables, and the affine fold. A backend implements ``_project_codes`` and ``_expand_codes``."""

    name = "packed"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None,
                 rows_per_program: int):
        lay = projection.layout
        self.layout = lay
        self.device = torch.device(device)
        self.segments = segments if segments is not None else Segments.per_layer(lay)
        self.tables = KernelTables.build(projection, self.segments, rows_per_program, self.device)
        self.scale = projection.scale.to(self.device).contiguous()
        self.zero = projection.zero.to(self.device).contiguous()
        self.addresses = EngineAddresses(self.segments, self.device)

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
