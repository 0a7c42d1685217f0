"""The plan for 7B and 70B with FSDP2 on 8 × H100, as formulas that the measured 1B run checks.

Everything here is arithmetic on a Llama shape; nothing is measured in this file. ``tests/test_scale_plan.py``
holds the formulas against the figures of ``benchmarks.scale`` (``benchmarks/results/scale_cpu.json``):
parameter count and P̃ bytes exactly, collective bytes per step of the FSDP2 run exactly, peak RSS of
the AdamW and TWA phases within the activation estimate's accuracy.

State per rank, FSDP2 (every tensor sharded by dim-0 rows over W ranks, fp32 master weights):
    full AdamW:   weights 4P/W + gradients 4P/W + exp_avg, exp_avg_sq 8P/W
    TWA:          weights 4P/W + gradients 4P/W + P̃ (n·b/8 · P/W + 8 bytes per (layer, column) for its
                  scale and zero) ; β and its buffers are L·n numbers; w̄ (4P/W) stays in host memory on
                  GPU ranks (it is read only to place or re-place the weights), and sits beside the
                  weights on a CPU-only run.
Collectives per step (payload, as torch.distributed is handed it): FSDP2 all-gathers each decoder
layer's weights twice (forward, and again for backward: they are resharded after forward) and the
root's once, and reduce-scatters every gradient once; TWA adds one all-reduce of Pᵀg's per-rank
partial sums (L·n fp32). The step overhead of TWA is the two projections' bytes over the kernel's
measured bandwidth.
"""

from __future__ import annotations

import json
import math
import os

from benchmarks.common import RESULTS, markdown_table

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
LLAMA_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8)
H100_BYTES = 80e9
H100_BF16_FLOPS = 989e12  # dense, the data sheet's
ASSUMED_MFU = 0.40
TOKENS_PER_RANK = 16384  # per step: e.g. 4 sequences of 4096
KERNEL_RECORD = "kernel_variants_n60_b4_H100_80GB_HBM3_first.json"


# ---------------------------------------------------------------------------------------------- shapes
def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter of a Llama model (untied embeddings), by its Hugging Face name."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def parameter_count(cfg: dict) -> int:
    return sum(math.prod(s) for s in tensor_shapes(cfg).values())


def layer_count(cfg: dict) -> int:
    """TWA's layers (``layers="param"``): one per parameter tensor."""
    return len(tensor_shapes(cfg))


def decoder_layer_params(cfg: dict) -> int:
    shapes = tensor_shapes(cfg)
    return sum(math.prod(s) for k, s in shapes.items() if k.startswith("model.layers.0."))


# ---------------------------------------------------------------------------------------------- memory
def projection_bytes(cfg: dict, n: int, bits: int, world: int = 1) -> float:
    """P̃ per rank: the packed codes (n·bits/8 bytes per element) and one fp32 scale and zero per
    (layer, column)."""
    return parameter_count(cfg) * n * bits / 8 / world + layer_count(cfg) * n * 8


def state_bytes(cfg: dict, optimizer: str, world: int = 1, n: int = 8, bits: int = 4,
                center_on_device: bool = False, weights: str = "fp32") -> dict[str, float]:
    """Bytes per rank of weights, gradients and optimizer state (FSDP2 shards). ``weights="bf16"`` (TWA
    only): bf16 weights and gradients with the optimizer's bf16 Kahan residue, which keeps w̄ + P̃β
    exact to fp32 rounding without fp32 master weights (TWA never adds a step to the weights by itself)."""
    p = parameter_count(cfg) / world
    if weights == "bf16" and optimizer != "twa":
        raise ValueError("bf16 weights without fp32 masters are for TWA, whose residue keeps them exact")
    out = {"weights": 4 * p, "gradients": 4 * p} if weights == "fp32" else \
        {"weights": 2 * p, "gradients": 2 * p, "residue": 2 * p}
    if optimizer == "adamw":
        out["optimizer_state"] = 8 * p
    elif optimizer == "twa":
        out["projection"] = projection_bytes(cfg, n, bits, world)
        out["optimizer_state"] = layer_count(cfg) * n * 4 * 4  # β, exp_avg, exp_avg_sq, max_exp_avg_sq
        if center_on_device:
            out["center"] = 4 * p
    else:
        raise ValueError(f"optimizer is 'adamw' or 'twa', not {optimizer!r}")
    return out


