"""The 7B/70B plan's formulas: against transformers' own Llama (shapes, counts) and against the measured 1B run
(``benchmarks/results/scale_cpu.json``: P̃ bytes and collective bytes exactly, memory within the activation
estimate's accuracy)."""

import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import scale_plan as sp  # noqa: E402
from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.scale import FULL_MODEL, QUICK_MODEL, llama_config  # noqa: E402

MEASURED = os.path.join(RESULTS, "scale_cpu.json")
# Peak anonymous memory = the state + the activations kept for backward + what the interpreter, torch and
# transformers hold before any model exists (≈ 0.3 GB, the tiny run's whole peak). The activation formula
# counts the main tensors, not every temporary: within 10 % of a 19 GB peak.
MEMORY_RTOL = 0.10


@pytest.mark.parametrize("cfg", [QUICK_MODEL, FULL_MODEL, sp.LLAMA_7B, sp.LLAMA_70B], ids=["tiny", "1B", "7B", "70B"])
def test_shapes_and_count_are_transformers_own(cfg):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == sp.tensor_shapes(cfg)
    assert sp.parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    assert sp.parameter_count(sp.LLAMA_7B) == 6_738_415_616  # Llama-2-7B
    assert sp.parameter_count(sp.LLAMA_70B) == 68_976_648_192  # Llama-2-70B


def test_memory_formulas_add_up():
    cfg = sp.LLAMA_7B
    p = sp.parameter_count(cfg)
    assert sum(sp.state_bytes(cfg, "adamw").values()) == 16 * p
    twa = sp.state_bytes(cfg, "twa", world=8, n=8, bits=4)
    assert twa["projection"] == pytest.approx(p * 8 * 4 / 8 / 8 + sp.layer_count(cfg) * 8 * 8)
    assert "center" not in twa and "center" in sp.state_bytes(cfg, "twa", center_on_device=True)
    with pytest.raises(ValueError, match="adamw"):
        sp.state_bytes(cfg, "sgd")
    with pytest.raises(ValueError, match="for TWA"):
        sp.state_bytes(cfg, "adamw", weights="bf16")
    assert sum(sp.state_bytes(cfg, "twa", n=8, bits=4, weights="bf16").values()) < sum(twa.values()) * 8
    # more columns or bits never need fewer ranks
    assert sp.min_ranks(cfg, "twa", 8, 4) <= sp.min_ranks(cfg, "twa", 32, 8)


def test_plan_renders_both_sizes():
    text = sp.plan_markdown()
    for needle in ("## 7B", "## 70B", "full AdamW", "TWA n=32", "all-gather", "overhead", sp.KERNEL_RECORD):
        assert needle in text
    fraction, bandwidth, _ = sp.measured_kernel_fraction()
    assert 0.0 < fraction < 1.0 and bandwidth > 1e12


@pytest.fixture(scope="module")
def measured():
    with open(MEASURED) as f:
        return json.load(f)


def test_counts_and_projection_bytes_match_the_1b_run(measured):
    assert measured["model"] == FULL_MODEL
    assert measured["params"] == sp.parameter_count(FULL_MODEL) > 1e9
    run = measured["run"]
    assert measured["fit"]["subspace_bytes"] == sp.projection_bytes(FULL_MODEL, run["n"], run["bits"])
    assert measured["twa_steps"] >= 20


def test_collective_bytes_match_the_fsdp_run(measured):
    if "fsdp" not in measured:
        pytest.fail(f"the 1B run has no FSDP2 figures: {measured.get('fsdp_failed', '')[:300]}")
    run, world = measured["run"], measured["fsdp"]["world"]
    want = sp.fsdp_collective_bytes(FULL_MODEL, param_bytes=4, grad_bytes=4, n=run["n"])  # gloo, no mixed precision
    for rank in measured["fsdp"]["ranks"]:
        assert rank["subspace_bytes"] == sp.projection_bytes(FULL_MODEL, run["n"], run["bits"], world)
        for step in rank["steps"]:
            assert step["collective_bytes"] == want


@pytest.mark.parametrize("phase", ["adamw", "twa"])
def test_peak_memory_matches_the_1b_run(measured, phase):
    run = measured["run"]
    tokens = run["context"] * run["batch"]
    if phase == "adamw":
        got = measured["checkpoints"]["phases"]["adamw"]["peak_anon_bytes"]
        state = sp.state_bytes(FULL_MODEL, "adamw")
    else:
        got = measured["fit"]["phases"]["train"]["peak_anon_bytes"]
        state = sp.state_bytes(FULL_MODEL, "twa", n=run["n"], bits=run["bits"], center_on_device=True)
    predicted = sum(state.values()) + sp.activation_bytes(FULL_MODEL, tokens)
    assert math.isclose(got, predicted, rel_tol=MEMORY_RTOL), (got / 1e9, predicted / 1e9)
