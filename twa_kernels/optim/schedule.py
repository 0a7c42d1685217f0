"""The learning-rate schedule recommended within a TWA budget, built from torch's own schedulers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_decay(optimizer: torch.optim.Optimizer, total_steps: int, milestones: Sequence[float] = (0.5, 0.8),
               gamma: float = 0.1) -> torch.optim.lr_scheduler.MultiStepLR:
    """The paper's schedule: the learning rate times ``gamma`` at each fraction ``milestones`` of a budget
    of ``total_steps`` optimizer steps (call ``scheduler.step()`` after every ``opt.step()``). A plain
    :class:`torch.optim.lr_scheduler.MultiStepLR`, so it composes, saves and resumes like any other."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if any(not 0.0 < m < 1.0 for m in milestones) or list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing fractions of the budget in (0, 1), got {tuple(milestones)}")
    steps = sorted({max(1, round(m * total_steps)) for m in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
