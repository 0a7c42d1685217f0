"""Where a subspace and its optimizer live: one class per way of spreading TWA over ranks.

A placement owns everything that differs between the modes, so that the optimizer's ``step()`` and
the subspace builder never branch on a mode:

* which part of P̃ this rank holds (:meth:`Placement.layer_ranges`, :meth:`Placement.column_slice`) and
  which weights it updates (:meth:`Placement.owned`, the segments its engine is built for);
* how c = P̃ᵀḡ is obtained from each rank's local gradient (:meth:`Placement.project`) and how
  w += P̃Δβ is applied and made consistent across ranks (:meth:`Placement.apply`);
* how construction statistics are combined (:meth:`Placement.reduce`, :meth:`Placement.share_quantizer`);
* how its files are named and checked on load (:meth:`Placement.file_path`, :meth:`Placement.check_rank`).

One subclass per mode: ``Placement`` (one process), ``Replicate``, ``Rows``, ``Columns`` and ``Fsdp``;
what each rank holds and moves is the table of modes in README.md, "Distributed training".

A new mode is one more subclass. Gathering β across ranks is an explicit call
(:meth:`Placement.gather_beta`), never a property, so a logging call on one rank cannot hang.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
import torch.distributed as dist

from .backends.contract import Segments
from .backends.numerics import accumulation_dtype, apply_update
from .distributed import Communicator


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter), without importing torch.distributed.tensor for
    models that have none."""
    return type(t).__name__ == "DTensor" or (hasattr(t, "to_local") and hasattr(t, "device_mesh"))


@dataclass(frozen=True)
class Placement:
    """One process holds all of P̃ and every weight; nothing is communicated."""

    world_size: int = 1
    rank: int = 0
    mode: ClassVar[str | None] = None

    # ------------------------------------------------------------------ what this rank holds
    def layer_ranges(self, sizes) -> list[tuple[int, int]]:
        """This rank's element range [a, b) in each layer."""
        return [(0, size) for size in sizes]

    def column_slice(self, n: int) -> slice:
        return slice(0, n)

    def owned(self, binding) -> list[torch.Tensor]:
        """The weights this rank updates, as the segments of its engine (:meth:`segments`)."""
        return binding.weights()

    def segments(self, layout, binding) -> Segments:
        """How this rank's part of every layer (``layout``) is cut into the tensors of :meth:`owned`."""
        return Segments.cut(layout, [t.numel() for t in self.owned(binding)])

    # ------------------------------------------------------------------ construction
    def reduce(self, tensor: torch.Tensor, op: str, group) -> torch.Tensor:
        """Combine per-rank partial statistics (``op``: "sum", "min" or "max") of a build."""
        return tensor

    def share_quantizer(self, scale: torch.Tensor, zero: torch.Tensor, group) -> None:
        """Make every rank's scales and zeros of the whole subspace agree after the build."""

    def check_same(self, value, group, what: str) -> None:
        """Raise the same error on every rank when ``value()`` (computed only where there are ranks to
        compare) differs between ranks."""

    # ------------------------------------------------------------------ files and state
    def to_dict(self) -> dict | None:
        return None

    def state_tag(self) -> dict | None:
        """What an optimizer state_dict records of the placement it was saved under."""
        return None

    def file_path(self, path) -> str:
        return os.fspath(path).replace("{rank}", str(self.rank))

    def check_rank(self, path, group) -> None:
        """Refuse a file saved by another rank or at another world size."""

    def describe(self) -> str:
        return "one process"

    # ------------------------------------------------------------------ optimizer
    def communicator(self, group):
        return None

    def check_backend(self, group, device: torch.device) -> None:
        """Raise the same clear error on every rank when the group's backend cannot run this mode."""

    def check_parameters(self, binding) -> None:
        """Refuse parameters this placement cannot train (every rank alike)."""

    def project(self, engine, binding, comm) -> torch.Tensor:
        """c = P̃ᵀḡ for this rank's columns, ḡ the mean of the ranks' local gradients."""
        return engine.project(binding.grads())

    def project_weights(self, engine, binding, comm) -> torch.Tensor:
        """P̃ᵀw of the current weights, for this rank's columns (the weights are alike on every rank)."""
        return engine.project(self.owned(binding))

    def apply(self, engine, binding, delta, compensation, comm) -> None:
        """w += P̃ Δβ on every rank."""
        engine.expand(self.owned(binding), delta, compensation)

    def synchronize(self, binding, comm) -> None:
        """Make every rank's weights equal after this rank wrote its own part (:meth:`owned`)."""

    def point(self, engine, binding, center, beta, comm) -> torch.Tensor:
        """w̄ + P̃β of the weights this rank updates, in fp32, from its centre (consumed); weights untouched."""
        engine.expand(center, beta)
        return center

    def gather_beta(self, beta: torch.Tensor, n: int, group) -> torch.Tensor:
        """β of every column, [L, n], from this rank's columns (a collective where columns are split)."""
        return beta.detach().clone()


