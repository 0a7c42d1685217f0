"""Distributed TWA over torch.distributed (NCCL for CUDA tensors, gloo for CPU tensors).

Four ways to spread the work over k ranks: ``shard="replicate" | "rows" | "columns"`` chosen when the
subspace is built (``Subspace.from_checkpoints(..., shard=mode, process_group=pg)``), and FSDP2, found
from a model sharded with ``fully_shard``. The optimizers follow the subspace; each mode is a placement
class in :mod:`twa_kernels.placement`. What each rank holds and moves: the table of modes in README.md,
"Distributed training" (the one place it is written).

One contract for all modes: ``step()`` receives each rank's *local* gradient (the mean over its own
batch) and does all the communication itself, averaging over ranks. A DDP-wrapped model therefore
needs DDP's gradient all-reduce switched off: :func:`skip_gradient_allreduce` (DDP still broadcasts
buffers). Every collective goes through :class:`Communicator`, which counts the bytes it moves.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


# torch >= 2.13 names them *_single; older releases only have the *_tensor spelling.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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
