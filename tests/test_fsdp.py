"""TWA on FSDP2-sharded models (``fully_shard``) on CPU with gloo, world sizes 2 and 3, uneven shards and
ranks that hold no row of a small layer: the trajectory of the single-process run on the union of the
ranks' batches, identical β on every rank, one all-reduce of n·L numbers per step, mixed precision,
``torch.distributed.checkpoint`` resumes bit for bit (and refuses another world size clearly), and the
same clear errors on every rank."""

import pytest
import torch

import dist_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
pytest.importorskip("torch.distributed.fsdp")


def launch(world, scenario, tmp_path):
    return dist_worker.launch(dist_worker.fsdp_worker, world, scenario, tmp_path)


@pytest.fixture(scope="module")
def reference():
    return {(str(dtype), bits, name): dist_worker.fsdp_single_process(dtype, bits, name)
            for dtype in (torch.float64, torch.float32) for bits in (4, None) for name in dist_worker.OPTIMIZERS}


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_follows_the_single_process_run(world, tmp_path, reference):
    results = launch(world, "trajectories", tmp_path)
    for key, first in results[0].items():
        dtype, bits, name, _ = key
        ref_betas, ref_weights = reference[(dtype, bits, name)]
        for r in range(1, world):  # β is the same on every rank, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(results[r][key]["betas"], first["betas"])), (key, r)
        # Relative error of the trajectory: fp64 differs only in reduction order (~1e-16 per operation,
        # amplified over 8 steps); fp32 at 2^-24 per operation through sums of ~35 terms.
        tol = 1e-10 if dtype == "torch.float64" else 1e-5
        for step, (a, b) in enumerate(zip(first["betas"], ref_betas)):
            assert (a - b).abs().max() <= tol * b.abs().max(), (key, step, (a - b).abs().max())
        assert (first["weights"] - ref_weights).abs().max() <= tol * ref_weights.abs().max(), key
    # Per step TWA adds one all-reduce of n·L numbers to what FSDP moves (8 steps, L = 5, n = 5).
    for key, first in results[0].items():
        width = 8 if key[0] == "torch.float64" else 4
        assert first["comm"] == {"all_reduce": dist_worker.STEPS * 5 * 5 * width}, key
    # Each rank holds the codes of its own rows only.
    full = sum(r[("torch.float64", 4, "sgd", True)]["nbytes"] for r in results)
    assert max(r[("torch.float64", 4, "sgd", True)]["nbytes"] for r in results) < full / world + 200


def test_fsdp_mixed_precision(tmp_path):
    """bf16 compute with fp32 sharded parameters: the parameters TWA updates stay fp32, every rank holds the
    same β, and the run follows the single-process run of the same precision (the same policy at world 1)."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    results = launch(2, "mixed_precision", tmp_path / "two")
    (single,) = launch(1, "mixed_precision", tmp_path / "one")
    assert results[0]["dtype"] == "torch.float32"
    assert all(torch.equal(a, b) for a, b in zip(results[0]["betas"], results[1]["betas"]))
    assert torch.equal(results[0]["weights"], results[1]["weights"])
    # Two ranks compute their half-batch gradients in bf16 and reduce them in fp32; one rank computes the
    # whole batch in bf16. Each gradient element then differs by the bf16 rounding of its products and
    # outputs, a few 2^-8 of its size, and so does c = P̃ᵀg. AdamW's step m/√v is scale-free, so a relative
    # change ε of c moves β by at most about ε·lr per step where c is not near zero; over the 8 steps the
    # two runs stay within 8 · 4·2^-8 · lr + 2^-8 |β| of each other, far below the steps themselves (lr each).
    lr, steps = 1e-2, len(single["betas"])
    for step, (a, b) in enumerate(zip(results[0]["betas"], single["betas"])):
        bound = (step + 1) * 4 * 2**-8 * lr + 2**-8 * b.abs()
        assert torch.all((a - b).abs() <= bound), (step, float((a - b).abs().max()))
    assert float(single["betas"][-1].abs().max()) > 0.5 * lr  # both runs moved: the bound is not vacuous
    assert steps == dist_worker.STEPS


def test_dcp_resume_is_bit_identical(tmp_path):
    for r in launch(2, "dcp", tmp_path):
        assert all(torch.equal(a, b) for a, b in zip(r["whole"], r["resumed"]))
        assert torch.equal(r["w_whole"], r["w_resumed"])


def test_dcp_at_another_world_size_is_refused_clearly(tmp_path):
    """Each world size builds its subspace from other per-rank partial sums, so its norms (and
    fingerprint) differ in the last bits: a state saved at 2 ranks is refused at 3, saying why."""
    launch(2, "dcp_save", tmp_path)
    for r in launch(3, "dcp_resume", tmp_path):
        assert "saved by fsdp at world size 2, this optimizer is fsdp at world size 3" in r["error"]


def test_the_same_clear_error_on_every_rank(tmp_path):
    results = launch(2, "bad_checkpoints", tmp_path)
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and "ranks disagree on the checkpoints" in errors.pop()
    assert all("use layers='param'" in r["layers_error"] for r in results)
