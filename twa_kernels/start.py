"""Where TWA starts: the best of the fixed merges its subspace contains, judged on the user's data.

Every fixed merge of the checkpoints is a point of TWA's subspace: the last checkpoint, LAWA, EMA, the
uniform merge, each single model, a greedy soup. Starting at the best of them (rather than at one fixed
choice) means TWA begins where a free merge already is and spends its budget improving on it: the last
checkpoint of a stable phase is the noisiest point of its window, and in a soup of fine-tunes given in no
order "the last one" is an arbitrary model.

    start = twa.best_start(model, space, evaluate)        # evaluate(model) -> loss on a few fixed batches
    opt = twa.ProjectedAdamW(model.parameters(), space, init=start)
    print(start)                                         # which merge, every candidate's loss, the cost

Each candidate costs one P̃β (the optimizer's own placement, so the point is the one TWA starts from, as
4-bit P̃ represents it) and one ``evaluate``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .baselines import ema_weights, greedy_selection, lawa_weights
from .optim import ProjectedSGD
from .subspace import Subspace

LAWA_KS = (2, 4, 8)
EMA_GAMMA = 0.9


@dataclass(frozen=True)
class Start:
    """The start :func:`best_start` chose: pass it as ``init=`` to a projected optimizer (it stands for
    its averaging weights ``alpha``)."""

    name: str                  # the chosen merge, e.g. "LAWA (k=4)" or "greedy soup (3 of 8)"
    alpha: torch.Tensor        # [n] float64 averaging weights, summing to 1
    loss: float                # its loss under ``evaluate``
    losses: dict = field(default_factory=dict)  # every candidate's loss, in the order evaluated
    evaluations: int = 0       # calls of ``evaluate``
    seconds: float = 0.0       # wall time of the search
    members: tuple = ()        # for a greedy soup: the models it kept (indices into the checkpoints)

    def __str__(self) -> str:
        others = ", ".join(f"{k} {v:.4f}" for k, v in self.losses.items() if k != self.name)
        return (f"start: {self.name} (loss {self.loss:.4f}) of {len(self.losses)} candidates [{others}]; "
                f"{self.evaluations} evaluations, {self.seconds:.1f} s")


def run_candidates(n: int) -> dict[str, list[float]]:
    """The fixed merges of ``n`` checkpoints of one run, oldest first: the last one, LAWA over the last 2,
    4 and 8, EMA (γ = 0.9) and the uniform merge (duplicates dropped, e.g. LAWA k = n is the uniform)."""
    out = {"last checkpoint": lawa_weights(n, 1)}
    for k in LAWA_KS:
        if k < n:
            out[f"LAWA (k={k})"] = lawa_weights(n, k)
    out[f"EMA (γ={EMA_GAMMA})"] = ema_weights(n, EMA_GAMMA)
    out["uniform"] = [1.0 / n] * n
    return out


def subset_weights(n: int, members, among=None) -> list[float]:
    """α of the uniform average of ``members`` (indices into ``among``, default range(n)) over n points."""
    among = list(range(n)) if among is None else list(among)
    chosen = {among[i] for i in members}
    return [1.0 / len(chosen) if j in chosen else 0.0 for j in range(n)]


def greedy_soup_name(kept, m: int) -> str:
    """How the candidates name the greedy soup that kept ``kept`` of ``m`` models."""
    return f"greedy soup ({len(kept)} of {m})"


def greedy_by_loss(n: int, loss_at: Callable, among=None) -> tuple[list[float], tuple, float]:
    """Greedy soup by loss (lower is better) over the models among n points, each merge scored by
    ``loss_at(α)``: every single model's loss, then :func:`~twa_kernels.baselines.greedy_selection` on them.
    ``among``: the indices of the n points that are models (default all). Returns (each model's loss, the
    kept models as sorted indices into ``among``, the soup's loss)."""
    among = list(range(n)) if among is None else list(among)
    single = [loss_at(subset_weights(n, [i], among)) for i in range(len(among))]

    def soup_score(idx):
        return -loss_at(subset_weights(n, idx, among))

    kept, best = greedy_selection([-x for x in single], soup_score)
    return single, tuple(sorted(kept)), -best


def soup_candidates(n: int, loss_at: Callable, among=None) -> tuple[dict, dict, tuple]:
    """The merges of models given in no order, each scored by ``loss_at(α)``: the uniform soup, every single
    model and the greedy soup (:func:`greedy_by_loss` on those scores; listed only when it keeps more than
    one model). ``among``: the indices of the n points that are models (default all; a pretrained base
    point is left out). Returns ({name: loss}, {name: α}, the greedy soup's members as indices into
    ``among``); names are "uniform", "model i" (i counts within ``among``) and "greedy soup (k of m)"."""
    among = list(range(n)) if among is None else list(among)
    m = len(among)
    alphas = {"uniform": subset_weights(n, range(m), among)}
    losses = {"uniform": loss_at(alphas["uniform"])}
    single, kept, soup_loss = greedy_by_loss(n, loss_at, among)
    for i, loss in enumerate(single):
        losses[f"model {i}"], alphas[f"model {i}"] = loss, subset_weights(n, [i], among)
    if len(kept) > 1:  # a soup of one model is that model, already a candidate
        name = greedy_soup_name(kept, m)
        losses[name], alphas[name] = soup_loss, subset_weights(n, kept, among)
    return losses, alphas, kept


def best_start(model: torch.nn.Module, space: Subspace, evaluate: Callable[[torch.nn.Module], float], *,
               ordered: bool = True, candidates: Mapping[str, object] | None = None, backend: str = "auto",
               progress: bool | None = None) -> Start:
    """Evaluate the fixed merges in ``space`` and return the one with the lowest loss, leaving ``model``
    there. ``evaluate(model) -> loss`` is the user's (lower is better), run under ``torch.no_grad``; it
    should score the same batches every call (a few batches of the data TWA will train on, or a
    held-out slice) and put the model in eval mode if it has dropout.

    ``ordered=True``: the checkpoints are one run's, oldest first; the candidates are the last one, LAWA
    k = 2, 4, 8, EMA (γ = 0.9) and the uniform merge. ``ordered=False``: the checkpoints are models given in
    no order (a soup of fine-tunes); the candidates are the uniform merge, every single model and the greedy
    soup built from those scores (:func:`twa_kernels.baselines.greedy_selection`), so the result does not
    depend on the order the models were given in. ``candidates``: further merges to consider, by name, as
    averaging weights α ([n] or [L, n], summing to 1). Ties go to the candidate evaluated first."""
    start_time = time.perf_counter()
    n = space.n
    placer = ProjectedSGD(model.parameters(), space, lr=0.0, init="keep", backend=backend)
    losses: dict[str, float] = {}
    alphas: dict[str, torch.Tensor] = {}
    members: dict[str, tuple] = {}
    bar = tqdm(desc="choosing the start", unit="merge", disable=None if progress is None else not progress)
    evaluations = [0]

    def loss_at(alpha) -> float:
        placer._place_alphas(torch.as_tensor(alpha, dtype=torch.float64))
        with torch.no_grad():
            value = float(evaluate(model))
        evaluations[0] += 1
        bar.update(1)
        return value if math.isfinite(value) else math.inf

    def consider(name: str, alpha, loss: float | None = None) -> float:
        losses[name] = loss_at(alpha) if loss is None else loss
        alphas[name] = torch.as_tensor(alpha, dtype=torch.float64)
        bar.set_postfix(best=f"{min(losses.values()):.4f}")
        return losses[name]

    if ordered:
        for name, alpha in run_candidates(n).items():
            consider(name, alpha)
    else:
        found, alpha_of, kept = soup_candidates(n, loss_at)
        for name, loss in found.items():
            consider(name, alpha_of[name], loss)
        if kept:
            members[greedy_soup_name(kept, n)] = kept
    for name, alpha in (candidates or {}).items():
        consider(str(name), alpha)
    bar.close()
    if not any(math.isfinite(v) for v in losses.values()):
        raise ValueError("best_start: evaluate returned NaN or Inf for every candidate")
    best = min(losses, key=lambda k: losses[k])  # the first of equal losses: dicts keep the order evaluated
    placer._place_alphas(alphas[best])
    return Start(name=best, alpha=alphas[best], loss=losses[best], losses=dict(losses), evaluations=evaluations[0],
                 seconds=time.perf_counter() - start_time, members=members.get(best, ()))
