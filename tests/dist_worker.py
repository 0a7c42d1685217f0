"""Worker processes for the distributed tests (gloo on CPU). Results go to files, never through a
multiprocessing queue (tensors sent that way die with their process)."""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import twa_kernels as twa  # noqa: E402
from reference import batches, make_checkpoints, make_model  # noqa: E402

STEPS = 8
GLOBAL_BATCH = 24  # divisible by 2 and 3: the mean of the ranks' mean gradients is the full-batch mean
OPTIMIZERS = {
    "sgd": (twa.ProjectedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (twa.ProjectedAdamW, dict(lr=1e-2, weight_decay=1e-3)),
}


def setup():
    model = make_model(d_in=5, hidden=7, d_out=3)  # float64, odd sizes, a 0-d parameter
    ckpts = make_checkpoints(model, 5)  # n = 5: uneven over 2 and 3 ranks
    data = batches(STEPS, batch=GLOBAL_BATCH)
    return model, ckpts, data


def train(model, space, opt_name, data, rank=0, world=1):
    cls, hp = OPTIMIZERS[opt_name]
    params = model.module.parameters() if hasattr(model, "module") else model.parameters()
    opt = cls(params, space, backend="torch", **hp)
    betas = []
    per = GLOBAL_BATCH // world
    for x, y in data:
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        betas.append(opt.gather_beta())
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return betas, weights, opt


def single_process(mode_bits):
    model, ckpts, data = setup()
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=mode_bits, progress=False)
    return {name: train(make_model_like(model, ckpts), space, name, data)[:2] for name in OPTIMIZERS}


def make_model_like(model, ckpts):
    return make_model(d_in=5, hidden=7, d_out=3)


def worker(rank, world, init_file, out_dir, scenario):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    try:
        if scenario == "trajectories":
            for mode in ("replicate", "rows", "columns"):
                for bits in (4, None):
                    model, ckpts, data = setup()
                    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, shard=mode, progress=False)
                    for name in OPTIMIZERS:
                        m = make_model(d_in=5, hidden=7, d_out=3)
                        betas, weights, opt = train(m, space, name, data, rank, world)
                        result[(mode, bits, name)] = {"betas": betas, "weights": weights,
                                                      "comm": opt.comm_bytes, "nbytes": space.nbytes}
        elif scenario == "ddp":
            # DDP with its gradient all-reduce switched off: TWA's step averages over ranks itself.
            from torch.nn.parallel import DistributedDataParallel as DDP

            for mode in ("replicate", "rows"):
                model, ckpts, data = setup()
                space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, shard=mode, progress=False)
                m = twa.distributed.skip_gradient_allreduce(DDP(make_model(d_in=5, hidden=7, d_out=3)))
                betas, weights, _ = train(m, space, "sgd", data, rank, world)
                result[mode] = {"betas": betas, "weights": weights}
            # After a backward through the hooked DDP model, .grad is this rank's own gradient.
            plain = make_model(d_in=5, hidden=7, d_out=3)
            wrapped = twa.distributed.skip_gradient_allreduce(DDP(make_model(d_in=5, hidden=7, d_out=3)))
            x, y = data[0]
            per = GLOBAL_BATCH // world
            for mdl in (plain, wrapped):
                torch.nn.functional.cross_entropy(mdl(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
            result["local_grad"] = torch.cat([p.grad.reshape(-1) for p in wrapped.module.parameters()])
            result["plain_grad"] = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
        elif scenario == "different_checkpoints":
            model, _, _ = setup()
            ckpts = make_checkpoints(model, 5, seed=1 + (rank == world - 1))
            try:
                twa.Subspace.from_checkpoints(model, ckpts, bits=4, shard="rows", progress=False)
                result["error"] = None
            except ValueError as err:
                result["error"] = str(err)
        elif scenario == "save_load":
            model, ckpts, data = setup()
            space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, shard="rows", progress=False)
            path = os.path.join(out_dir, "space_{rank}.safetensors")
            space.save(path)
            back = twa.Subspace.load(path)
            result["same"] = back.fingerprint == space.fingerprint and torch.equal(
                back.projection.words, space.projection.words) and back.placement == space.placement
            m = make_model(d_in=5, hidden=7, d_out=3)
            _, _, opt = train(m, back, "sgd", data[:2], rank, world)
            sd = opt.state_dict()
            sd["twa"]["shard"] = dict(sd["twa"]["shard"], world_size=world + 1)
            try:
                opt.load_state_dict(sd)
                result["world_error"] = None
            except ValueError as err:
                result["world_error"] = str(err)
    except Exception:
        result["crash"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
