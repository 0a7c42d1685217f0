"""Merge weights that stand for a learning-rate decay (WSM, arXiv 2507.17634).

Run at a constant learning rate and save θ_1 … θ_k after the updates u_1 … u_k from θ_0. The merge
Σ_j c_j θ_j with Σ c = 1 equals θ_0 − Σ_i w_i u_i with w_i = Σ_{j≥i} c_j: the iterate of the same
updates re-weighted by a decay w that starts at w_1 = 1 (no weight is left on θ_0). Read backwards, a
decay curve f on [0, 1] with f(0) = 1 and f(1) = 0, sampled as w_i = f((i − 1)/k), gives the merge
weights c_j = w_j − w_{j+1} (w_{k+1} = 0). Linear decay gives the uniform merge.

The identity is exact for the recorded updates; a real decay would have taken its gradients at other
points, which is what a cooldown run measures and a merge does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["DECAY_FAMILIES", "decay_weights", "decay_merge_weights", "decay_of_merge", "check_merge_weights"]


def _linear(x: float, k: int) -> float:
    return 1.0 - x


def _cosine(x: float, k: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * x))


def _one_minus_sqrt(x: float, k: int) -> float:
    return 1.0 - math.sqrt(x)


def _inverse_sqrt(x: float, k: int) -> float:
    # An inverse-sqrt schedule η/√(1 + t) over the window, t counted in checkpoint intervals (t = k·x),
    # shifted and scaled so that it starts at 1 and reaches 0 after the last update.
    end = 1.0 / math.sqrt(1.0 + k)
    return (1.0 / math.sqrt(1.0 + k * x) - end) / (1.0 - end)


DECAY_FAMILIES = {"linear": _linear, "cosine": _cosine, "inverse-sqrt": _inverse_sqrt, "1-sqrt": _one_minus_sqrt}


def _family(family: str):
    try:
        return DECAY_FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown decay family {family!r}; expected one of {', '.join(DECAY_FAMILIES)}") from None


def decay_weights(k: int, family: str) -> list[float]:
    """The decay w_1 … w_k (w_1 = 1) that the merge of ``k`` constant-lr checkpoints with
    :func:`decay_merge_weights` stands for: update i's share of the learning rate."""
    if k < 1:
        raise ValueError(f"a merge window needs at least one checkpoint, got k = {k}")
    f = _family(family)
    return [f((i - 1) / k, k) for i in range(1, k + 1)]


def decay_merge_weights(k: int, family: str, reverse: bool = False) -> list[float]:
    """Merge weights c_1 … c_k (oldest first, summing to 1) of ``k`` checkpoints saved at a constant lr
    that equal a decay of ``family`` over the window; ``reverse`` flips them (Megatron's ``__reverse``)."""
    w = decay_weights(k, family) + [0.0]
    c = [w[j] - w[j + 1] for j in range(k)]
    return c[::-1] if reverse else c


def decay_of_merge(weights: Sequence[float]) -> list[float]:
    """w_i = Σ_{j≥i} c_j: the re-weighting of each update that a merge with ``weights`` applies."""
    out, acc = [], 0.0
    for c in reversed(list(weights)):
        acc += float(c)
        out.append(acc)
    return out[::-1]


def check_merge_weights(weights: Sequence[float], count: int) -> list[float]:
    """``weights`` as floats, checked to be one finite weight per checkpoint with a nonzero sum."""
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weight(s) for {count} checkpoint(s): give one weight per checkpoint")
    bad = [i for i, w in enumerate(weights) if not math.isfinite(w)]
    if bad:
        raise ValueError(f"weight {bad[0] + 1} is {weights[bad[0]]}: every weight must be finite")
    if math.fsum(weights) == 0.0:
        raise ValueError("the weights sum to 0: the merge would be no model (give weights that sum to 1 for an average)")
    return weights