def group_or_world(process_group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("a sharded subspace needs torch.distributed to be initialised "
                           "(torch.distributed.init_process_group, or launch with torchrun)")
    return process_group if process_group is not None else dist.group.WORLD


def collective_device(process_group) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def same_on_all_ranks(value: str, process_group, what: str) -> None:
    """Compare a string across ranks; every rank raises the same error if any differs."""
    values = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(values, value, group=process_group)
    if len(set(values)) != 1:
        shown = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({shown}); every rank must be given the same "
                         "checkpoints and options")


@dataclass(frozen=True)
class _Distributed(Placement):
    """What every multi-rank placement shares: its record, file checks and communicator."""

    def to_dict(self) -> dict:
        return {"mode": self.mode, **asdict(self)}

    def state_tag(self) -> dict:
        return {"mode": self.mode, "world_size": self.world_size, "rank": self.rank}

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world_size} ({self.mode})"

    def check_rank(self, path, group) -> None:
        here = (dist.get_rank(group), dist.get_world_size(group))
        if here != (self.rank, self.world_size):
            raise ValueError(f"{path} holds rank {self.rank} of {self.world_size} ({self.mode}); "
                             f"this process is rank {here[0]} of {here[1]}")

    def check_same(self, value, group, what: str) -> None:
        same_on_all_ranks(value(), group, what)

    def communicator(self, group):
        return Communicator(group)

    # Modes whose step moves D-sized vectors, which gloo cannot do efficiently for CUDA tensors.
    moves_weights: ClassVar[bool] = False

    def check_backend(self, group, device: torch.device) -> None:
        backend = dist.get_backend(group)
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(f"shard mode {self.mode!r}: the process group uses NCCL, which cannot reduce "
                             f"{device.type} tensors; use a gloo group for CPU parameters")
        if self.moves_weights and backend == "gloo" and device.type == "cuda":
            raise ValueError(f"shard mode {self.mode!r}: gloo cannot reduce-scatter / all-gather CUDA tensors "
                             "efficiently; use an NCCL group for CUDA parameters")


class StagedCommunicator(Communicator):
    """The communicator of a placement whose collectives take flat vectors (``rows``, ``columns``), with
    the buffers they read and write, kept between steps: a buffer follows the parameters when they move
    or change dtype (it is made anew), and its tail past the parameters stays 0."""

    def __init__(self, process_group):
        super().__init__(process_group)
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, role: str, numel: int, binding, dtype=None) -> torch.Tensor:
        dtype = dtype or binding.dtype
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != binding.device:
            buf = self._buffers[role] = torch.zeros(numel, dtype=dtype, device=binding.device)
        return buf


def gather_grads(binding, out: torch.Tensor) -> torch.Tensor:
    """Every gradient, flattened in layer order, into ``out[:numel]``."""
    torch.cat([g.reshape(-1) for g in binding.grads()], out=out[: binding.numel])
    return out


