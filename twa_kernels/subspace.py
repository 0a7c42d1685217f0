"""The TWA subspace: centre w̄, projection P̃ (packed B-bit or fp32), and what is needed to map β back
to averaging weights α.

Every construction variant (:mod:`twa_kernels.construction`) is written as ``P = (X − s)ᵀ T`` with X the
[n, D_l] stack of a layer's checkpoints, a per-layer n × n matrix T and a shift s (w̄ for "center", 0
otherwise), which gives the averaging weights in closed form: w̄ + Pβ = Σ α_i x_i with α = 1/n + T β
(Appendix D of the paper for the centred basis). Files: :mod:`twa_kernels.storage`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from . import storage
from .checkpoints import CheckpointSet
from .construction import Builder
from .packing import check_bits
from .parts import SubspaceParts, held_reasons
from .placement import Placement, fsdp_placement, group_or_world, is_dtensor
from .quantize import SCALE_MODES

DECOUPLE_MODES = ("center", "gram_schmidt", "none")
# What one unit of an optimizer's coordinate is, per layer: "spread" the rms distance of the layer's
# checkpoints from their centre (so one step moves every layer by the same fraction of its own spread,
# whatever its size), "paper" one unit of weight space along a unit-norm column of P (Algorithm 1).
COORDINATES = ("spread", "paper")
# Where the integrations and `twa fit` write α by parameter name (:meth:`Subspace.named_alphas`).
ALPHAS_FILE = "twa_alphas.json"
LAYER_MODES = ("param", "model")
NON_TRAINABLE_MODES = ("checkpoints", "model")
def _choose(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(map(repr, allowed))}")


def _check_options(bits, decouple, layers, scale) -> None:
    check_bits(bits)
    _choose(decouple, DECOUPLE_MODES, "decouple mode")
    _choose(layers, LAYER_MODES, "layers mode")
    _choose(scale, SCALE_MODES, "scale mode")


def trainable_parameters(model: torch.nn.Module):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def read_non_trainable(model: torch.nn.Module, ckpts: CheckpointSet, trainable: set) -> dict[str, torch.Tensor]:
    """The model's frozen parameters (equal in every checkpoint, else an error naming them) and buffers
    (from the last checkpoint), as the checkpoints hold them; entries the checkpoints lack are left out."""
    state = model.state_dict()
    frozen = {nm for nm, p in model.named_parameters() if not p.requires_grad}
    out, differ = {}, []
    for name, current in state.items():
        if name in trainable or name not in ckpts.sources[0].keys():
            continue
        if name in frozen:
            first = ckpts.sources[0].tensor(name)
            if any(not torch.equal(first, src.tensor(name)) for src in ckpts.sources[1:] if name in src.keys()):
                differ.append(name)
            value = first
        else:
            value = ckpts.sources[-1].tensor(name) if name in ckpts.sources[-1].keys() else ckpts.sources[0].tensor(name)
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{ckpts.labels[0]}: {name!r} has shape {tuple(value.shape)}, the model's has "
                             f"{tuple(current.shape)}")
        out[name] = value
    if differ:
        raise ValueError(f"frozen parameter(s) {', '.join(map(repr, differ[:5]))} differ between the checkpoints: "
                         "TWA keeps frozen parameters fixed; make them trainable, or pass non_trainable='model' "
                         "to keep the model's own")
    return out


@torch.no_grad()
def write_state(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's own tensors of those names (cast to their dtype and device); an
    FSDP2-sharded tensor takes this rank's rows of the value."""
    state = model.state_dict(keep_vars=True)
    for name, value in values.items():
        target = state[name]
        if is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            target.to_local().copy_(distribute_tensor(value.to(target.dtype), target.device_mesh,
                                                      target.placements, src_data_rank=None).to_local())
        else:
            target.copy_(value)


