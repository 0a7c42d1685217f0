"""Shared machinery of the projected optimizers (Algorithm 1 of the paper).

Per step: c = P̃ᵀg for every layer (one ``project``), the base optimizer's rule on β with gradient c
(vectorised over all layers: no per-layer Python on the hot path), then w += P̃Δβ in place (one
``expand``). β, its buffers and the step count are tensors on the parameters' device, so the whole
step can be captured in a CUDA graph with ``nonfinite="skip"``.
"""

from __future__ import annotations

import torch

from ..backends import make_engine
from ..subspace import Subspace
from .flat import FlatParameters

INIT_MODES = ("center", "last")
NONFINITE_MODES = ("raise", "skip")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _split_named(params):
    """Params as given to torch (tensors, (name, tensor) pairs, or group dicts) -> (tensor, name|None)."""
    out = []
    for group in params:
        items = group["params"] if isinstance(group, dict) else [group]
        if isinstance(items, torch.Tensor):
            items = [items]
        names = group.get("param_names") if isinstance(group, dict) else None
        for i, item in enumerate(items):
            if isinstance(item, tuple):
                out.append((item[1], item[0]))
            else:
                out.append((item, names[i] if names else None))
    return out


class ProjectedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_buffer_names`` and ``_rule``."""

    _buffer_names: tuple[str, ...] = ()

    def __init__(self, params, space: Subspace, defaults: dict, *, backend: str = "auto",
                 init: str = "center", nonfinite: str = "raise"):
        if not isinstance(space, Subspace):
            raise TypeError(f"space must be a twa_kernels.Subspace, got {type(space).__name__}")
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, e.g. model.parameters()")
        params = list(params)
        items = [(t, nm) for t, nm in _split_named(params) if t.requires_grad]
        # Everything is checked before the model is touched.
        ordered = self._match_to_space(items, space)
        devices = sorted({str(p.device) for p in ordered})
        if len(devices) > 1:
            raise ValueError(f"parameters are on different devices ({', '.join(devices)}); "
                             "TWA keeps all trainable parameters on one device per process")
        dtypes = sorted({str(p.dtype) for p in ordered})
        if len(dtypes) > 1:
            raise ValueError(f"parameters have mixed dtypes ({', '.join(dtypes)}); use one dtype")
        if ordered[0].dtype not in _FLOAT_DTYPES:
            raise ValueError(f"unsupported parameter dtype {ordered[0].dtype}")
        device = ordered[0].device
        placement = space.placement
        placement.check_backend(space.process_group, device)
        engine = make_engine(space.projection, device, backend, dtype=ordered[0].dtype)

        super().__init__(params, defaults)
        self._group_rows = self._layers_per_group(ordered, space)
        self.space = space
        self.backend = engine.name
        self._engine = engine
        self._nonfinite = nonfinite
        self._placement = placement
        self._comm = placement.communicator(space.process_group)
        self._flat = FlatParameters(ordered, placement.padded_numel(sum(p.numel() for p in ordered)))
        acc = torch.float64 if ordered[0].dtype == torch.float64 else torch.float32
        # β of the columns this rank holds (all of them unless column-sharded)
        shape = (space.num_layers, space.projection.layout.n)
        self._beta = torch.zeros(shape, dtype=acc, device=device)
        self._step = torch.zeros((), dtype=torch.float32 if acc == torch.float32 else acc, device=device)
        self._buffers = {name: torch.zeros(shape, dtype=acc, device=device) for name in self._buffer_names}
        low_precision = ordered[0].dtype in (torch.bfloat16, torch.float16)
        # Kahan residue of the rounded weights (of this rank's rows when row-sharded). bf16 for fp16
        # weights too: the residue of a small fp16 weight lies in fp16's subnormal range, while bf16
        # has fp32's exponent range.
        self._compensation = (torch.zeros(placement.owned(self._flat).numel(), dtype=torch.bfloat16, device=device)
                              if low_precision else None)
        self._update_buffer = placement.update_buffer(self._flat.numel, acc, device)
        beta0 = None
        if init == "last":
            onehot = torch.zeros(space.n, dtype=torch.float64)
            onehot[-1] = 1.0
            beta0 = space.beta_for_alphas(onehot).to(device, acc)[:, placement.column_slice(space.n)]
        self._place(beta0)

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _check_nonnegative(**values) -> None:
        for name, value in values.items():
            if value < 0.0:
                raise ValueError(f"invalid {name.replace('_', ' ')}: {value}")

    @staticmethod
    def _match_to_space(items, space):
        if len(items) != len(space.names):
            raise ValueError(f"the optimizer got {len(items)} trainable parameters, the subspace was "
                             f"built for {len(space.names)}")
        if all(nm is not None for _, nm in items):
            by_name = {nm: t for t, nm in items}
            unknown = [nm for nm in by_name if nm not in set(space.names)]
            if unknown:
                raise ValueError(f"parameters not in the subspace: {', '.join(unknown[:5])}")
            ordered = [by_name[nm] for nm in space.names]
        else:
            ordered = [t for t, _ in items]
        for t, nm, shape in zip(ordered, space.names, space.shapes):
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"parameter {nm!r}: the model's has shape {tuple(t.shape)}, the "
                                 f"subspace's {tuple(shape)} (pass parameters in model order, or pass named parameters, e.g. "
                                 f"model.named_parameters(), in any order)")
        if len({id(t) for t in ordered}) != len(ordered):
            raise ValueError("a parameter appears more than once")
        return ordered

    def _layers_per_group(self, ordered, space):
        """Per param group: the β rows (layers) it owns, as a slice when contiguous."""
        position = {id(p): i for i, p in enumerate(ordered)}
        if len(self.param_groups) == 1:
            return [slice(None)]
        if space.layers_mode == "model":
            raise ValueError("layers='model' has one β for the whole model: use a single param group")
        rows = []
        for group in self.param_groups:
            idx = sorted(position[id(p)] for p in group["params"] if id(p) in position)
            if idx and idx == list(range(idx[0], idx[-1] + 1)):
                rows.append(slice(idx[0], idx[-1] + 1))
            else:
                rows.append(torch.tensor(idx, dtype=torch.long, device=ordered[0].device))
        return rows

    def _apply_delta(self, delta) -> None:
        """weights += P̃ Δβ, with whatever communication the placement needs."""
        self._placement.apply(self._engine, self._flat, delta, self._compensation, self._comm,
                              self._update_buffer)

    def _place(self, beta) -> None:
        """weights = w̄ + P̃ β (β = 0 when None), compensation set so bf16 weights carry w̄ exactly."""
        owned = self._placement.owned(self._flat)
        center = self.space.center.to(owned.device)
        owned.copy_(center)
        if self._compensation is not None:
            self._compensation.copy_(center - owned.float())
        self._placement.synchronize(self._flat, self._comm)
        if beta is not None:
            self._apply_delta(beta)
            self._beta.copy_(beta)

    # ------------------------------------------------------------------ public API
    @property
    def beta(self) -> torch.Tensor:
        """[L, n] coefficients (a copy). Where the columns are split over ranks each holds only its own:
        call :meth:`gather_beta` on every rank instead (a collective)."""
        if self._beta.shape[1] != self.space.n:
            raise RuntimeError(f"this rank holds columns {self._placement.column_slice(self.space.n)} of β "
                               "only: call opt.gather_beta() on every rank to get all of them")
        return self._beta.detach().clone()

    def gather_beta(self) -> torch.Tensor:
        """[L, n] coefficients of every column, on every rank. Where the columns are split over ranks
        this is a collective: every rank of the group must call it."""
        return self._placement.gather_beta(self._beta, self.space.n, self.space.process_group)

    @property
    def comm_bytes(self) -> dict:
        """Payload bytes this rank gave each kind of collective so far (counted at every call)."""
        return {} if self._comm is None else dict(self._comm.payload)

    def alphas(self) -> torch.Tensor:
        """[L, n] averaging weights of the current point (see :meth:`Subspace.alphas`); a collective
        where the columns are split over ranks, like :meth:`gather_beta`."""
        return self.space.alphas(self.gather_beta())

    def sync_weights(self) -> None:
        """Set the weights to exactly w̄ + P̃β (e.g. after loading only the optimizer's state)."""
        self._place(self._beta.clone())

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The gradients are views of one flat buffer; zeroing it keeps them attached.
        self._flat.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        c = self._placement.project(self._engine, self._flat, self._comm)
        finite = torch.isfinite(c).all()
        if self._nonfinite == "raise":
            if not bool(finite):
                raise FloatingPointError(
                    "the gradient contains NaN or Inf (its projection P̃ᵀg is not finite); β, the "
                    "optimizer state and the weights were left unchanged")
            finite = None
        else:
            c = torch.where(finite, c, torch.zeros_like(c))
        old = self._beta.clone()
        self._step += 1 if finite is None else finite.to(self._step.dtype)
        for group, rows in zip(self.param_groups, self._group_rows):
            for name, new in self._rule(group, rows, c).items():
                # one guard for β and every buffer: a skipped step (nonfinite="skip") changes nothing
                target = self._beta if name == "beta" else self._buffers[name]
                target[rows] = new if finite is None else torch.where(finite, new, target[rows])
        self._apply_delta(self._beta - old)
        return loss

    def _rule(self, group, rows, c) -> dict:  # pragma: no cover - abstract
        """The new values of β (key "beta") and of the buffers that change, for the layers ``rows``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self):
        sd = super().state_dict()
        sd["twa"] = {
            "optimizer": type(self).__name__,
            "fingerprint": self.space.fingerprint,
            "beta": self._beta.clone(),
            "step": self._step.clone(),
            "buffers": {k: v.clone() for k, v in self._buffers.items()},
            "compensation": None if self._compensation is None else self._compensation.clone(),
            "shard": self._placement.state_tag(),
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        twa = state_dict.get("twa") if isinstance(state_dict, dict) else None
        if twa is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'twa' entry)")
        if twa.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict is from {twa.get('optimizer')}, not {type(self).__name__}")
        if twa.get("fingerprint") != self.space.fingerprint:
            raise ValueError(
                "state_dict comes from a different subspace (fingerprint "
                f"{twa.get('fingerprint')}, this optimizer's is {self.space.fingerprint})")
        here = self._placement.state_tag()
        if twa.get("shard") != here:
            def describe(x):
                return "one process" if x is None else f"rank {x['rank']} of {x['world_size']} ({x['mode']})"
            raise ValueError(f"state_dict was saved by {describe(twa.get('shard'))}, this optimizer is "
                             f"{describe(here)}: resume with the same world size and shard mode")
        if tuple(twa["beta"].shape) != tuple(self._beta.shape):
            raise ValueError(f"β has shape {tuple(twa['beta'].shape)}, expected {tuple(self._beta.shape)}")
        if set(twa["buffers"]) != set(self._buffers):
            raise ValueError(f"state_dict buffers {sorted(twa['buffers'])} do not match {sorted(self._buffers)}")
        comp = twa.get("compensation")
        if (comp is None) != (self._compensation is None):
            raise ValueError("state_dict was saved for parameters of another precision")
        plain = {k: v for k, v in state_dict.items() if k != "twa"}
        super().load_state_dict(plain)  # validates and loads the param groups (lr, …)
        self._beta.copy_(twa["beta"])
        self._step.copy_(twa["step"])
        for k, v in twa["buffers"].items():
            self._buffers[k].copy_(v)
        if comp is not None:
            self._compensation.copy_(comp)