def scatter_weights(binding, flat: torch.Tensor) -> None:
    """Copy ``flat[:numel]`` into the parameters."""
    torch._foreach_copy_([p.view(-1) for p in binding.params], list(flat[: binding.numel].split(binding.sizes)))


def pieces(binding, start: int, stop: int) -> list[torch.Tensor]:
    """Flat views of the parameters' elements [start, stop) of the layer-order vector, one per parameter
    it touches."""
    out, offset = [], 0
    for p, size in zip(binding.params, binding.sizes):
        a, b = max(start - offset, 0), min(stop - offset, size)
        if a < b:
            out.append(p.view(-1)[a:b])
        offset += size
    return out


def _staged_communicator(self, group):
    return StagedCommunicator(group)


def _project_weights_over_ranks(self, engine, binding, comm) -> torch.Tensor:
    """P̃ᵀw where each rank holds part of the rows: the ranks' partial sums add up."""
    c = engine.project(self.owned(binding))
    comm.all_reduce(c)
    return c


def _reduce_over_ranks(self, tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """Construction statistics of ranks that each hold part of the rows, combined."""
    t = tensor.to(collective_device(group))
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                    group=group)
    return t.cpu()


@dataclass(frozen=True)
class Replicate(_Distributed):
    """Every rank holds all of P̃; P̃ᵀ is linear, so the ranks average n·L projections, not D gradients."""

    mode: ClassVar[str] = "replicate"

    def state_tag(self) -> dict:
        # β, its buffers and the Kahan residue are the same on every rank: a state resumes at any world size
        return {"mode": self.mode}

    def project(self, engine, binding, comm) -> torch.Tensor:
        c = engine.project(binding.grads())
        comm.all_reduce_mean(c)
        return c


