"""Worker processes for the distributed tests (gloo on CPU). Results go to files, never through a
multiprocessing queue (tensors sent that way die with their process)."""

from __future__ import annotations

import faulthandler
import gc
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import twa_kernels as twa  # noqa: E402
from twa_kernels.optim import twa_state  # noqa: E402
from reference import batches, make_checkpoints, make_model  # noqa: E402

STEPS = 8
GLOBAL_BATCH = 24  # divisible by 2 and 3: the mean of the ranks' mean gradients is the full-batch mean
OPTIMIZERS = {
    "sgd": (twa.ProjectedSGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, init="center")),
    "adamw": (twa.ProjectedAdamW, dict(lr=1e-2, weight_decay=1e-3, init="center")),
}


def launch(worker, world, scenario, tmp_path):
    """Run ``worker(rank, world, out_dir, scenario) -> result`` on ``world`` gloo ranks; each rank's result,
    after checking that none crashed."""
    import torch.multiprocessing as mp

    mp.start_processes(rank_main, args=(world, str(tmp_path / f"init_{scenario}"), str(tmp_path), scenario, worker),
                       nprocs=world, join=True, start_method="spawn")
    results = [torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}:\n{res['crash']}"
    return results


def rank_main(rank, world, init_file, out_dir, scenario, worker):
    """One rank: join the gloo group, run the scenario, save its result (or the traceback of its crash), and
    leave the group only when every rank is done: the scenario's objects are freed first and the ranks meet
    at a barrier, so that no rank closes its connections while a peer still works. Rank 0 of ``save_load``
    once aborted ("terminate called without an active exception", in one full run of the suite; not seen
    again in 208 runs of the scenario alone, under load); should a rank abort again, faulthandler prints
    where each of its threads was."""
    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = worker(rank, world, out_dir, scenario)
    except Exception:
        result = {"crash": traceback.format_exc()}
    crashed = "crash" in result
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    del result
    gc.collect()
    if not crashed:  # a crashed rank may have left its peers inside another collective: leave at once
        try:
            dist.barrier()
        except RuntimeError:  # a peer crashed and left; its result file says why
            pass
    dist.destroy_process_group()


def error_of(fn, *args, kind=ValueError, **kwargs) -> str | None:
    """The message of the ``kind`` error ``fn(*args, **kwargs)`` raises, or None when it raises none."""
    try:
        fn(*args, **kwargs)
    except kind as err:
        return str(err)
    return None


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


def worker(rank, world, out_dir, scenario):
    result = {}
    if scenario == "trajectories":
        for mode in ("replicate", "rows", "columns"):
            for bits in (4, None):
                model, ckpts, data = setup()
                space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, shard=mode, progress=False)
                for name in OPTIMIZERS:
                    m = make_model(d_in=5, hidden=7, d_out=3)
                    betas, weights, opt = train(m, space, name, data, rank, world)
                    result[(mode, bits, name)] = {"betas": betas, "weights": weights,
                                                  "comm": opt.comm_bytes, "nbytes": space.nbytes,
                                                  "beta_error": error_of(lambda: opt.beta, kind=RuntimeError)}
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
        result["error"] = error_of(twa.Subspace.from_checkpoints, model, ckpts, bits=4, shard="rows",
                                   progress=False)
    elif scenario == "middle_row_differs":
        # the ranks of "rows" read different rows: a row in the middle, read by rank 0 only, differs
        model, _, _ = setup()
        ckpts = make_checkpoints(model, 5, seed=1)
        if rank == world - 1:
            for sd in ckpts:
                sd["fc1.weight"][3, 2] += 1e-3
        result["error"] = error_of(twa.Subspace.from_checkpoints, model, ckpts, bits=4, shard="rows",
                                   progress=False)
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
        twa_state(sd)["shard"] = dict(twa_state(sd)["shard"], world_size=world + 1)
        result["world_error"] = error_of(opt.load_state_dict, sd)
    return result


