"""Distributed TWA over torch.distributed (NCCL for CUDA tensors, gloo for CPU tensors).

Three ways to spread the work over k ranks (docs/DESIGN.md, section 3), chosen when the subspace is built
(``Subspace.from_checkpoints(..., shard=mode, process_group=pg)``); the optimizers follow the subspace:

=============  ==========================================  ===============================================
mode           what rank r holds                           communication per step
=============  ==========================================  ===============================================
``replicate``  all of P̃                                    all-reduce of c (n·L numbers); no gradient
                                                           all-reduce at all
``rows``       every column of P̃ for its 1/k of the rows   reduce-scatter of g (D) + all-reduce of c
                                                           (n·L) + all-gather of w (D): one plain
                                                           all-reduce's volume, P̃'s memory divided by k
``columns``    ⌈n/k⌉ columns of every P̃^l (the paper)     all-reduce of g (D) + all-reduce of the
                                                           projected update (D)
=============  ==========================================  ===============================================

One contract for all modes: ``step()`` receives each rank's *local* gradient (the mean over its own
batch) and does all the communication itself, averaging over ranks. A DDP-wrapped model therefore
needs DDP's gradient all-reduce switched off: :func:`skip_gradient_allreduce` (DDP still broadcasts
buffers). Every collective goes through :class:`Communicator`, which counts the bytes it moves.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

SHARD_MODES = ("replicate", "rows", "columns")
# torch >= 2.13 names them *_single; older releases only have the *_tensor spelling.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Shard:
    """Which part of the subspace this rank holds."""

    mode: str
    world_size: int
    rank: int
    row_start: int = 0  # rows: this rank's range of the flat parameter vector
    row_stop: int = 0
    padded_numel: int = 0  # rows: k · ⌈D / k⌉, the length reduce-scatter and all-gather need
    col_start: int = 0  # columns: this rank's columns
    col_stop: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def plan(cls, mode: str, numel: int, n: int, world_size: int, rank: int) -> "Shard":
        if mode not in SHARD_MODES:
            raise ValueError(f"unknown shard mode {mode!r}: choose one of {', '.join(SHARD_MODES)}")
        if mode == "rows":
            chunk = math.ceil(numel / world_size)
            lo = min(numel, rank * chunk)
            return cls(mode, world_size, rank, lo, min(numel, lo + chunk), chunk * world_size)
        if mode == "columns":
            if n < world_size:
                raise ValueError(f"shard='columns' needs at least one column per rank: n = {n} < "
                                 f"{world_size} ranks (use 'rows' or 'replicate')")
            per = math.ceil(n / world_size)
            lo = min(n, rank * per)
            return cls(mode, world_size, rank, col_start=lo, col_stop=min(n, lo + per))
        return cls(mode, world_size, rank)


def local_ranges(sizes, shard: "Shard | None") -> list[tuple[int, int]]:
    """This rank's element range [a, b) in each layer: all of it unless row-sharded."""
    out, start = [], 0
    for size in sizes:
        if shard is not None and shard.mode == "rows":
            a = min(max(shard.row_start - start, 0), size)
            b = min(max(shard.row_stop - start, 0), size)
            out.append((a, max(a, b)))
        else:
            out.append((0, size))
        start += size
    return out


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


def check_backend_runs(process_group, device: torch.device, mode: str) -> None:
    """Raise the same clear error on every rank when the group's backend cannot run this mode."""
    backend = dist.get_backend(process_group)
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"shard mode {mode!r}: the process group uses NCCL, which cannot reduce "
                         f"{device.type} tensors; use a gloo group for CPU parameters")
    if backend == "gloo" and device.type == "cuda" and mode in ("rows", "columns"):
        raise ValueError(f"shard mode {mode!r}: gloo cannot reduce-scatter / all-gather CUDA tensors "
                         "efficiently; use an NCCL group for CUDA parameters")


def same_on_all_ranks(value: str, process_group, what: str) -> None:
    """Compare a string across ranks; every rank raises the same error if any differs."""
    values = [None] * dist.get_world_size(process_group)
    dist.all_gather_object(values, value, group=process_group)
    if len(set(values)) != 1:
        shown = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise ValueError(f"ranks disagree on {what} ({shown}); every rank must be given the same "
                         "checkpoints and options")


def probe_checkpoints(ckpts, names, shapes) -> str:
    """A cheap content hash of a checkpoint set: the first and last row of every tensor of every
    checkpoint. Ranks given different checkpoints differ here before any work is done."""
    h = hashlib.sha256()
    for nm, shape in zip(names, shapes):
        rows = shape[0] if shape else 1
        for r0 in sorted({0, rows - 1}):
            h.update(ckpts.rows(nm, r0, r0 + 1).numpy().tobytes())
    return h.hexdigest()


class Communicator:
    """The collectives TWA uses, each counting the bytes of the tensor it is given (the payload of
    one rank). Ring algorithms put about 2(k − 1)/k of that on each rank's link for an all-reduce and
    (k − 1)/k for a reduce-scatter or an all-gather."""

    WIRE_FACTOR = {"all_reduce": lambda k: 2 * (k - 1) / k, "reduce_scatter": lambda k: (k - 1) / k,
                   "all_gather": lambda k: (k - 1) / k}

    def __init__(self, process_group):
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.payload = defaultdict(int)
        self.calls = defaultdict(int)

    def _count(self, kind, nbytes):
        self.payload[kind] += nbytes
        self.calls[kind] += 1

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        self._count("all_reduce", tensor.numel() * tensor.element_size())
        dist.all_reduce(tensor, op=op, group=self.group)

    def reduce_scatter(self, output, input, op=dist.ReduceOp.SUM):
        self._count("reduce_scatter", input.numel() * input.element_size())
        _reduce_scatter(output, input, op=op, group=self.group)

    def all_gather(self, output, input):
        self._count("all_gather", output.numel() * output.element_size())
        _all_gather(output, input, group=self.group)

    # Means as a sum and a division: older gloo has no ReduceOp.AVG.
    def all_reduce_mean(self, tensor):
        self.all_reduce(tensor)
        tensor.div_(self.world_size)

    def reduce_scatter_mean(self, output, input):
        self.reduce_scatter(output, input)
        output.div_(self.world_size)

    def wire_bytes(self) -> float:
        return ring_wire_bytes(self.payload, self.world_size)


def ring_wire_bytes(payload: dict, world_size: int) -> float:
    """Bytes on each rank's link under ring algorithms, from per-kind payloads (see Communicator)."""
    return sum(Communicator.WIRE_FACTOR[kind](world_size) * b for kind, b in payload.items())


def skip_gradient_allreduce(ddp_model: torch.nn.parallel.DistributedDataParallel):
    """Turn off DDP's gradient all-reduce (TWA's ``step()`` does its own communication); DDP still
    broadcasts buffers such as BatchNorm statistics. Returns the model, so it fits on one line:
    ``model = twa.distributed.skip_gradient_allreduce(DDP(model))``."""

    def keep_local_gradient(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp_model.register_comm_hook(None, keep_local_gradient)
    return ddp_model
