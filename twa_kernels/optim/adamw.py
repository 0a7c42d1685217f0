from __future__ import annotations

import torch

from .base import DEFAULT_INIT, ProjectedOptimizer


class ProjectedAdamW(ProjectedOptimizer):
    """AdamW on the per-layer coefficients β with gradient c = P̃ᵀg (torch.optim.AdamW's rule,
    decoupled weight decay β ← (1 − ηλ)β), then w ← w + P̃Δβ. See :class:`ProjectedSGD` for the
    TWA-specific arguments."""

    _buffer_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, space, lr: float = 0.03, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 backend: str = "auto", init=DEFAULT_INIT, average_after: int | None = None,
                 coordinates: str = "spread", nonfinite: str | None = None, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False):
        self._check_nonnegative(learning_rate=lr, epsilon=eps, weight_decay=weight_decay)
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, space, defaults, backend=backend, init=init, average_after=average_after,
                         coordinates=coordinates, nonfinite=nonfinite, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)

    def _rule(self, group, rows, x, grad):
        state = {k: self._buffers[k][rows] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in self._buffers}
        new_x, new_state = adamw_update(x, grad, state, self._step, **{k: group[k] for k in _HYPER})
        return {"x": new_x, **new_state}


_HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")


def adamw_update(x, grad, state: dict, step, *, lr, betas, eps, weight_decay, amsgrad, maximize):
    """One AdamW step on coordinates ``x`` with gradient ``grad`` (torch.optim.AdamW's rule, decoupled
    weight decay), as a pure function: (new x, new state) from x, the gradient, the state
    (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with ``amsgrad``) and the step count, already
    advanced to this step."""
    b1, b2 = betas
    g = -grad if maximize else grad
    m = state["exp_avg"].lerp(g, 1 - b1)
    v = state["exp_avg_sq"] * b2 + (1 - b2) * g * g
    out = {"exp_avg": m, "exp_avg_sq": v}
    bias1 = 1 - b1 ** step
    bias2_sqrt = (1 - b2 ** step).sqrt()
    if amsgrad:
        out["max_exp_avg_sq"] = v = torch.maximum(state["max_exp_avg_sq"], v)
    return x * (1 - lr * weight_decay) - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps), out