# ---------------------------------------------------------------------------------------------- FSDP2
class FsdpNet(torch.nn.Module):
    """FSDP2 shards no 0-d parameter: the gain is a 1-element vector (at world size 2 and 3 only rank 0
    holds it), fc2 has 3 rows (one per rank at 3), fc1 7 rows (uneven: 4 + 3, 3 + 3 + 1)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(5, 7, dtype=dtype)
        self.fc2 = torch.nn.Linear(7, 3, dtype=dtype)
        self.gain = torch.nn.Parameter(torch.ones(1, dtype=dtype))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype)))) * self.gain


def fsdp_setup(dtype):
    model = FsdpNet(dtype)
    return model, make_checkpoints(model, 5), batches(STEPS, batch=GLOBAL_BATCH, dtype=dtype)


def fsdp_train(model, opt, data, rank, world, steps=None):
    per = GLOBAL_BATCH // world
    betas = []
    for x, y in data[:steps]:
        loss = torch.nn.functional.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per])
        opt.zero_grad()
        loss.backward()
        opt.step()
        betas.append(opt.beta)
    return betas


def full_weights(model):
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def fsdp_single_process(dtype, bits, name):
    model, ckpts, data = fsdp_setup(dtype)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, progress=False)
    cls, hp = OPTIMIZERS[name]
    opt = cls(model.parameters(), space, **hp)
    return fsdp_train(model, opt, data, 0, 1), full_weights(model)


def fsdp_worker(rank, world, out_dir, scenario):
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    result = {}

    def sharded(dtype=torch.float64, **kw):
        model, ckpts, data = fsdp_setup(dtype)
        fully_shard(model, **kw)
        return model, ckpts, data

    if scenario == "trajectories":
        for dtype in (torch.float64, torch.float32):
            for bits in (4, None):
                for name in OPTIMIZERS:
                    for reshard in (True, False):
                        model, ckpts, data = sharded(dtype, reshard_after_forward=reshard)
                        space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, progress=False)
                        cls, hp = OPTIMIZERS[name]
                        opt = cls(model.parameters(), space, **hp)
                        betas = fsdp_train(model, opt, data, rank, world)
                        result[(str(dtype), bits, name, reshard)] = {
                            "betas": betas, "weights": full_weights(model), "comm": opt.comm_bytes,
                            "nbytes": space.nbytes, "backend": opt.backend}
    elif scenario == "mixed_precision":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model, ckpts, data = sharded(torch.float32, mp_policy=policy)
        space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
        opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2)
        betas = fsdp_train(model, opt, data, rank, world)
        result = {"betas": betas, "dtype": str(next(model.parameters()).dtype), "weights": full_weights(model)}
    elif scenario == "dcp":
        cls, hp = OPTIMIZERS["adamw"]
        model, ckpts, data = sharded()
        space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
        opt = cls(model.parameters(), space, **hp)
        fsdp_train(model, opt, data, rank, world, steps=4)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=os.path.join(out_dir, "dcp"))
        whole = fsdp_train(model, opt, data[4:], rank, world)
        fresh, ckpts, _ = sharded()
        opt2 = cls(fresh.parameters(), twa.Subspace.from_checkpoints(fresh, ckpts, bits=4, progress=False), **hp)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
        set_model_state_dict(fresh, state["model"])
        set_optimizer_state_dict(fresh, opt2, state["optim"])
        resumed = fsdp_train(fresh, opt2, data[4:], rank, world)
        result = {"whole": whole, "resumed": resumed, "w_whole": full_weights(model), "w_resumed": full_weights(fresh)}
    elif scenario == "dcp_save":  # 4 steps at this world size, then a DCP checkpoint
        cls, hp = OPTIMIZERS["sgd"]
        model, ckpts, data = sharded()
        opt = cls(model.parameters(), twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False), **hp)
        fsdp_train(model, opt, data, rank, world, steps=4)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=os.path.join(out_dir, "dcp_resharded"))
    elif scenario == "dcp_resume":  # the rest of the run at another world size
        cls, hp = OPTIMIZERS["sgd"]
        model, ckpts, data = sharded()
        opt = cls(model.parameters(), twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False), **hp)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp_resharded"))
        set_model_state_dict(model, state["model"])  # FSDP reshards the model itself
        result["error"] = error_of(set_optimizer_state_dict, model, opt, state["optim"])
    elif scenario == "bad_checkpoints":
        model, ckpts, _ = sharded()
        if rank == world - 1:
            ckpts = make_checkpoints(FsdpNet(), 5, seed=7)
        result["error"] = error_of(twa.Subspace.from_checkpoints, model, ckpts, bits=4, progress=False)
        result["layers_error"] = error_of(twa.Subspace.from_checkpoints, model, ckpts[:3], bits=4, progress=False,
                                          layers="model")
    return result
