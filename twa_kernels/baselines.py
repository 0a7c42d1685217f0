"""The averaging baselines TWA is compared against, as functions over checkpoints.

Checkpoints are state_dicts or paths (``.pt`` loaded with ``weights_only=True``, ``.safetensors``),
read one at a time, so averaging many large checkpoints needs the memory of two. Floating-point
entries are averaged in float64 and returned in their own dtype; integer entries (BatchNorm's
``num_batches_tracked``) are taken from the last checkpoint. Averaged BatchNorm statistics do not
match averaged weights: recompute them with :func:`update_bn`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .checkpoints import open_source

__all__ = ["swa", "ema", "lawa", "greedy_soup", "update_bn", "load_state_dict"]


def load_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """A whole state_dict from a mapping or a file (never running code from the file)."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint)
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"expected a state_dict or a path, got {type(checkpoint).__name__}")
    source = open_source(checkpoint, [])
    return {k: source.rows(k, 0, None).reshape(source.shape(k)) for k in source.keys()}


def _weighted_mean(checkpoints: Sequence, weights: Sequence[float]) -> dict[str, torch.Tensor]:
    if len(checkpoints) == 0:
        raise ValueError("no checkpoints to average")
    if len(weights) != len(checkpoints):
        raise ValueError("one weight per checkpoint")
    acc: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for i, (ck, wt) in enumerate(zip(checkpoints, weights)):
        sd = load_state_dict(ck)
        if i == 0:
            ref = {k: v for k, v in sd.items()}
            acc = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in sd.items() if v.is_floating_point()}
        elif set(sd) != set(ref):
            raise ValueError(f"checkpoint {i} has other keys than checkpoint 0")
        for k, v in sd.items():
            if v.shape != ref[k].shape:
                raise ValueError(f"checkpoint {i}: {k!r} has shape {tuple(v.shape)}, checkpoint 0 {tuple(ref[k].shape)}")
            if k in acc:
                if not torch.isfinite(v).all():
                    raise ValueError(f"checkpoint {i}: {k!r} contains NaN or Inf")
                acc[k] += wt * v.detach().to("cpu", torch.float64)
            else:
                ref[k] = v  # integer entries: keep the last checkpoint's
    return {k: (acc[k].to(ref[k].dtype) if k in acc else ref[k].clone()) for k in ref}


def swa(checkpoints: Sequence) -> dict[str, torch.Tensor]:
    """Uniform average (Stochastic Weight Averaging over the given checkpoints)."""
    return _weighted_mean(checkpoints, [1.0 / len(checkpoints)] * len(checkpoints))


def ema(checkpoints: Sequence, gamma: float) -> dict[str, torch.Tensor]:
    """Exponential moving average in checkpoint order: m ← γ m + (1 − γ) w_i, starting at w_0."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    k = len(checkpoints)
    weights = [gamma ** (k - 1)] + [(1 - gamma) * gamma ** (k - 1 - i) for i in range(1, k)]
    return _weighted_mean(checkpoints, weights)


def lawa(checkpoints: Sequence, k: int) -> dict[str, torch.Tensor]:
    """Latest weight averaging: the uniform mean of the last ``k`` checkpoints."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return swa(list(checkpoints)[-k:])


def greedy_soup(model: torch.nn.Module, checkpoints: Sequence, evaluate: Callable[[torch.nn.Module], float],
                *, after_load: Callable[[torch.nn.Module], None] | None = None):
    """Greedy soup (Wortsman et al. 2022): sort checkpoints by ``evaluate`` (higher is better, e.g.
    validation accuracy), then add each to the soup if the uniform average does not get worse.

    ``after_load`` runs after each candidate is loaded (e.g. :func:`update_bn`). Returns
    ``(state_dict, chosen indices)``; the model is left holding the soup."""
    scores = []
    for ck in checkpoints:
        model.load_state_dict(load_state_dict(ck))
        if after_load is not None:
            after_load(model)
        scores.append(float(evaluate(model)))
    order = sorted(range(len(checkpoints)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        trial = swa([checkpoints[j] for j in chosen + [i]])
        model.load_state_dict(trial)
        if after_load is not None:
            after_load(model)
        score = float(evaluate(model))
        if score >= best:
            chosen.append(i)
            best = score
    soup = swa([checkpoints[j] for j in chosen])
    model.load_state_dict(soup)
    if after_load is not None:
        after_load(model)
    return soup, sorted(chosen)


@torch.no_grad()
def update_bn(loader, model: torch.nn.Module, device=None) -> None:
    """Recompute BatchNorm running statistics with one pass over ``loader`` (torch's own
    ``swa_utils.update_bn``); a model without BatchNorm is left as it is."""
    torch.optim.swa_utils.update_bn(loader, model, device=device)
