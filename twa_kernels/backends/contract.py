"""The engine contract: the protocol every backend implements (:class:`Engine`) and what all of them
share — the segments the vectors are cut into, the address tables that find them, and (for the kernel
families) P̃'s scales and zeros on the device (:class:`KernelEngine`). Two kernel families build on it,
each in its own folder with its Triton, CUDA and C++ glue (and ``csrc/`` mirrors them):

* :mod:`.rows` — the row-major packed layout P̃ is saved in (``triton``, ``cuda``, ``cpp``);
* :mod:`.plane` — the plane device layout, permuted once when P̃ goes to a GPU (``triton_plane``,
  ``cuda_plane``).

The torch reference (:mod:`.torch_ref`) and the dense fp32 engine (:mod:`.dense`) implement the
protocol directly.

**Segments.** The vectors an engine works on — the gradients it projects, the weights it updates —
are not one flat buffer but the parameters' own tensors: a list of *segments*, the consecutive pieces
of each layer's rows (one per parameter tensor with ``layers="param"``; several per layer with
``layers="model"``; this rank's piece of each layer when row-sharded). Kernels find a segment by its
address in a small int64 table, so the user's parameters stay the user's tensors: a model that moved,
was cast or had its ``.data`` replaced only changes the addresses, never what is trained. A single
flat tensor is accepted too (its segments are computed from its one address, no views are made).

**Launch tables.** Each family builds its own from the segments (:class:`.rows.engine.KernelTables`,
:class:`.plane.layout.PlaneTables`): runs of rows of one segment per program, so no program straddles
two segments or two layers, and per-layer reductions read the programs' partials in a fixed order: the
same inputs give the same bits every run, with no float atomics.

**Where the affine fold c = scale·t + zero·Σg happens, per family** (the one place this is said):

* rows family (triton, cuda, cpp): in :class:`.rows.engine.RowsEngine`, once for those backends.
  Kernels see codes only: project returns ``t = qᵀg`` and ``Σg`` per layer and the engine forms
  ``c = scale·t + zero·Σg``; expand takes ``u = scale∘Δβ`` and ``s = Σ_j zero_j Δβ_j`` per layer and
  adds ``q·u + s`` to every row;
* plane family (triton_plane, cuda_plane): inside its reduce launch, which sums the programs' partial
  rows of ``qᵀg`` in a fixed order and folds in the same launch; expand forms ``u`` and ``s`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Engine(Protocol):
    """What :func:`~twa_kernels.backends.make_engine` returns, whatever the backend. ``grads`` and
    ``weights`` are a flat vector of every layer or the list of segment tensors. ``name`` is the backend's
    name in the registry (``"dense"`` for an fp32 P)."""

    name: str
    layout: LayerLayout
    segments: Segments

    def project(self, grads) -> torch.Tensor:
        """c = P̃ᵀg, ``[L, n]``: float32 (float64 for float64 gradients, on the engines that take them)."""

    def expand(self, weights, delta: torch.Tensor, compensation=None) -> None:
        """weights += P̃Δβ in place; with ``compensation`` (bf16, like ``weights``), Kahan-compensated."""


class KernelEngine:
    """What the engines of both kernel families share: the layout, the device, the segments, P̃'s
    scales and zeros on the device (the affine fold's operands) and the address tables."""

    name = "kernel"

    def __init__(self, projection: PackedProjection, device, segments: Segments | None):
        self.layout = projection.layout
        self.device = torch.device(device)
        self.segments = segments if segments is not None else Segments.per_layer(self.layout)
        self.scale = projection.scale.to(self.device, torch.float32).contiguous()
        self.zero = projection.zero.to(self.device, torch.float32).contiguous()
        self.addresses = EngineAddresses(self.segments, self.device)
