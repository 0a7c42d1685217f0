from __future__ import annotations

import torch

from .base import DEFAULT_INIT, ProjectedOptimizer

# Where weight decay pulls: "center" decays the coordinates (toward w̄, where β = 0); "zero" is L2 on the
# weights themselves (toward 0 in weight space), the decay of the ICLR-2023 code, where w = Qθ.
DECAY_TARGETS = ("center", "zero")


class ProjectedSGD(ProjectedOptimizer):
    """SGD on the per-layer coefficients β, with torch.optim.SGD's semantics applied to c = P̃ᵀg:

        d = c + λβ;  buf = μ·buf + (1 − τ)·d (buf = d at the first step);  d = d + μ·buf (Nesterov) or buf
        β ← β − η·d;  w ← w + P̃Δβ

    Args mirror ``torch.optim.SGD`` (``foreach``, ``fused``, ``capturable``, ``differentiable``: see
    :class:`~twa_kernels.optim.ProjectedOptimizer`); ``params`` are the model's trainable parameters in
    any grouping and order (plain tensors bind by identity to the model the subspace was built from or
    bound to, named ones by name); ``space`` is the :class:`~twa_kernels.Subspace`. TWA's own arguments:

    - ``init``: where training starts. "center" puts the model at w̄ (the uniform merge), "last" at the last
      checkpoint, averaging weights α (or the :class:`~twa_kernels.Start` that :func:`~twa_kernels.best_start`
      chose on data) at Σ α_i w_i, and "keep" leaves the weights as they are (for resuming when the model's
      weights were loaded before the optimizer was made).
    - ``average_after``: keep the running mean of β over the steps after this one; :meth:`swap_average`
      puts the weights there when training ends (None: no average).
    - ``backend`` (see :mod:`twa_kernels.backends`) and ``nonfinite`` ("raise", or "skip" to drop a step
      with a NaN/Inf gradient without a host sync; the default with ``capturable=True``).

    A parameter whose ``.grad`` is None contributes a zero gradient to its layer.
    """

    _buffer_names = ("momentum_buffer",)

    def __init__(self, params, space, lr: float = 0.1, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 decay_to: str = "center", backend: str = "auto", init=DEFAULT_INIT,
                 average_after: int | None = None, coordinates: str = "spread", nonfinite: str | None = None, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, differentiable: bool = False):
        self._check_nonnegative(learning_rate=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if decay_to not in DECAY_TARGETS:
            raise ValueError(f"decay_to must be one of {DECAY_TARGETS}, got {decay_to!r}")
        self.decay_to = decay_to
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, space, defaults, backend=backend, init=init, average_after=average_after,
                         coordinates=coordinates, nonfinite=nonfinite, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable)

    def _prepare(self, c) -> None:
        # ½λ‖w‖² of the weights themselves: its gradient λw, projected like the loss gradient
        self._weights_projected = None
        if self.decay_to == "zero" and any(g["weight_decay"] for g in self.param_groups):
            self._weights_projected = self._scale * self._placement.project_weights(
                self._engine, self._binding, self._comm).to(c.dtype)

    def _rule(self, group, rows, x, grad):
        state = {"momentum_buffer": self._buffers["momentum_buffer"][rows]} if group["momentum"] else {}
        toward = None if self._weights_projected is None else self._weights_projected[rows]
        new_x, new_state = sgd_update(x, grad, state, self._step, toward=toward,
                                      **{k: group[k] for k in _HYPER})
        return {"x": new_x, **new_state}


_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def sgd_update(x, grad, state: dict, step, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
               toward=None):
    """One SGD step on coordinates ``x`` with gradient ``grad`` (torch.optim.SGD's rule), as a pure
    function: (new x, new state) from x, the gradient, the state (``momentum_buffer`` with momentum) and
    the step count, already advanced to this step. Weight decay pulls ``x`` toward 0 (the centre), or
    adds ``weight_decay · toward`` when ``toward`` is given (the projected weights, for decay_to="zero")."""
    d = -grad if maximize else grad
    if weight_decay:
        d = d + weight_decay * (x if toward is None else toward)
    out = {}
    if momentum:
        buf = torch.where(step <= 1, d, momentum * state["momentum_buffer"] + (1 - dampening) * d)
        out["momentum_buffer"] = buf
        d = d + momentum * buf if nesterov else buf
    return x - lr * d, out