@dataclass(frozen=True)
class Rows(_Distributed):
    """Rank r holds every column of P̃ for rows [row_start, row_stop) of the flat parameter vector."""

    row_start: int = 0
    row_stop: int = 0
    padded: int = 0  # k · ⌈D / k⌉: reduce-scatter and all-gather need k equal pieces
    mode: ClassVar[str] = "rows"
    moves_weights: ClassVar[bool] = True

    def layer_ranges(self, sizes) -> list[tuple[int, int]]:
        out, start = [], 0
        for size in sizes:
            a = min(max(self.row_start - start, 0), size)
            b = min(max(self.row_stop - start, 0), size)
            out.append((a, max(a, b)))
            start += size
        return out

    def owned(self, binding) -> list[torch.Tensor]:
        return pieces(binding, self.row_start, self.row_stop)

    reduce = _reduce_over_ranks
    project_weights = _project_weights_over_ranks
    communicator = _staged_communicator

    def project(self, engine, binding, comm) -> torch.Tensor:
        # reduce-scatter needs the gradients as one vector of k equal pieces
        flat = gather_grads(binding, comm.buffer("grad", self.padded, binding))
        mine = comm.buffer("grad_mine", self.padded // self.world_size, binding)
        comm.reduce_scatter_mean(mine, flat)
        c = engine.project(mine[: self.row_stop - self.row_start])
        comm.all_reduce(c)
        return c

    def apply(self, engine, binding, delta, compensation, comm) -> None:
        engine.expand(self.owned(binding), delta, compensation)
        self.synchronize(binding, comm)

    def synchronize(self, binding, comm) -> None:
        mine = comm.buffer("weights_mine", self.padded // self.world_size, binding)
        owned = self.owned(binding)
        if owned:
            torch.cat([t.reshape(-1) for t in owned], out=mine[: self.row_stop - self.row_start])
        flat = comm.buffer("weights", self.padded, binding)
        comm.all_gather(flat, mine)
        scatter_weights(binding, flat)


@dataclass(frozen=True)
class Columns(_Distributed):
    """Rank r holds columns [col_start, col_stop) of every P̃^l: the paper's scheme (Fig. 1, Eq. 13)."""

    col_start: int = 0
    col_stop: int = 0
    mode: ClassVar[str] = "columns"
    moves_weights: ClassVar[bool] = True

    communicator = _staged_communicator

    def column_slice(self, n: int) -> slice:
        return slice(self.col_start, self.col_stop)

    def share_quantizer(self, scale: torch.Tensor, zero: torch.Tensor, group) -> None:
        # Each rank rescaled its own columns (column_norm); share them so all agree.
        cols = self.column_slice(scale.shape[1])
        for t in (scale, zero):
            mine = torch.zeros_like(t)
            mine[:, cols] = t[:, cols]
            mine = mine.to(collective_device(group))
            dist.all_reduce(mine, group=group)
            t.copy_(mine.cpu())

    def project(self, engine, binding, comm) -> torch.Tensor:
        grad = gather_grads(binding, comm.buffer("grad", binding.numel, binding))
        comm.all_reduce_mean(grad)
        return engine.project(grad)

    def apply(self, engine, binding, delta, compensation, comm) -> None:
        # Σ_r P̃_r Δβ_r is summed over ranks at the precision the update is computed in.
        update = comm.buffer("update", binding.numel, binding, accumulation_dtype(binding.dtype))
        update.zero_()
        engine.expand(update, delta)
        comm.all_reduce(update)
        comps = [None] * len(binding.sizes) if compensation is None else compensation.split(binding.sizes)
        for w, dw, comp in zip(binding.weights(), update.split(binding.sizes), comps):
            apply_update(w.view(-1), dw, comp)

    def point(self, engine, binding, center, beta, comm) -> torch.Tensor:
        update = torch.zeros_like(center)
        engine.expand(update, beta)
        comm.all_reduce(update)
        return center.add_(update)

    def gather_beta(self, beta: torch.Tensor, n: int, group) -> torch.Tensor:
        per = -(-n // self.world_size)
        mine = torch.zeros(beta.shape[0], per, dtype=beta.dtype, device=beta.device)
        mine[:, : beta.shape[1]] = beta
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=group)
        full = torch.cat(parts, dim=1)
        return torch.cat([full[:, r * per: r * per + min(per, n - r * per)] for r in range(self.world_size)], dim=1)


@dataclass(frozen=True)
class Fsdp(_Distributed):
    """FSDP2 (``fully_shard``): rank r holds every column of P̃ for the rows of its own local shards
    (dim 0, uneven splits, and no row at all of a layer smaller than the world). FSDP reduce-scatters
    the gradients and all-gathers the weights itself, so the step adds one all-reduce of n·L numbers.
    β is the same on every rank; a state resumes on any ranks of the same world size."""

    ranges: tuple[tuple[int, int], ...] = ()  # per layer: this rank's element range [a, b)
    mode: ClassVar[str] = "fsdp"

    reduce = _reduce_over_ranks
    project_weights = _project_weights_over_ranks

    def layer_ranges(self, sizes) -> list[tuple[int, int]]:
        return [tuple(r) for r in self.ranges]

    def owned(self, binding) -> list[torch.Tensor]:
        return [t.view(-1) for t in binding.weights() if t.numel()]

    def project(self, engine, binding, comm) -> torch.Tensor:
        # FSDP's reduce-scatter already averaged the gradients: the ranks' partial P̃ᵀg add up to c.
        c = engine.project([g.view(-1) for g in binding.grads() if g.numel()])
        comm.all_reduce(c)
        return c

    def state_tag(self) -> dict:
        # Each world size builds the subspace from other per-rank partial sums (its norms differ in the last
        # bits), so a state resumes at the world size it was saved at.
        return {"mode": self.mode, "world_size": self.world_size}

    def check_parameters(self, binding) -> None:
        if binding.dtype in (torch.bfloat16, torch.float16):
            raise ValueError(f"under FSDP2 TWA keeps the sharded parameters in float32 (they are {binding.dtype}): "
                             "compute in bf16 with fully_shard(..., mp_policy=MixedPrecisionPolicy("
                             "param_dtype=torch.bfloat16)) instead")

    def check_rank(self, path, group) -> None:
        here = (dist.get_rank(group), dist.get_world_size(group))
        if here != (self.rank, self.world_size):
            raise ValueError(f"{path} holds the FSDP2 shards of rank {self.rank} of {self.world_size}; this process "
                             f"is rank {here[0]} of {here[1]}: build the subspace again for this sharding")


def fsdp_placement(params, layers: str) -> tuple[Fsdp, object]:
    """(the placement, the process group) of a model whose parameters are FSDP2 DTensors: this rank's
    element range of every parameter, from its local shard."""
    from torch.distributed.tensor import DTensor, Shard

    if not all(isinstance(p, DTensor) for p in params):
        raise ValueError("a model sharded with FSDP2 must have every trainable parameter sharded (fully_shard the "
                         "root module too)")
    mesh = params[0].device_mesh
    if any(p.device_mesh != mesh for p in params):  # fully_shard per block makes equal meshes, not one object
        raise ValueError("the model's parameters are sharded on different device meshes: shard them on one")
    if layers != "param":
        raise ValueError("under FSDP2 each rank holds pieces of every parameter: use layers='param'")
    if mesh.ndim != 1:
        raise ValueError(f"FSDP2 on a {mesh.ndim}-D device mesh (HSDP) is not supported: shard on a 1-D mesh")
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    ranges = []
    for p in params:
        if tuple(p.placements) != (Shard(0),):
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is placed {p.placements}; TWA under FSDP2 "
                             "needs dim-0 sharding (FSDP2's default)")
        rows = p.shape[0] if p.dim() else 1
        inner = p.numel() // max(rows, 1)
        chunk = -(-rows // world)  # torch.chunk's split, which FSDP2 uses
        start = min(rows, rank * chunk)
        local = p.to_local().numel()
        if local != (min(rows, start + chunk) - start) * inner:
            raise ValueError(f"a local shard of {local} elements does not match dim-0 chunking of {tuple(p.shape)}")
        ranges.append((start * inner, start * inner + local))
    return Fsdp(world, rank, ranges=tuple(ranges)), group


MODES = {cls.mode: cls for cls in (Replicate, Rows, Columns, Fsdp)}
SHARD_MODES = ("replicate", "rows", "columns")  # what shard= takes; FSDP2 is found from the model


def plan(mode: str | None, numel: int, n: int, world_size: int = 1, rank: int = 0) -> Placement:
    """The placement of rank ``rank`` of ``world_size`` for a subspace of ``numel`` weights and n columns."""
    if mode is None:
        return Placement()
    if mode not in SHARD_MODES:
        raise ValueError(f"unknown shard mode {mode!r}: choose one of {', '.join(SHARD_MODES)} (a model sharded "
                         "with FSDP2 needs none: its sharding is read from its parameters)")
    if mode == "rows":
        chunk = math.ceil(numel / world_size)
        lo = min(numel, rank * chunk)
        return Rows(world_size, rank, row_start=lo, row_stop=min(numel, lo + chunk), padded=chunk * world_size)
    if mode == "columns":
        if n < world_size:
            raise ValueError(f"shard='columns' needs at least one column per rank: n = {n} < "
                             f"{world_size} ranks (use 'rows' or 'replicate')")
        per = math.ceil(n / world_size)
        lo = min(n, rank * per)
        return Columns(world_size, rank, col_start=lo, col_stop=min(n, lo + per))
    return Replicate(world_size, rank)


def from_dict(record: dict | None) -> Placement:
    """The placement a subspace file recorded (:meth:`Placement.to_dict`)."""
    if record is None:
        return Placement()
    record = dict(record)
    mode = record.pop("mode")
    if mode not in MODES:
        raise ValueError(f"unknown shard mode {mode!r} in a subspace file")
    cls = MODES[mode]
    if "padded_numel" in record:  # files written before placements had their own classes
        record["padded"] = record.pop("padded_numel")
    names = {f.name for f in fields(cls)}
    if "ranges" in record:
        record["ranges"] = tuple(tuple(r) for r in record["ranges"])
    return cls(**{k: v for k, v in record.items() if k in names})
