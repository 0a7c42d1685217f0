"""TWA as every quality benchmark runs it: one configuration, fixed before any run, for every regime and seed.

The default recipe (what ``twa fit`` does too):

- **start**: :func:`twa_kernels.best_start` on the data TWA trains on (a few fixed batches of it), among the
  fixed merges the subspace contains: for one run's checkpoints the last one, LAWA k = 2, 4, 8, EMA
  (γ = 0.9) and the uniform merge; for fine-tunes given in no order the uniform merge, each model and the
  greedy soup;
- **optimizer**: ``ProjectedAdamW`` with its defaults (spread coordinates, constant lr 0.03), 4 bits;
- **end**: the average of the iterates of the second half of the budget (``average_after = steps // 2``,
  then ``swap_average()``).

The variants the benchmarks measure beside it (``start`` ∈ {"best", "last", "center"}, ``end`` ∈
{"average", "last", "cosine"}) are how the defaults were chosen: "last"/"last" is the package's earlier
default, and "cosine" decays the lr to zero over the budget instead of averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import twa_kernels as twa

STARTS = ("best", "last", "center")
ENDS = ("average", "last", "cosine")
DEFAULT_START, DEFAULT_END = "best", "average"


def label(start: str, end: str) -> str:
    """How a result table names a variant of the recipe ("" for the defaults)."""
    if (start, end) == (DEFAULT_START, DEFAULT_END):
        return ""
    return f" (start {start}, end {end})"


class TWARun:
    """A projected optimizer set up by the recipe: ``step()`` after each backward, ``finish()`` once."""

    def __init__(self, model: torch.nn.Module, space: twa.Subspace, steps: int,
                 evaluate: Callable[[torch.nn.Module], float] | None, *, ordered: bool = True,
                 start: str = DEFAULT_START, end: str = DEFAULT_END, init=None, **optimizer_kwargs):
        """``init``: a fixed start (averaging weights α) in place of ``start``'s."""
        if start not in STARTS or end not in ENDS:
            raise ValueError(f"start must be one of {STARTS} and end one of {ENDS}, got {start!r}, {end!r}")
        self.start = None
        if init is not None:
            start = "fixed"
        else:
            init = start
        if start == "best":
            if evaluate is None:
                raise ValueError("start='best' needs an evaluate function")
            self.start = init = twa.best_start(model, space, evaluate, ordered=ordered, progress=False)
        self.opt = twa.ProjectedAdamW(model.parameters(), space, init=init,
                                      average_after=steps // 2 if end == "average" else None, **optimizer_kwargs)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, steps) if end == "cosine" else None
        self.end = end

    def step(self) -> None:
        self.opt.step()
        if self.sched is not None:
            self.sched.step()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        if self.end == "average":
            self.opt.swap_average()

    def record(self) -> dict:
        """What the start search chose and cost, for the results file."""
        if self.start is None:
            return {}
        return {"start": self.start.name, "start_evaluations": self.start.evaluations,
                "start_seconds": round(self.start.seconds, 3)}
