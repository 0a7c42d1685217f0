"""The merges of fine-tuned models that TWA-v is measured against, as the papers define them.

- greedy soup (Wortsman et al. 2022): :func:`twa_kernels.greedy_selection`, the package's one implementation;
- learned soup by layer (model soups' ``learned_bylayer.py``): a softmax weight over the N models for every
  parameter tensor and a scalar temperature on the logits, trained with AdamW (lr 0.05) on held-out data;
  every forward sums all N models, so all N live in memory;
- Model Stock (Jang et al. 2024, as mergekit implements it): per tensor, t = N·cos θ / (1 + (N − 1)·cos θ)
  with θ the mean pairwise angle between the task vectors θ_i − θ_0, merged = t·mean(θ_i) + (1 − t)·θ_0.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.func import functional_call

LEARNED_SOUP_LR = 0.05


def uniform(states: list[dict]) -> dict:
    return {k: sum(sd[k].double() for sd in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}


def learned_soup_by_layer(model: nn.Module, states: list[dict], batches, loss_fn, head: nn.Linear) -> tuple[dict, dict]:
    """Train the per-tensor softmax weights (from the uniform soup: logits 0) and a logit temperature on
    ``batches``; return the merged state (the temperature folded into ``head``'s weight and bias, which
    scales the logits exactly) and a record (steps, the bytes of the N stacked models it held)."""
    names = [n for n, _ in model.named_parameters()]
    stacked = {n: torch.stack([sd[n].float() for sd in states]) for n in names}  # all N models in memory
    buffers = {n: b for n, b in model.named_buffers()}
    logits = torch.zeros(len(names), len(states), requires_grad=True)
    temperature = torch.ones((), requires_grad=True)
    opt = torch.optim.AdamW([logits, temperature], lr=LEARNED_SOUP_LR)

    def merged(weights):
        return {n: torch.einsum("k,k...->...", weights[i], stacked[n]) for i, n in enumerate(names)}

    steps = 0
    model.train()
    for xb, yb in batches:
        params = merged(torch.softmax(logits, dim=1))
        out = functional_call(model, {**params, **buffers}, (xb,)) * temperature
        loss = loss_fn(out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    with torch.no_grad():
        state = {n: v.detach().clone() for n, v in merged(torch.softmax(logits, dim=1)).items()}
        head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
        for n in head_names:
            state[n] = state[n] * temperature.detach()
        full = dict(states[0])
        full.update(state)
    record = {"train_steps": steps, "state_bytes": sum(t.numel() * t.element_size() for t in stacked.values()),
              "temperature": float(temperature)}
    return full, record


def model_stock(base: dict, states: list[dict]) -> dict:
    """Model Stock's merge of ``states`` toward ``base`` (the pretrained model), tensor by tensor; entries
    that are not floating point come from the first fine-tune."""
    out = {}
    n = len(states)
    if n < 2:
        raise ValueError("Model Stock needs at least two fine-tunes")
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = states[0][k]
            continue
        deltas = [(sd[k].double() - b.double()).reshape(-1) for sd in states]
        cosines = [float(torch.nn.functional.cosine_similarity(a, c, dim=0)) for a, c in itertools.combinations(deltas, 2)]
        cos = sum(cosines) / len(cosines)
        t = n * cos / (1 + (n - 1) * cos) if (1 + (n - 1) * cos) != 0 else 0.0
        mean = sum(sd[k].double() for sd in states) / n
        out[k] = (t * mean + (1 - t) * b.double()).to(b.dtype)
    return out


def projected_state_bytes(parameters: int, n: int) -> dict:
    """What each learned merge holds beyond one fp32 model, for ``n`` fine-tunes of a model of
    ``parameters`` weights: the learned soup the N stacked fp32 models; TWA the 4-bit P̃ (n codes of 4 bits
    per weight, plus n scales) and the fp32 centre w̄."""
    return {"learned soup by layer": 4 * n * parameters, "TWA (4-bit P̃ + centre)": n * parameters // 2 + 4 * parameters}
