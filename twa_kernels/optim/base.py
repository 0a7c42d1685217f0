"""Shared machinery of the projected optimizers (Algorithm 1 of the paper).

Per step: c = P̃ᵀg for every layer (one ``project``), the base optimizer's rule on β with gradient c
(vectorised over all layers: no per-layer Python on the hot path), then w += P̃Δβ in place (one
``expand``). β, its buffers and the step count are tensors on the parameters' device, so the whole
step can be captured in a CUDA graph with ``nonfinite="skip"`` (``capturable=True``).

The parameters stay the user's tensors (:mod:`.binding`): the kernels read them and their gradients
by address, and when the model moved or was cast after the optimizer was made, the next step follows
it (P̃, β and the optimizer state go where the parameters went).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch.profiler import record_function

from ..backends import make_engine
from ..backends.numerics import accumulation_dtype
from ..baselines import lawa_weights
from ..subspace import COORDINATES, Subspace
from .binding import ParameterBinding, bind_parameters

INIT_MODES = ("center", "last", "keep")
NONFINITE_MODES = ("raise", "skip")
# The profiler's names for the step's two projections (torch.profiler shows their time in every step).
PROJECT_EVENT, APPLY_EVENT = "twa.project (P^T g)", "twa.apply (P beta)"
# The start without data: the centre w̄ (the uniform merge), chosen by measurement over every regime of the
# benchmarks (docs/method.md): it ties or beats the last checkpoint everywhere but the early part of a
# run, where it is 0.005 bpc behind, and beats it by 0.006-0.029 bpc in the windows of a warmup-stable-decay
# run, whose last checkpoint is their noisiest point. With data, twa.best_start chooses better than either.
DEFAULT_INIT = "center"


def initial_alphas(init, space: Subspace) -> torch.Tensor | None:
    """The averaging weights α ([n] or [L, n], float64) an ``init`` asks for; None for "center" (β = 0)
    and "keep" (the weights are left as they are). Checked before the model is touched."""
    init = getattr(init, "alpha", init)  # a twa.Start (what best_start chose) stands for its α
    if isinstance(init, str):
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES} or averaging weights α, got {init!r}")
        return torch.tensor(lawa_weights(space.n, 1), dtype=torch.float64) if init == "last" else None
    alpha = torch.as_tensor(init, dtype=torch.float64).detach().cpu()
    if tuple(alpha.shape) not in ((space.n,), (space.num_layers, space.n)):
        raise ValueError(f"init: averaging weights α must have shape ({space.n},) or "
                         f"({space.num_layers}, {space.n}) for {space.n} checkpoints, got {tuple(alpha.shape)}")
    if not bool(torch.isfinite(alpha).all()):
        raise ValueError("init: the averaging weights α contain NaN or Inf")
    sums = alpha.sum(dim=-1)
    if not bool(torch.allclose(sums, torch.ones_like(sums), rtol=0.0, atol=1e-6)):
        raise ValueError(f"init: averaging weights α must sum to 1 (per layer), got sums "
                         f"{sums.flatten()[:4].tolist()} (so that Σ α_i w_i is an average of the checkpoints)")
    return alpha


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


def twa_state(state_dict) -> dict | None:
    """TWA's record (β, buffers, step, fingerprint, …) in a projected optimizer's state_dict: in the
    per-parameter state (where this version keeps it), or at the top level (earlier versions)."""
    if not isinstance(state_dict, dict):
        return None
    if isinstance(state_dict.get("twa"), dict):
        return state_dict["twa"]
    for entry in (state_dict.get("state") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("twa"), dict):
            return entry["twa"]
    return None


class ProjectedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_buffer_names`` and ``_rule``, which calls the rule's pure function
    (``adamw_update``, ``sgd_update``: (x, gradient, state, step, hyper-parameters) → (new x, new state),
    as torch.optim's functional ``adamw``); this class does the projections, the coordinates, the
    placements and the bookkeeping around it.

    torch.optim's flags: ``maximize`` is honoured; ``foreach`` and ``fused`` are accepted (the rule is one
    set of tensor operations over all layers and the projection is fused whatever they say);
    ``capturable=True`` means a step with no host synchronisation, so it implies ``nonfinite="skip"``;
    ``differentiable=True`` is refused (the step is not differentiable through the kernels)."""

    _buffer_names: tuple[str, ...] = ()

    def __init__(self, params, space: Subspace, defaults: dict, *, backend: str = "auto",
                 init=DEFAULT_INIT, average_after: int | None = None, coordinates: str = "spread",
                 nonfinite: str | None = None, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False):
        if not isinstance(space, Subspace):
            raise TypeError(f"space must be a twa_kernels.Subspace, got {type(space).__name__}")
        alpha0 = initial_alphas(init, space)
        if average_after is not None and (isinstance(average_after, bool) or not isinstance(average_after, int)
                                          or average_after < 0):
            raise ValueError(f"average_after must be a step count ≥ 0 or None, got {average_after!r}")
        if coordinates not in COORDINATES:
            raise ValueError(f"coordinates must be one of {COORDINATES}, got {coordinates!r}")
        if differentiable:
            raise ValueError("differentiable=True is not supported: the projected step runs fused kernels "
                             "that autograd does not differentiate through")
        if nonfinite is None:
            nonfinite = "skip" if capturable else "raise"
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if capturable and nonfinite == "raise":
            raise ValueError("capturable=True needs nonfinite='skip': raising on a NaN/Inf gradient needs a host sync")
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, e.g. model.parameters()")
        params = list(params)
        items = [(t, nm) for t, nm in _split_named(params) if t.requires_grad]
        # Everything is checked before the model is touched.
        ordered = bind_parameters(items, space.names, space.shapes, space.bound_parameters())
        binding = ParameterBinding(ordered, space.names)
        space.placement.check_backend(space.process_group, binding.device)
        space.placement.check_parameters(binding)
        self._backend_request = backend
        engine = self._make_engine(space, binding)

        defaults = dict(defaults, foreach=foreach, fused=fused, capturable=capturable, differentiable=False)
        super().__init__(params, defaults)
        self._groups_fixed = True
        self.space = space
        self._binding = binding
        self._engine = engine
        self.backend = engine.name
        self._nonfinite = nonfinite
        self._placement = space.placement
        self._comm = self._placement.communicator(space.process_group)
        acc = accumulation_dtype(binding.dtype)
        device = binding.device
        # β of the columns this rank holds (all of them unless column-sharded)
        shape = (space.num_layers, space.projection.layout.n)
        self._beta = torch.zeros(shape, dtype=acc, device=device)
        self._step = torch.zeros((), dtype=acc, device=device)
        self._buffers = {name: torch.zeros(shape, dtype=acc, device=device) for name in self._buffer_names}
        # The running mean of β after each step past ``average_after`` (n·L numbers: free per step), and
        # how many steps it holds; swap_average() puts the weights there.
        self.average_after = average_after
        self._average = None if average_after is None else torch.zeros(shape, dtype=acc, device=device)
        self._average_count = None if average_after is None else torch.zeros((), dtype=acc, device=device)
        self._swapped = False
        self.coordinates = coordinates
        # β = scale · x per layer: the rule runs on x, in units of the layer's own checkpoint spread
        self._scale = self._coordinate_scale(device, acc)
        self._compensation = self._new_compensation()
        self._group_rows = self._layers_per_group(ordered, space)
        self._placed_versions = None
        if init != "keep":
            self._place_alphas(alpha0)
            self._placed_versions = self._versions()
        self._follow_replaced_parameters(space)
        self._publish_state()

    # ------------------------------------------------------------------ set-up helpers
    @staticmethod
    def _check_nonnegative(**values) -> None:
        for name, value in values.items():
            if value < 0.0:
                raise ValueError(f"invalid {name.replace('_', ' ')}: {value}")

    def _make_engine(self, space, binding):
        layout = space.projection.layout
        return make_engine(space.projection, binding.device, self._backend_request, dtype=binding.dtype,
                           segments=space.placement.segments(layout, binding))

    def _coordinate_scale(self, device, dtype) -> torch.Tensor:
        return self.space.coordinate_scale(self.coordinates).to(device, dtype)[:, None]

    def _new_compensation(self):
        """Kahan residue of the rounded weights this rank updates, for bf16/fp16 weights. bf16 for fp16
        weights too: the residue of a small fp16 weight lies in fp16's subnormal range, while bf16 has
        fp32's exponent range."""
        if self._binding.dtype not in (torch.bfloat16, torch.float16):
            return None
        owned = sum(t.numel() for t in self._placement.owned(self._binding))
        return torch.zeros(owned, dtype=torch.bfloat16, device=self._binding.device)

    def _versions(self):
        """The parameters' in-place modification counters: whether anyone wrote them since."""
        return [p._version for p in self._binding.params]

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

    def add_param_group(self, param_group) -> None:
        if getattr(self, "_groups_fixed", False):
            raise ValueError("a projected optimizer trains the layers its subspace was built for: parameters cannot "
                             "be added (build a subspace that includes them, and a new optimizer)")
        super().add_param_group(param_group)

    def _follow_replaced_parameters(self, space) -> None:
        """When the subspace is bound to a model, ``model.load_state_dict(..., assign=True)`` replaces its
        Parameter objects: the next step then takes the model's new ones (by name)."""
        model = space.bound_model()
        if model is None:
            return
        self._replaced = False
        me = weakref.ref(self)

        def mark(module, incompatible_keys):
            opt = me()
            if opt is not None:
                opt._replaced = True

        self._hook = model.register_load_state_dict_post_hook(mark)
        self._owners = self._locate_owners(model)

    def _locate_owners(self, model):
        """Where each layer's Parameter lives, to see `module.weight = nn.Parameter(...)` (or a submodule
        replaced and gone) at the next step with one dict lookup per parameter; None when the optimizer
        holds other tensors than the model's own (nothing to follow)."""
        owners = []
        for nm, p in zip(self.space.names, self._binding.params):
            prefix, _, attr = nm.rpartition(".")
            try:
                module = model.get_submodule(prefix)
            except AttributeError:
                return None
            if module._parameters.get(attr) is not p:
                return None
            owners.append((weakref.ref(module), attr))  # weak: the model stays the user's
        return owners

    def _parameter_objects_replaced(self) -> bool:
        owners = getattr(self, "_owners", None)
        if not owners:
            return False
        for (module, attr), p in zip(owners, self._binding.params):
            m = module()
            if m is None or m._parameters.get(attr) is not p:  # a gone module was replaced in the model
                return True
        return False

    def _rebind(self) -> None:
        """Take the bound model's current parameters for every layer (they were replaced)."""
        self._replaced = False
        current = self.space.bound_parameters()
        if current is None:
            return
        new = [current.get(nm) for nm in self.space.names]
        lost = [nm for nm, t in zip(self.space.names, new) if t is None]
        if lost:
            raise ValueError(f"the model no longer has parameter(s) {', '.join(map(repr, lost[:5]))} of the subspace")
        old_to_new = {id(o): t for o, t in zip(self._binding.params, new) if o is not t}
        if old_to_new:
            for group in self.param_groups:
                group["params"] = [old_to_new.get(id(p), p) for p in group["params"]]
            self._binding.replace(new)
        if getattr(self, "_owners", None):  # the modules that hold them now (a gone one is not looked at again)
            self._owners = self._locate_owners(self.space.bound_model())
        if old_to_new:
            self._publish_state()

    def _follow(self) -> None:
        """After a storage changed: where the parameters went, P̃, β and the state go (O(L) when nothing
        moved)."""
        if getattr(self, "_replaced", False) or self._parameter_objects_replaced():
            self._rebind()
        old_device, old_dtype = self._binding.device, self._binding.dtype
        if not self._binding.moved():
            return
        device, dtype = self._binding.device, self._binding.dtype
        if (device, dtype) == (old_device, old_dtype):
            return  # e.g. a replaced p.data on the same device: the new addresses are read as they are
        self._placement.check_backend(self.space.process_group, device)
        self._engine = self._make_engine(self.space, self._binding)
        self.backend = self._engine.name
        acc = accumulation_dtype(dtype)
        self._beta = self._beta.to(device, acc)
        self._step = self._step.to(device, acc)
        self._buffers = {k: v.to(device, acc) for k, v in self._buffers.items()}
        if self._average is not None:
            self._average = self._average.to(device, acc)
            self._average_count = self._average_count.to(device, acc)
        self._scale = self._coordinate_scale(device, acc)  # from fp64, as an optimizer made after the cast
        self._group_rows = [r.to(device) if isinstance(r, torch.Tensor) else r for r in self._group_rows]
        if dtype == old_dtype:
            if self._compensation is not None:
                self._compensation = self._compensation.to(device)
        else:
            # The weights are left as the cast made them; bf16/fp16 weights get the residue that makes
            # (weight, residue) carry w̄ + P̃β again.
            self._compensation = self._new_compensation()
            if self._compensation is not None:
                self._compensation.copy_(self._exact_point() - torch.cat(
                    [t.reshape(-1) for t in self._placement.owned(self._binding)]).float())
        self._publish_state()

    @torch.no_grad()
    def _exact_point(self) -> torch.Tensor:
        """fp32 w̄ + P̃β of the weights this rank updates, computed aside (the weights are not touched)."""
        center = self.space.center.to(self._binding.device, torch.float32, copy=True)  # the point is built in it
        return self._placement.point(self._engine, self._binding, center, self._beta, self._comm)

    def _apply_delta(self, delta) -> None:
        """weights += P̃ Δβ, with whatever communication the placement needs."""
        self._placement.apply(self._engine, self._binding, delta, self._compensation, self._comm)

    def _local_beta(self, alpha) -> torch.Tensor:
        """The β of averaging weights α, in this optimizer's dtype and device, for the columns it holds."""
        beta = self.space.beta_for_alphas(alpha).to(self._beta.device, self._beta.dtype)
        return beta[:, self._placement.column_slice(self.space.n)]

    def _place_alphas(self, alpha) -> None:
        """weights = Σ α_i w_i as P̃ represents it (the centre for α = None), β accordingly."""
        self._place(None if alpha is None else self._local_beta(alpha))

    @torch.no_grad()
    def _place(self, beta) -> None:
        """weights = w̄ + P̃ β (β = 0 when None), compensation set so bf16 weights carry w̄ exactly."""
        owned = self._placement.owned(self._binding)
        center = self.space.center.to(self._binding.device)
        parts = center.split([t.numel() for t in owned])
        torch._foreach_copy_([t.view(-1) for t in owned], list(parts))
        if self._compensation is not None:
            self._compensation.copy_(center - torch.cat([t.reshape(-1) for t in owned]).float())
        self._placement.synchronize(self._binding, self._comm)
        if beta is not None:
            self._apply_delta(beta)
            self._beta.copy_(beta)
        else:
            self._beta.zero_()

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

    def named_alphas(self) -> dict[str, list[float]]:
        """α by parameter name (see :meth:`Subspace.named_alphas`); a collective like :meth:`alphas`."""
        return self.space.named_alphas(self.gather_beta())

    @property
    def averaged_beta(self) -> torch.Tensor | None:
        """[L, n] the mean of β over the steps after ``average_after`` (a copy; None without averaging).
        While :meth:`swap_average` has the weights at the average, this is the last iterate's β."""
        return None if self._average is None else self._average.detach().clone()

    @property
    def averaged_steps(self) -> int:
        """How many iterates the average holds (0 without averaging or before ``average_after``)."""
        return 0 if self._average_count is None else int(self._average_count)

    @torch.no_grad()
    def anchor(self, alpha) -> None:
        """Take the weights as they are for the point Σ α_i w_i: β becomes the β of α, and the steps move the
        weights by P̃Δβ from where they are. For a start at an exact merge of the checkpoints (put into the
        model with ``twa.weighted_mean``, made with ``init="keep"``), free of the quantization error that
        placing it through a 4-bit P̃ adds. Only before the first step."""
        if float(self._step) != 0:
            raise RuntimeError("anchor() sets the start: call it before the first step")
        self._beta.copy_(self._local_beta(initial_alphas(alpha, self.space)))
        if self._compensation is not None:  # the weights are what they are: no residue to carry
            self._compensation.zero_()
        self._publish_state()

    @property
    def holds_average(self) -> bool:
        """Whether :meth:`swap_average` has put the weights at the average of the iterates."""
        return self._swapped

    @torch.no_grad()
    def swap_average(self) -> None:
        """Exchange the current point with the average of the iterates (β and the weights, one P̃Δβ): the
        weights become w̄ + P̃β̄, where the step noise of a constant learning rate is averaged out. Call it
        once when training ends (then save or evaluate the model); a second call swaps back, and
        ``step()`` refuses to run while the average is in place. ``opt.beta``, :meth:`alphas` and the
        saved state follow the swap."""
        if self._average is None:
            raise RuntimeError("this optimizer keeps no average of its iterates: make it with average_after=K")
        if not self._swapped and self.averaged_steps == 0:
            raise RuntimeError(f"no iterate has been averaged yet: averaging starts after step {self.average_after}, "
                               f"the optimizer has taken {int(self._step)}")
        self._follow()
        current = self._beta.clone()
        self._apply_delta(self._average - current)
        self._beta.copy_(self._average)
        self._average.copy_(current)
        self._swapped = not self._swapped
        self._publish_state()

    def sync_weights(self) -> None:
        """Set the weights to exactly w̄ + P̃β (e.g. after loading only the optimizer's state)."""
        self._place(self._beta.clone())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._swapped:
            raise RuntimeError("the weights hold the average of the iterates (swap_average()): call swap_average() "
                               "again before stepping")
        self._follow()
        self._placed_versions = None
        if not self._binding.any_grad():
            if closure is not None and loss is None:
                return None  # the closure skipped its backward (Lightning's "return None"): nothing to do
            raise RuntimeError(
                "no parameter of the subspace has a gradient: call loss.backward() before opt.step(). If the "
                "model's parameters were replaced (a new module, or load_state_dict(..., assign=True) on a "
                "submodule), this optimizer still holds the old ones: make a new optimizer")
        with record_function(PROJECT_EVENT):
            c = self._placement.project(self._engine, self._binding, self._comm)
        finite = torch.isfinite(c).all()
        if self._nonfinite == "raise":
            if not bool(finite):
                raise FloatingPointError(
                    "the gradient contains NaN or Inf (its projection P̃ᵀg is not finite); β, the "
                    "optimizer state and the weights were left unchanged")
            finite = None
        else:
            c = torch.where(finite, c, torch.zeros_like(c))
        self._prepare(c)
        old = self._beta.clone()
        self._step += 1 if finite is None else finite.to(self._step.dtype)
        # The rule runs on x = β / scale with the gradient scale · c (the chain rule), so one step moves a
        # layer by a fraction of its own checkpoints' spread; held layers (scale 0) never move.
        live = self._scale > 0
        x = self._beta / torch.where(live, self._scale, torch.ones_like(self._scale))
        grad = self._scale * c
        for group, rows in zip(self.param_groups, self._group_rows):
            for name, new in self._rule(group, rows, x[rows], grad[rows]).items():
                if name == "x":
                    name, new = "beta", torch.where(live[rows], self._scale[rows] * new, self._beta[rows])
                # one guard for β and every buffer: a skipped step (nonfinite="skip") changes nothing
                target = self._beta if name == "beta" else self._buffers[name]
                target[rows] = new if finite is None else torch.where(finite, new, target[rows])
        with record_function(APPLY_EVENT):
            self._apply_delta(self._beta - old)
        if self._average is not None:
            self._accumulate_average(finite)
        return loss

    def _accumulate_average(self, finite) -> None:
        """Fold this step's β into the running mean when the step is past ``average_after`` (and was not
        skipped), with tensor operations only, so a captured step needs no host synchronisation."""
        take = self._step > self.average_after
        if finite is not None:
            take = take & finite
        take = take.to(self._average.dtype)
        self._average_count += take
        self._average.add_((take / self._average_count.clamp_min(1)) * (self._beta - self._average))

    def _prepare(self, c) -> None:
        """What a rule needs beyond (x, gradient) this step, computed before the weights move."""

    def _rule(self, group, rows, x, grad) -> dict:  # pragma: no cover - abstract
        """For the layers ``rows``: the new coordinates (key "x") from the coordinates ``x`` and their
        gradient ``grad`` (= scale · P̃ᵀg), and the new values of the buffers that change."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def _publish_state(self) -> None:
        """Keep TWA's state (β, its buffers, the step, the Kahan residue) in ``self.state`` under the first
        parameter (the others hold the step count), as torch.optim keeps per-parameter state: ``torch.distributed.checkpoint``'s
        ``get_optimizer_state_dict`` carries it like any optimizer state (and, seeing a state, does not
        run its zero-gradient initialisation step)."""
        self.state.clear()
        for p in self._binding.params[1:]:  # every parameter has a state, as torch.optim's (and DCP's strict load) expect
            self.state[p] = {"step": self._step}
        self.state[self._binding.params[0]] = {"twa": {
            "optimizer": type(self).__name__,
            "fingerprint": self.space.fingerprint,
            "beta": self._beta,
            "coordinates": self.coordinates,
            "step": self._step,
            "buffers": self._buffers,
            "compensation": self._compensation,
            "shard": self._placement.state_tag(),
            **({} if self._average is None else {
                "average": self._average, "average_count": self._average_count,
                "average_after": self.average_after, "average_swapped": self._swapped}),
        }}

    def state_dict(self):
        sd = super().state_dict()
        for key, entry in sd["state"].items():
            if "twa" in entry:  # a copy, as the state was when saved (the live entry stays as it is)
                sd["state"][key] = dict(entry, twa={
                    k: (v.clone() if torch.is_tensor(v) else {b: t.clone() for b, t in v.items()} if k == "buffers"
                        else v) for k, v in entry["twa"].items()})
        return sd

    def load_state_dict(self, state_dict) -> None:
        twa = twa_state(state_dict)
        if twa is None:
            raise ValueError(f"not a {type(self).__name__} state_dict (no 'twa' entry)")
        if twa.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict is from {twa.get('optimizer')}, not {type(self).__name__}")
        here = self._placement.state_tag()
        if twa.get("shard") != here:
            def describe(x):
                if x is None:
                    return "one process"
                if "rank" in x:
                    return f"rank {x['rank']} of {x['world_size']} ({x['mode']})"
                return x["mode"] + (f" at world size {x['world_size']}" if "world_size" in x else "")
            raise ValueError(f"state_dict was saved by {describe(twa.get('shard'))}, this optimizer is "
                             f"{describe(here)}: resume with the same world size and shard mode")
        if twa.get("fingerprint") != self.space.fingerprint:
            raise ValueError(
                "state_dict comes from a different subspace (fingerprint "
                f"{twa.get('fingerprint')}, this optimizer's is {self.space.fingerprint})")
        if twa.get("coordinates") != self.coordinates:
            raise ValueError(f"state_dict was trained in {twa.get('coordinates')!r} coordinates, this optimizer uses "
                             f"{self.coordinates!r}: its buffers are in other units (make the optimizer with "
                             f"coordinates={twa.get('coordinates')!r} to resume it)")
        if tuple(twa["beta"].shape) != tuple(self._beta.shape):
            raise ValueError(f"β has shape {tuple(twa['beta'].shape)}, expected {tuple(self._beta.shape)}")
        if set(twa["buffers"]) != set(self._buffers):
            raise ValueError(f"state_dict buffers {sorted(twa['buffers'])} do not match {sorted(self._buffers)}")
        comp = twa.get("compensation")
        if (comp is None) != (self._compensation is None):
            raise ValueError("state_dict was saved for parameters of another precision")
        if twa.get("average_after") != self.average_after:
            raise ValueError(f"state_dict averages the iterates after step {twa.get('average_after')}, this optimizer "
                             f"after {self.average_after} (make it with average_after={twa.get('average_after')!r})")
        plain = {k: v for k, v in state_dict.items() if k != "twa"}
        plain["state"] = {k: {kk: vv for kk, vv in v.items() if kk != "twa"}
                          for k, v in (state_dict.get("state") or {}).items()}
        plain["state"] = {k: v for k, v in plain["state"].items() if v}
        super().load_state_dict(plain)  # validates and loads the param groups (lr, …)
        self._beta.copy_(twa["beta"])
        self._step.copy_(twa["step"])
        for k, v in twa["buffers"].items():
            self._buffers[k].copy_(v)
        if self._average is not None:
            self._average.copy_(twa["average"])
            self._average_count.copy_(twa["average_count"])
            self._swapped = bool(twa.get("average_swapped", False))
        if comp is not None:
            self._compensation.copy_(comp)
        self._publish_state()
        untouched = (self._placed_versions is not None and not getattr(self, "_replaced", False)
                     and self._placed_versions == self._versions())
        if untouched and bool((self._beta != 0).any()):
            # The weights are still where this optimizer put them when it was made, not the loaded
            # state's point (the checkpoint's weights were loaded before it was made, then overwritten).
            warnings.warn("load_state_dict: the model's weights were still at the point this optimizer was made at; "
                          "they are moved to w̄ + P̃β of the loaded state. To resume bit for bit, load the model's "
                          "weights after making the optimizer, or make it with init='keep'", stacklevel=2)
            self.sync_weights()
        self._placed_versions = None
