"""Distributed TWA on CPU with gloo, world sizes 2 and 3: every mode and both optimizers follow the
single-process trajectory, and every rank holds the same weights."""

import pytest
import torch

import dist_worker
import twa_kernels as twa

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def launch(world, scenario, tmp_path):
    return dist_worker.launch(dist_worker.worker, world, scenario, tmp_path)


@pytest.fixture(scope="module")
def reference():
    return {bits: dist_worker.single_process(bits) for bits in (4, None)}


@pytest.mark.parametrize("world", [2, 3])
def test_every_mode_follows_the_single_process_run(world, tmp_path, reference):
    results = launch(world, "trajectories", tmp_path)
    for key, first in results[0].items():
        mode, bits, name = key
        ref_betas, ref_weights = reference[bits][name]
        for r in range(1, world):  # all ranks hold identical weights and β (bit for bit)
            assert torch.equal(results[r][key]["weights"], first["weights"]), (key, r)
            assert torch.equal(results[r][key]["betas"][-1], first["betas"][-1]), (key, r)
        # float64 throughout: the runs differ only in the order of the reductions over ranks
        # (~1e-16 relative per operation), amplified over 8 steps; 1e-10 is a wide margin.
        for step, (a, b) in enumerate(zip(first["betas"], ref_betas)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (key, step, (a - b).abs().max())
        assert torch.allclose(first["weights"], ref_weights, rtol=1e-10, atol=1e-12), key
    # opt.beta gives all of β where each rank holds it, and refuses (pointing at the collective) where the
    # columns are split over ranks
    for key, first in results[0].items():
        if key[0] == "columns":
            assert "call opt.gather_beta() on every rank" in first["beta_error"], key
        else:
            assert first["beta_error"] is None, key
    # What crosses the network per step, counted at each collective (float64 here: 8 bytes).
    space_numel = sum(p.numel() for p in dist_worker.make_model(d_in=5, hidden=7, d_out=3).parameters())
    steps, L, n = dist_worker.STEPS, 5, 5
    comm = {mode: results[0][(mode, 4, "sgd")]["comm"] for mode in ("replicate", "rows", "columns")}
    assert comm["replicate"] == {"all_reduce": steps * L * n * 8}
    padded = -(-space_numel // world) * world
    assert comm["rows"]["reduce_scatter"] == steps * padded * 8
    assert comm["rows"]["all_gather"] == (steps + 1) * padded * 8  # + the all-gather of w̄ at start
    assert comm["rows"]["all_reduce"] == steps * L * n * 8
    assert comm["columns"]["all_reduce"] == steps * space_numel * (8 + 8)  # g + Δw, both float64 here
    # P̃'s memory per rank: rows divides the codes by about k
    full = results[0][("replicate", 4, "sgd")]["nbytes"]
    assert max(results[r][("rows", 4, "sgd")]["nbytes"] for r in range(world)) < full / world + 2 * L * n * 4 + 4 * L


def test_ddp_with_its_allreduce_switched_off(tmp_path, reference):
    results = launch(2, "ddp", tmp_path)
    ref_betas, ref_weights = reference[4]["sgd"]
    for mode in ("replicate", "rows"):
        assert torch.equal(results[0][mode]["weights"], results[1][mode]["weights"])
        assert torch.allclose(results[0][mode]["betas"][-1], ref_betas[-1], rtol=1e-10, atol=1e-12), mode
        assert torch.allclose(results[0][mode]["weights"], ref_weights, rtol=1e-10, atol=1e-12), mode
    # DDP did not average: each rank's gradient is exactly its own, and the ranks' differ.
    for r in results:
        assert torch.equal(r["local_grad"], r["plain_grad"])
    assert not torch.equal(results[0]["local_grad"], results[1]["local_grad"])


def test_ranks_with_different_checkpoints_all_raise(tmp_path):
    results = launch(2, "different_checkpoints", tmp_path)
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1]
    assert "ranks disagree on the checkpoints" in errors[0]


def test_rows_mode_catches_checkpoints_that_differ_in_a_middle_row(tmp_path):
    errors = [r["error"] for r in launch(2, "middle_row_differs", tmp_path)]
    assert errors[0] is not None and errors[0] == errors[1] and "ranks disagree on the checkpoints" in errors[0]


def test_shards_save_load_per_rank_and_world_size_is_checked(tmp_path):
    results = launch(2, "save_load", tmp_path)
    for r in results:
        assert r["same"]
        assert "rank 0 of 3" in r["world_error"] or "rank 1 of 3" in r["world_error"]
        assert "same world size" in r["world_error"]


def test_launch_with_torchrun(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:  # one free port, the same for every rank
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("torchrun_script.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"torchrun_rank{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(r0["weights"], r1["weights"]) and torch.equal(r0["beta"], r1["beta"])
    # The single-process run of the same steps on the union of the ranks' batches: the two ranks' mean
    # gradients, averaged, are the full batch's up to reduction order (the model is fp64: ~1e-16 per
    # operation), which the 4 AdamW steps carry along: 1e-10 of the largest coordinate, as for FSDP2 in fp64.
    from reference import batches, make_checkpoints, make_model

    model = make_model(d_in=5, hidden=7, d_out=3)
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=4, progress=False)
    opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2)
    for x, y in batches(4, batch=12):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert r0["beta"].dtype == torch.float64
    assert (r0["beta"] - opt.beta).abs().max() <= 1e-10 * opt.beta.abs().max()
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (r0["weights"] - weights).abs().max() <= 1e-10 * weights.abs().max()
    assert opt.beta.abs().max() > 0


def test_sharding_needs_an_initialised_group():
    model = dist_worker.make_model(d_in=5, hidden=7, d_out=3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        twa.Subspace.from_checkpoints(model, dist_worker.make_checkpoints(model, 3), shard="rows", progress=False)


def test_columns_needs_a_column_per_rank():
    from twa_kernels.placement import plan

    with pytest.raises(ValueError, match="at least one column per rank"):
        plan("columns", 100, 2, 3, 0)
    plans = [plan("columns", 100, 5, 3, r) for r in range(3)]
    assert [(p.col_start, p.col_stop) for p in plans] == [(0, 2), (2, 4), (4, 5)]
    assert [p.column_slice(5) for p in plans] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    rows = [plan("rows", 10, 5, 3, r) for r in range(3)]
    assert [(p.row_start, p.row_stop) for p in rows] == [(0, 4), (4, 8), (8, 10)]
    # a layer of 3 rows cut by rank 1 of 3 over 10 rows: sizes (3, 5, 2) -> its rows 4..8
    assert rows[1].layer_ranges((3, 5, 2)) == [(3, 3), (1, 5), (0, 0)]


def test_placements_round_trip_through_their_file_record():
    from twa_kernels.placement import Placement, from_dict, plan

    for mode in ("replicate", "rows", "columns"):
        p = plan(mode, 10, 5, 3, 2)
        assert from_dict(p.to_dict()) == p
        # a replicated state is the same on every rank and resumes at any world size; the others are per rank
        assert p.state_tag() == ({"mode": mode} if mode == "replicate" else {"mode": mode, "world_size": 3, "rank": 2})
    assert from_dict(None) == Placement() and Placement().state_tag() is None
    # files of the first format named the row padding padded_numel
    old = {"mode": "rows", "world_size": 2, "rank": 1, "row_start": 5, "row_stop": 10, "padded_numel": 10,
           "col_start": 0, "col_stop": 0}
    assert from_dict(old) == plan("rows", 10, 5, 2, 1)