class Subspace:
    """The n-dimensional per-layer subspace spanned by checkpoints, with its quantized projection."""

    def __init__(self, parts: SubspaceParts):
        self.names = list(parts.names)
        self.shapes = [tuple(s) for s in parts.shapes]
        self.layers_mode = parts.layers_mode
        self.decouple_mode = parts.decouple_mode
        self.scale_mode = parts.scale_mode
        self.center = parts.center
        self.projection = parts.projection
        self.col_norms = parts.col_norms
        self.spread = parts.spread
        self.transform = parts.transform
        self.checkpoint_coords = parts.checkpoint_coords
        self.frozen = parts.frozen
        # A sharded subspace holds part of P̃ (rows: its rows, and w̄ for them; columns: its columns);
        # sizes, scales and zeros of the whole subspace are kept for the maths and the fingerprint.
        self.placement = parts.placement if parts.placement is not None else Placement()
        self.process_group = parts.process_group
        proj = parts.projection
        self._global_sizes = tuple(parts.layer_sizes) if parts.layer_sizes is not None else proj.layout.sizes
        self.global_scale = proj.scale if parts.global_scale is None else parts.global_scale
        self.global_zero = proj.zero if parts.global_zero is None else parts.global_zero
        self.fingerprint = storage.fingerprint(self)
        self._model = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, model: torch.nn.Module, checkpoints: Sequence, bits: int | None = 4,
                         decouple: str = "center", layers: str = "param", scale: str = "layer",
                         progress: bool | None = None, chunk_bytes: int = 48 << 20,
                         shard: str | None = None, process_group=None, *, non_trainable: str = "checkpoints",
                         key_map=None, trusted: bool = False) -> "Subspace":
        """Build the subspace of ``checkpoints``: anything :mod:`twa_kernels.checkpoints` reads
        (state_dicts, ``.pt`` / ``.bin`` / ``.ckpt`` / ``.safetensors`` files, sharded indexes, Hugging
        Face and ``torch.distributed.checkpoint`` directories), streamed.

        ``scale``: ``"layer"`` is the paper's Eq. 16 (one scale and zero per layer); ``"column"`` one
        per (layer, column); ``"column_norm"`` per column, rescaled so each dequantized column keeps
        the norm of its fp64 column (at 1–2 bits min-max codes otherwise inflate column norms by
        roughly max|P|·√D_l, which makes a learning rate tuned at 4 bits diverge).
        ``progress``: show a progress bar (``None``: only on a terminal).
        ``chunk_bytes``: memory for the float64 work arrays of one chunk. The default keeps each array
        below glibc's mmap threshold (32 MiB), so freed chunks are reused instead of being mapped and
        zero-filled again (which cost more system time than the arithmetic at 30 GB of checkpoints).
        ``shard``: ``"replicate"``, ``"rows"`` or ``"columns"`` builds this rank's part for distributed
        training over ``process_group`` (default: the world); see :mod:`twa_kernels.distributed`.
        Every rank must call this with the same checkpoints; they are compared first.
        ``non_trainable``: ``"checkpoints"`` (default) also loads the model's frozen parameters, which
        must be equal in every checkpoint, and its buffers, from the last checkpoint (recompute
        BatchNorm statistics with :func:`twa_kernels.update_bn` after training); ``"model"`` keeps the
        model's own. The model is written only once the subspace is built.
        ``key_map`` and ``trusted``: see :mod:`twa_kernels.checkpoints`.
        """
        _check_options(bits, decouple, layers, scale)
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no trainable parameters")
        _choose(non_trainable, NON_TRAINABLE_MODES, "non_trainable mode")
        names = [nm for nm, _ in named]
        shapes = [tuple(p.shape) for _, p in named]
        placement = None
        if any(is_dtensor(p) for _, p in named):
            if shard is not None:
                raise ValueError("shard= is for models that are not sharded; a model sharded with FSDP2 brings its "
                                 "own sharding (each rank builds the rows of its local shards)")
            placement, process_group = fsdp_placement([p for _, p in named], layers)
        ckpts = CheckpointSet(checkpoints, names, shapes, key_map=key_map, trusted=trusted)
        fixed = read_non_trainable(model, ckpts, set(names)) if non_trainable == "checkpoints" else {}
        space = cls._build(ckpts, names, shapes, bits, decouple, layers, scale, progress, chunk_bytes, shard,
                           process_group, placement)
        write_state(model, fixed)
        return space.bind(model)

    @classmethod
    def from_names(cls, names: Sequence[str], shapes: Sequence[tuple[int, ...]], checkpoints: Sequence,
                   bits: int | None = 4, decouple: str = "center", layers: str = "param", scale: str = "layer",
                   progress: bool | None = None, chunk_bytes: int = 48 << 20, shard: str | None = None,
                   process_group=None, *, key_map=None, trusted: bool = False) -> "Subspace":
        """The subspace of the checkpoints' tensors ``names`` (of ``shapes``), with no model object (as
        ``twa build`` does); bind it to a model later with :meth:`bind` or ``Subspace.load(model=)``.
        The other arguments are those of :meth:`from_checkpoints`."""
        _check_options(bits, decouple, layers, scale)
        if not names:
            raise ValueError("no tensors to build a subspace from")
        ckpts = CheckpointSet(checkpoints, list(names), list(shapes), key_map=key_map, trusted=trusted)
        return cls._build(ckpts, list(names), [tuple(s) for s in shapes], bits, decouple, layers, scale, progress,
                          chunk_bytes, shard, process_group)

    @classmethod
    def _build(cls, ckpts, names, shapes, bits, decouple, layers, scale, progress, chunk_bytes, shard,
               process_group, placement=None) -> "Subspace":
        if shard is not None:
            process_group = group_or_world(process_group)
        builder = Builder(ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress, shard,
                          process_group, placement)
        space = cls(builder.build())
        space.placement.check_same(lambda: space.fingerprint, space.process_group, "the subspace built")
        return space

    # ------------------------------------------------------------------ binding to a model
    def bind(self, model: torch.nn.Module) -> "Subspace":
        """Tie the layers to ``model``'s parameters by name, so that an optimizer takes that model's
        tensors in any grouping and order, and follows them when ``load_state_dict(..., assign=True)``
        replaces them. A subspace built from a model is bound to it; a loaded one binds with
        ``Subspace.load(path, model=model)``. Only a weak reference to the model is kept."""
        params = dict(trainable_parameters(model))
        missing = [nm for nm in self.names if nm not in params]
        if missing:
            raise ValueError(f"the model lacks {len(missing)} parameter(s) of the subspace: "
                             f"{', '.join(map(repr, missing[:5]))}")
        for nm, shape in zip(self.names, self.shapes):
            if tuple(params[nm].shape) != tuple(shape):
                raise ValueError(f"parameter {nm!r}: the model's has shape {tuple(params[nm].shape)}, the "
                                 f"subspace's {tuple(shape)}")
        extra = [nm for nm in params if nm not in set(self.names)]
        if extra:
            raise ValueError(f"the model has trainable parameter(s) the subspace does not: "
                             f"{', '.join(map(repr, extra[:5]))} (freeze them, or build the subspace with them)")
        self._model = weakref.ref(model)
        return self

    def bound_model(self) -> torch.nn.Module | None:
        return None if self._model is None else self._model()

    def bound_parameters(self) -> dict | None:
        """name -> the bound model's parameter now, or None when the subspace is bound to no live model."""
        model = self.bound_model()
        return None if model is None else dict(model.named_parameters())

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return self.col_norms.shape[1]

    @property
    def bits(self) -> int | None:
        return self.projection.layout.bits

    @property
    def num_layers(self) -> int:
        return self.projection.layout.num_layers

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return self._global_sizes

    @property
    def numel(self) -> int:
        return sum(self._global_sizes)

    @property
    def nbytes(self) -> int:
        """Bytes of P̃ as the kernels hold it on the device (codes plus scales and zeros); for a
        sharded subspace, this rank's part."""
        return self.projection.nbytes

    def __repr__(self):
        bits = "fp32" if self.bits is None else f"{self.bits}-bit"
        return (f"Subspace(n={self.n}, {bits}, layers={self.num_layers} ({self.layers_mode}), "
                f"D={self.numel:,}, decouple={self.decouple_mode!r}, scale={self.scale_mode!r}, "
                f"{self.nbytes / 2**20:.1f} MiB, frozen={int(self.frozen.sum())}"
                + (f", {self.placement.describe()}" if self.placement.mode else "") + ")")

    # ------------------------------------------------------------------ maths helpers
    def dense(self, layer: int) -> torch.Tensor:
        """fp32 [D_l, n]: the dequantized P̃^l (materialises the whole layer; for tests and study).
        A sharded subspace gives this rank's rows or columns."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range for {self.num_layers} layers")
        return self.projection.dequantize(layer)

    def _transforms(self) -> torch.Tensor:
        """fp64 [L, n, n] T with P = (X − s)ᵀ T (exact, before quantization)."""
        if self.transform is not None:
            return self.transform
        inv = torch.where(self.col_norms > 0, 1.0 / self.col_norms.clamp_min(1e-300),
                          torch.zeros_like(self.col_norms))
        t = torch.diag_embed(inv)
        if self.decouple_mode == "center":
            # x_i − w̄ = X (e_i − 1/n): T = (I − 11ᵀ/n) diag(1/r)
            t = t - t.sum(dim=1, keepdim=True) / self.n
        return t

    def coordinate_scale(self, coordinates: str) -> torch.Tensor:
        """fp64 [L]: the length in weight space of one unit of an optimizer's coordinate, per layer
        (β = scale · coordinate); 0 for held layers, which no step moves."""
        _choose(coordinates, COORDINATES, "coordinates")
        scale = self.spread.clone() if coordinates == "spread" else torch.ones_like(self.spread)
        scale[self.frozen] = 0.0
        return scale

    def held_layers(self) -> dict[str, str]:
        """The layers held fixed at their centre, by name (``"model"`` with ``layers="model"``), and why:
        identical in every checkpoint, or moved only by the rounding of fp32 weights."""
        labels = list(self.names) if self.layers_mode == "param" else ["model"]
        return held_reasons(labels, self.spread, self.frozen)

    def alphas(self, beta: torch.Tensor) -> torch.Tensor:
        """Averaging weights α [L, n] with w̄ + P β = Σ_i α_i x_i per layer (float64).

        Σ_i α_i = 1 for the centred basis; exact for ``bits=None``, approximate under quantization."""
        beta = torch.as_tensor(beta).detach().to("cpu", torch.float64)
        if beta.shape != (self.num_layers, self.n):
            raise ValueError(f"beta must have shape {(self.num_layers, self.n)}, got {tuple(beta.shape)}")
        alpha = 1.0 / self.n + torch.einsum("lij,lj->li", self._transforms(), beta)
        alpha[self.frozen] = 1.0 / self.n
        return alpha

    def named_alphas(self, beta: torch.Tensor) -> dict[str, list[float]]:
        """α by parameter name: ``{name: [α_1 … α_n]}``, the weights of the checkpoints in that
        parameter's layer (every parameter of one layer with ``layers="model"``). α may be negative or
        above 1; it describes the trained weights exactly for fp32 P̃ and approximately under
        quantization."""
        alpha = self.alphas(beta)
        return {name: alpha[self._layer_of(i)].tolist() for i, name in enumerate(self.names)}

    def _layer_of(self, param_index: int) -> int:
        return param_index if self.layers_mode == "param" else 0

    def beta_for_alphas(self, alpha: torch.Tensor) -> torch.Tensor:
        """β [L, n] (float64) whose point w̄ + Pβ is Σ α_i x_i, for α with Σ α = 1 per layer."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if alpha.dim() == 1:
            alpha = alpha.expand(self.num_layers, self.n)
        if self.decouple_mode == "center":
            # Σ α_i (x_i − w̄) = Σ α_i r_i e_i  (the 1/n terms cancel because Σ α = 1)
            beta = alpha * self.col_norms
        elif self.decouple_mode == "none":
            # P = Xᵀ diag(1/r): Σ (α_i − 1/n) x_i = Σ (α_i − 1/n) r_i p_i
            beta = (alpha - 1.0 / self.n) * self.col_norms
        else:
            # gram_schmidt, P orthonormal: β = Pᵀ Σ (α_i − 1/n) x_i, exact even where a dependent
            # checkpoint (a layer smaller than n) has no column of its own
            beta = torch.einsum("lij,lj->li", self.checkpoint_coords, alpha - 1.0 / self.n)
        beta = beta.clone()
        beta[self.frozen] = 0.0
        return beta

    def layer_slices(self):
        """Slices of each layer in the flat vector of all trainable parameters."""
        offs = [0]
        for size in self._global_sizes:
            offs.append(offs[-1] + size)
        return [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]

    # ------------------------------------------------------------------ persistence
    @property
    def shard(self) -> str | None:
        """The shard mode (``"replicate"``, ``"rows"``, ``"columns"``, or ``"fsdp"`` for an FSDP2 model), None
        in one process."""
        return self.placement.mode

    def save(self, path) -> None:
        """Write a ``.safetensors`` file (tensors plus JSON metadata; loading it runs no code).

        A sharded subspace saves this rank's part: put ``{rank}`` in the path for one file per rank."""
        storage.save(self, path)

    @classmethod
    def load(cls, path, process_group=None, model: torch.nn.Module | None = None) -> "Subspace":
        """Load a subspace file; a sharded one only on the rank (of the world size) it was saved by.
        With ``model``, the layers bind to its parameters by name (see :meth:`bind`)."""
        space = storage.load(cls, path, process_group)
        return space if model is None else space.bind(model)