def activation_bytes(cfg: dict, tokens: int, element_bytes: int = 4) -> float:
    """Activations kept for backward with no recomputation: per token and decoder layer the inputs of
    the norms, projections and SwiGLU (≈ 10·h + 3·i values: norms 2h, q/k/v/o inputs 4h, attention
    output and the residuals 4h, the gate, up and their product 3i), plus the logits twice."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    per_token = cfg["num_hidden_layers"] * (10 * h + 3 * i) + 2 * cfg["vocab_size"]
    return tokens * per_token * element_bytes


# ---------------------------------------------------------------------------------------------- traffic
def fsdp_collective_bytes(cfg: dict, param_bytes: int = 4, grad_bytes: int = 4, n: int | None = None) -> dict:
    """Payload per step of FSDP2 with ``fully_shard`` per decoder layer and at the root: decoder layers
    all-gathered in forward and again in backward, the root (embeddings, final norm, head) once, every
    gradient reduce-scattered; with ``n``, TWA's all-reduce of Pᵀg (L·n fp32)."""
    total = parameter_count(cfg)
    layers = decoder_layer_params(cfg) * cfg["num_hidden_layers"]
    root = total - layers
    out = {"all_gather": (2 * layers + root) * param_bytes, "reduce_scatter": total * grad_bytes}
    if n is not None:
        out["all_reduce"] = layer_count(cfg) * n * 4
    return out


def projection_traffic_bytes(cfg: dict, n: int, bits: int, world: int = 1) -> float:
    """Bytes one TWA step's projections move per rank: Pᵀg reads P̃ and g; Pβ reads P̃ and reads and
    writes the weights (all fp32)."""
    p = parameter_count(cfg) / world
    return 2 * projection_bytes(cfg, n, bits, world) + 4 * p + 8 * p


def measured_kernel_fraction(results: str = RESULTS) -> tuple[float, float, str]:
    """(fraction of copy bandwidth, copy bandwidth B/s, where) of the fastest GPU kernel measured."""
    path = os.path.join(results, KERNEL_RECORD)
    with open(path) as f:
        rec = json.load(f)
    best = max(rec["rows"], key=lambda r: r["frac_copy"])
    env = rec["environment"]
    where = (f"{KERNEL_RECORD}: '{best['variant']}' on {env['device']} at D = 25.6M, n = 60, 4 bits "
             f"(commit {env['commit'][:7]}, {env['date'][:10]})")
    return best["frac_copy"], rec["copy_GBps"] * 1e9, where


def step_overhead(cfg: dict, n: int, bits: int, world: int, fraction: float, bandwidth: float,
                  tokens: int = TOKENS_PER_RANK) -> dict:
    """Seconds of the projections per step and their share of a step whose compute (6·P·tokens FLOPs
    per rank) runs at ASSUMED_MFU of the H100's bf16 peak."""
    proj = projection_traffic_bytes(cfg, n, bits, world) / (fraction * bandwidth)
    compute = 6 * parameter_count(cfg) * tokens / (ASSUMED_MFU * H100_BF16_FLOPS)
    return {"projection_s": proj, "compute_s": compute, "overhead": proj / compute}


# ---------------------------------------------------------------------------------------------- the plan
def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def min_ranks(cfg: dict, optimizer: str, n: int = 8, bits: int = 4, weights: str = "fp32") -> int:
    """The fewest 80 GB ranks (a power of two) whose state fits with a fifth of the memory left for
    activations."""
    world = 1
    while sum(state_bytes(cfg, optimizer, world, n, bits, weights=weights).values()) > 0.8 * H100_BYTES:
        world *= 2
    return world


