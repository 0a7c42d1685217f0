"""Communication and memory of the distributed modes at ResNet-50 size, beside plain DDP SGD.

    python -m benchmarks.distributed            # 2 processes; NCCL on 2+ GPUs, else gloo on CPU
    python -m benchmarks.distributed --model small --n 4 --out-dir DIR   # a smoke test in seconds

Bytes are counted at every collective call (the payload each rank hands to it), over real steps, for
``replicate``, ``rows`` and ``columns`` (ResNet-50, D = 25,557,032, n = 60, 4 bits), for DDP SGD
(counted by a comm hook around its gradient all-reduce), and for an FSDP2 model (``fully_shard`` per
bottleneck block and at the root) trained with plain SGD and with TWA (FSDP's own all-gathers and
reduce-scatters counted at torch.distributed's entry points, beside TWA's all-reduce). The subspace is
synthetic (random codes): what moves and what is held does not depend on what P̃ contains.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import twa_kernels as twa
from benchmarks.common import announce_backends, environment, markdown_table, save
from benchmarks.models import ResNet, small_resnet
from twa_kernels.distributed import ring_wire_bytes
from twa_kernels.testing import synthetic_subspace

MODES = ("replicate", "rows", "columns")
FSDP_MODES = ("fsdp_sgd", "fsdp_twa")
# torch.distributed's entry points FSDP2 and TWA call, by the kind of collective each is
COLLECTIVES = {"all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather",
               "reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
               "all_reduce": "all_reduce"}


@contextlib.contextmanager
def counted_collectives():
    """Payload bytes per kind of collective while the block runs: the full-size tensor of each call (the
    all-gather's output, the reduce-scatter's input), as twa_kernels' Communicator counts."""
    counts, saved = {}, {}
    for name, kind in COLLECTIVES.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def counting(*args, _fn=fn, _kind=kind, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            counts[_kind] = counts.get(_kind, 0) + max(t.numel() * t.element_size() for t in tensors)
            return _fn(*args, **kwargs)

        setattr(dist, name, counting)
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def fsdp_model(name, device):
    from torch.distributed.fsdp import fully_shard

    from benchmarks.models import Bottleneck

    model = make_model(name).to(device)
    for block in model.modules():
        if isinstance(block, Bottleneck):
            fully_shard(block)
    fully_shard(model)
    return model


def make_model(name: str) -> torch.nn.Module:
    return ResNet() if name == "resnet50" else small_resnet(10)


def worker(rank, world, init, out, n, bits, steps, backend, model_name="resnet50"):
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result = {}
    for mode in MODES:
        torch.manual_seed(0)
        model = make_model(model_name).to(device)
        space = synthetic_subspace(model, n, bits, shard=mode)
        opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1, momentum=0.9)
        start = opt.comm_bytes  # construction all-gathers w̄ once (rows); count the steps only
        for _ in range(steps):
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        result[mode] = {"bytes_per_step": {k: (v - start.get(k, 0)) / steps for k, v in opt.comm_bytes.items()},
                        "p_bytes": space.nbytes, "backend": opt.backend}
        del opt, space, model
    # Plain data-parallel SGD: DDP's gradient all-reduce, counted by a hook around it.
    counted = {"bytes": 0}

    def counting_allreduce(state, bucket):
        counted["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(None, bucket)

    model = DDP(make_model(model_name).to(device), device_ids=[rank] if device.type == "cuda" else None)
    model.register_comm_hook(None, counting_allreduce)
    x = torch.randn(2, 3, 64, 64, device=device)
    for _ in range(steps):
        model(x).sum().backward()
    result["ddp_sgd"] = {"bytes_per_step": {"all_reduce": counted["bytes"] / steps}, "p_bytes": 0}
    # FSDP2: its own all-gathers and reduce-scatters, with plain SGD and with TWA (one all-reduce of n·L more).
    for mode in FSDP_MODES:
        torch.manual_seed(0)
        model = fsdp_model(model_name, device)
        space = synthetic_subspace(model, n, bits) if mode == "fsdp_twa" else None
        opt = (twa.ProjectedSGD(model.parameters(), space, lr=0.1, momentum=0.9) if space is not None
               else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        with counted_collectives() as counts:
            for _ in range(steps):
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
        result[mode] = {"bytes_per_step": {k: v / steps for k, v in counts.items()},
                        "p_bytes": 0 if space is None else space.nbytes,
                        "backend": getattr(opt, "backend", "torch.optim.SGD")}
        del opt, space, model
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--model", choices=["resnet50", "small"], default="resnet50")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    backend = "nccl" if torch.cuda.device_count() >= args.world else "gloo"
    announce_backends(torch.device("cuda" if backend == "nccl" else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.world, os.path.join(tmp, "init"), tmp, args.n, args.bits, args.steps,
                                         backend, args.model), nprocs=args.world, join=True, start_method="spawn")
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(args.world)]
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    env = environment(device)
    def wire(per):  # each rank's link under ring algorithms, from the counted payloads
        return ring_wire_bytes(per, args.world)

    ddp_wire = wire(results[0]["ddp_sgd"]["bytes_per_step"])
    rows = []
    for mode in ("ddp_sgd",) + MODES + FSDP_MODES:
        per = results[0][mode]["bytes_per_step"]
        total = sum(per.values())
        pbytes = [r[mode]["p_bytes"] for r in results]
        rows.append([mode, ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(per.items())),
                     f"{total / 2**20:.2f}", f"{wire(per) / 2**20:.2f}", f"{wire(per) / ddp_wire:.4f}",
                     f"{max(pbytes) / 2**20:.1f}"])
    md = (f"Distributed TWA, {args.world} processes over {backend} ({'GPUs' if backend == 'nccl' else 'CPU; no GPU here'}): "
          f"{'ResNet-50 (D = 25,557,032)' if args.model == 'resnet50' else 'small ResNet'}, n = {args.n}, {args.bits}-bit; bytes each rank hands to collectives per "
          f"step, counted at every call; commit {str(env['commit'])[:10]}, {env['date']}\n\n"
          + markdown_table(["mode", "per step (payload of rank 0, counted)", "payload MiB/step",
                            "ring wire MiB/step (derived)", "wire vs DDP SGD", "P̃ MiB on the largest rank"], rows)
          + "\nFSDP2 moves the same bytes with TWA as with SGD, plus one all-reduce of n·L numbers; under FSDP2 each "
            "rank holds P̃ for its own shards' rows only.\n")
    print(md)
    path = save(f"distributed_{backend}", device, {"world": args.world, "n": args.n, "bits": args.bits,
                                                  "ranks": results}, md, out_dir=args.out_dir)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
