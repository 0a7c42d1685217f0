"""The averaging baselines TWA is compared against, as functions over checkpoints.

Checkpoints are anything :mod:`twa_kernels.checkpoints` reads (state_dicts, ``.pt`` / ``.bin`` /
``.ckpt`` files loaded with ``weights_only=True``, ``.safetensors``, sharded indexes, Hugging Face and
``torch.distributed.checkpoint`` directories; wrappers unwrapped by the same rule), read one at a time,
so averaging many large checkpoints needs the memory of two. Floating-point
entries are averaged in float64 and returned in their own dtype; integer entries (BatchNorm's
``num_batches_tracked``) are taken from the last checkpoint. Averaged BatchNorm statistics do not
match averaged weights: recompute them with :func:`update_bn`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoints import label, load_state_dict, open_checkpoint

__all__ = ["swa", "ema", "ema_weights", "lawa", "lawa_weights", "greedy_soup", "greedy_selection", "update_bn",
           "load_state_dict", "weighted_mean", "open_matching", "average_tensor"]


def weighted_mean(checkpoints: Sequence, weights: Sequence[float], *, key_map=None, trusted: bool = False,
                  progress: bool | None = False) -> dict[str, torch.Tensor]:
    """Σ_i weights[i] · checkpoint_i for every floating-point entry (in float64, returned in the entry's
    own dtype); integer entries from the last checkpoint. Checkpoints are read one tensor at a time."""
    if len(checkpoints) == 0:
        raise ValueError("no checkpoints to average")
    if len(weights) != len(checkpoints):
        raise ValueError("one weight per checkpoint")
    sources = open_matching(checkpoints, key_map=key_map, trusted=trusted)
    keys = list(sources[0].keys())
    bar = tqdm(keys, desc="averaging", unit="tensor", disable=(None if progress is None else not progress))
    return {k: average_tensor(sources, weights, k) for k in bar}


def open_matching(checkpoints: Sequence, *, key_map=None, trusted: bool = False) -> list:
    """The checkpoints' sources, checked to hold the same names with the same shapes."""
    sources = [open_checkpoint(ck, key_map=key_map, trusted=trusted, where=label(ck, i))
               for i, ck in enumerate(checkpoints)]
    first = sources[0]
    keys = list(first.keys())
    for source in sources[1:]:
        if set(source.keys()) != set(keys):
            extra = sorted(set(source.keys()) ^ set(keys))[:3]
            raise ValueError(f"{source.label} has other keys than {first.label} (e.g. {', '.join(map(repr, extra))})")
        for k in keys:
            if source.shape(k) != first.shape(k):
                raise ValueError(f"{source.label}: {k!r} has shape {source.shape(k)}, {first.label} has "
                                 f"{first.shape(k)}")
    return sources


def average_tensor(sources, weights: Sequence[float], key: str) -> torch.Tensor:
    """Σ_i weights[i] · tensor ``key`` of source i, in float64, returned in the tensor's dtype; an integer
    tensor is the last source's."""
    first = sources[0]
    dtype = first.dtype(key)
    if not dtype.is_floating_point:
        return sources[-1].tensor(key).clone()
    acc = torch.zeros(first.shape(key), dtype=torch.float64)
    for source, wt in zip(sources, weights):
        v = source.tensor(key)
        if not torch.isfinite(v).all():
            raise ValueError(f"{source.label}: {key!r} contains NaN or Inf")
        if wt:
            acc += wt * v.detach().to("cpu", torch.float64)
    return acc.to(dtype)


def swa(checkpoints: Sequence, **read) -> dict[str, torch.Tensor]:
    """Uniform average (Stochastic Weight Averaging over the given checkpoints). ``read``: ``key_map``,
    ``trusted``, ``progress`` as for :func:`weighted_mean`."""
    return weighted_mean(checkpoints, [1.0 / len(checkpoints)] * len(checkpoints), **read)


def ema(checkpoints: Sequence, gamma: float, **read) -> dict[str, torch.Tensor]:
    """Exponential moving average in checkpoint order: m ← γ m + (1 − γ) w_i, starting at w_0."""
    return weighted_mean(checkpoints, ema_weights(len(checkpoints), gamma), **read)


def ema_weights(k: int, gamma: float) -> list[float]:
    """The weight of each of ``k`` checkpoints in their EMA: γ^(k−1) for the first, (1 − γ)γ^(k−1−i) after."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
    return [gamma ** (k - 1)] + [(1 - gamma) * gamma ** (k - 1 - i) for i in range(1, k)]


def lawa(checkpoints: Sequence, k: int, **read) -> dict[str, torch.Tensor]:
    """Latest weight averaging: the uniform mean of the last ``k`` checkpoints (all of them when fewer)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return weighted_mean(checkpoints, lawa_weights(len(checkpoints), min(k, len(checkpoints))), **read)


def lawa_weights(n: int, k: int) -> list[float]:
    """The weight of each of ``n`` checkpoints in the mean of the last ``k`` (e.g. a projected
    optimizer's ``init=lawa_weights(space.n, 4)``)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] for {n} checkpoints, got {k}")
    return [0.0] * (n - k) + [1.0 / k] * k


def greedy_selection(scores: Sequence[float], score_of: Callable[[list[int]], float]) -> tuple[list[int], float]:
    """Greedy soup's choice (Wortsman et al. 2022), given each model's own score (higher is better) and
    ``score_of(indices)``, the score of the uniform average of those models: start with the best model, try
    the others best first, and keep each one whose addition does not lower the soup's score (≥: a model
    that leaves the score exactly as it is joins; the released code's strict > would leave it out, which
    only differs on exact ties). Returns (the kept indices in the order they joined, the soup's score);
    ``score_of`` runs once per model after the first. Ties in ``scores`` go to the earlier index."""
    if not scores:
        raise ValueError("greedy selection needs at least one model")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen, best = [order[0]], float(scores[order[0]])
    for i in order[1:]:
        score = float(score_of(chosen + [i]))
        if score >= best:
            chosen.append(i)
            best = score
    return chosen, best


def greedy_soup(model: torch.nn.Module, checkpoints: Sequence, evaluate: Callable[[torch.nn.Module], float],
                *, after_load: Callable[[torch.nn.Module], None] | None = None):
    """Greedy soup (Wortsman et al. 2022): sort checkpoints by ``evaluate`` (higher is better, e.g.
    validation accuracy), then add each to the soup if the uniform average does not get worse (see
    :func:`greedy_selection`).

    ``after_load`` runs after each candidate is loaded (e.g. :func:`update_bn`). Returns
    ``(state_dict, chosen indices)``; the model is left holding the soup."""
    def score(state) -> float:
        model.load_state_dict(state)
        if after_load is not None:
            after_load(model)
        return float(evaluate(model))

    scores = [score(load_state_dict(ck)) for ck in checkpoints]
    chosen, _ = greedy_selection(scores, lambda idx: score(swa([checkpoints[j] for j in idx])))
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