def plan_markdown(measured: dict | None = None, world: int = 8) -> str:
    fraction, bandwidth, where = measured_kernel_fraction()
    lines = ["# TWA at 7B and 70B with FSDP2 on 8 × H100 (80 GB): the plan", "",
             "Written by `python -m benchmarks.scale` from the formulas of `benchmarks/scale_plan.py`; "
             "`tests/test_scale_plan.py` checks them against the measured 1B run. Per rank, FSDP2 "
             f"(`fully_shard` per decoder layer and at the root), world size {world}, fp32 master weights, "
             "bf16 all-gathers, fp32 reduce-scatters. GB = 10⁹ bytes. w̄ stays in host memory on GPU ranks.", ""]
    if measured is not None:
        lines += [f"Checked against: {measured['params']:,} parameters measured on {measured['environment']['device']} "
                  f"(commit {str(measured['environment']['commit'])[:10]}).", ""]
    for name, cfg in (("7B (Llama-2-7B shape)", LLAMA_7B), ("70B (Llama-2-70B shape)", LLAMA_70B)):
        rows = []
        adam = state_bytes(cfg, "adamw", world)
        rows.append(["full AdamW", "", _gb(adam["weights"]), _gb(adam["gradients"]), _gb(adam["optimizer_state"]),
                     "", _gb(sum(adam.values())), "yes" if sum(adam.values()) <= 0.8 * H100_BYTES else "no",
                     min_ranks(cfg, "adamw")])
        for n in (8, 16, 32):
            for bits in (4, 8):
                t = state_bytes(cfg, "twa", world, n, bits)
                total = sum(t.values())
                rows.append([f"TWA n={n}", bits, _gb(t["weights"]), _gb(t["gradients"]),
                             f"{t['optimizer_state'] / 1e6:.2f} MB", _gb(t["projection"]), _gb(total),
                             "yes" if total <= 0.8 * H100_BYTES else "no", min_ranks(cfg, "twa", n, bits)])
        for bits in (2, 4):
            t = state_bytes(cfg, "twa", world, 8, bits, weights="bf16")
            total = sum(t.values())
            rows.append(["TWA n=8, bf16 weights + bf16 residue", bits, _gb(t["weights"] + t["residue"]),
                         _gb(t["gradients"]), f"{t['optimizer_state'] / 1e6:.2f} MB", _gb(t["projection"]), _gb(total),
                         "yes" if total <= 0.8 * H100_BYTES else "no", min_ranks(cfg, "twa", 8, bits, "bf16")])
        coll = fsdp_collective_bytes(cfg, param_bytes=2, grad_bytes=4, n=8)
        over = {(n, b): step_overhead(cfg, n, b, world, fraction, bandwidth) for n in (8, 16, 32) for b in (4, 8)}
        lines += [f"## {name}: {parameter_count(cfg) / 1e9:.2f}B parameters, {layer_count(cfg)} TWA layers", "",
                  markdown_table(["optimizer", "bits", "weights GB", "gradients GB", "optimizer state", "P̃ GB",
                                  "state GB / rank", f"fits {world} × 80 GB (≤ 80 %)", "fewest ranks (power of 2)"],
                                 rows),
                  f"Collectives per step and rank (payload): all-gather {_gb(coll['all_gather'])} GB, reduce-scatter "
                  f"{_gb(coll['reduce_scatter'])} GB (the same for AdamW and TWA), TWA's all-reduce "
                  f"{coll['all_reduce'] / 1e3:.1f} kB (n = 8).", "",
                  "Projected TWA step overhead (the two projections over the measured kernel bandwidth, against "
                  f"6·P·{TOKENS_PER_RANK} FLOPs per rank at {ASSUMED_MFU:.0%} MFU of {H100_BF16_FLOPS / 1e12:.0f} "
                  "TFLOP/s):", "",
                  markdown_table(["n", "bits", "projections ms", "compute ms", "overhead"],
                                 [[n, b, f"{o['projection_s'] * 1e3:.1f}", f"{o['compute_s'] * 1e3:.0f}",
                                   f"{100 * o['overhead']:.1f} %"] for (n, b), o in over.items()])]
    lines += [f"Kernel bandwidth: {100 * fraction:.0f} % of the measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
              f"from {where} (a projection at n = 60; at n = 8 the kernel reads fewer columns per element, so "
              "this fraction is an assumption until a GPU run measures n = 8). Activations are not in the state "
              "columns: they depend on the batch and on activation checkpointing, and are the same for both "
              "optimizers.", ""]
    return "\n".join(lines)
