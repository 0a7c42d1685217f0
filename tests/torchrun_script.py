"""Run by tests/test_distributed.py under torchrun: env:// initialisation, rows sharding, a few steps."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

import twa_kernels as twa  # noqa: E402
from reference import batches, make_checkpoints, make_model  # noqa: E402

dist.init_process_group("gloo")  # torchrun provides RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()
model = make_model(d_in=5, hidden=7, d_out=3)
space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=4, shard="rows", progress=False)
opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2)
for x, y in batches(4, batch=12):
    per = 12 // world
    torch.nn.functional.cross_entropy(model(x[rank * per:(rank + 1) * per]), y[rank * per:(rank + 1) * per]).backward()
    opt.step()
    opt.zero_grad()
torch.save({"beta": opt.beta, "weights": torch.cat([p.detach().reshape(-1) for p in model.parameters()])},
           os.path.join(sys.argv[1], f"torchrun_rank{rank}.pt"))
dist.destroy_process_group()
