"""The TWA subspace: centre w̄, projection P̃ (packed B-bit or fp32), and what is needed to map β back
to averaging weights α.

Construction streams the checkpoints layer by layer and row chunk by row chunk, so memory holds the
n checkpoints of one chunk (a bounded number of bytes) plus the packed result, never n full copies.
All arithmetic on checkpoint values is done in float64, which keeps the centring of nearly equal
checkpoints exact (differences of fp32 numbers are exact in fp64).

Per layer, with X the [n, D_l] stack of checkpoints:

* pass 1: centre w̄ = mean, the column norms r_i = ‖x_i − w̄‖, their extremes (and the raw norms /
  extremes for ``decouple="none"``, the Gram matrix XXᵀ for ``"gram_schmidt"``);
* pass 2 (``gram_schmidt`` only): extremes of P = Xᵀ T, T from Gram-Schmidt in the Gram metric;
* pass 3: quantize with Eq. 16 and pack (see :mod:`twa_kernels.packing`).

Every variant is written as ``P = (X − s)ᵀ T`` with a per-layer n × n matrix T and shift s (w̄ for
"center", 0 otherwise), which also gives the averaging weights in closed form: w̄ + Pβ = Σ α_i x_i with
α = 1/n + T β (Appendix D of the paper for the centred basis).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointSet
from .packing import LayerLayout, PackedProjection, check_bits, or_codes_into

DECOUPLE_MODES = ("center", "gram_schmidt", "none")
LAYER_MODES = ("param", "model")
SCALE_MODES = ("layer", "column", "column_norm")
FORMAT_VERSION = 1

# A column whose spread is below this fraction of the layer's largest one is rounding noise of the
# fp64 centring, not a direction the checkpoints moved in.
_ZERO_COLUMN_RTOL = 1e-10
# Gram-Schmidt drops a checkpoint whose residual (squared norm, relative to its own) is below this:
# the Gram matrix in fp64 cannot resolve directions finer than fp32 checkpoints hold anyway.
_DEPENDENT_RTOL = 1e-12


@dataclass(frozen=True)
class _Segment:
    """One parameter tensor inside a layer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # element offset inside the layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _choose(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(map(repr, allowed))}")


def trainable_parameters(model: torch.nn.Module):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class Subspace:
    """The n-dimensional per-layer subspace spanned by checkpoints, with its quantized projection."""

    def __init__(self, *, names, shapes, layers, decouple, scale, center, projection, col_norms,
                 transform, frozen, layer_sizes=None, global_scale=None, global_zero=None, shard=None,
                 process_group=None):
        self.names = list(names)
        self.shapes = [tuple(s) for s in shapes]
        self.layers = layers
        self.decouple = decouple
        self.scale = scale
        self.center = center  # fp32 [D], CPU
        self.projection = projection  # PackedProjection, CPU
        self.col_norms = col_norms  # fp64 [L, n]: ‖x_i − s‖ per layer
        self.transform = transform  # fp64 [L, n, n] for gram_schmidt, else None
        self.frozen = frozen  # bool [L]
        # A sharded subspace holds part of P̃ (rows: its rows, and w̄ for them; columns: its columns);
        # sizes, scales and zeros of the whole subspace are kept for the maths and the fingerprint.
        self.shard = shard
        self.process_group = process_group
        self._global_sizes = tuple(layer_sizes) if layer_sizes is not None else projection.layout.sizes
        self.global_scale = projection.scale if global_scale is None else global_scale
        self.global_zero = projection.zero if global_zero is None else global_zero
        self.fingerprint = self._compute_fingerprint()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, model: torch.nn.Module, checkpoints: Sequence, bits: int | None = 4,
                         decouple: str = "center", layers: str = "param", scale: str = "layer",
                         progress: bool | None = None, chunk_bytes: int = 48 << 20,
                         shard: str | None = None, process_group=None) -> "Subspace":
        """Build the subspace of ``checkpoints`` (state_dicts or ``.pt`` / ``.safetensors`` paths).

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
        """
        check_bits(bits)
        _choose(decouple, DECOUPLE_MODES, "decouple mode")
        _choose(layers, LAYER_MODES, "layers mode")
        _choose(scale, SCALE_MODES, "scale mode")
        named = trainable_parameters(model)
        if not named:
            raise ValueError("the model has no trainable parameters")
        names = [nm for nm, _ in named]
        shapes = [tuple(p.shape) for _, p in named]
        ckpts = CheckpointSet(checkpoints, names, shapes)
        if shard is not None:
            from .distributed import group_or_world

            process_group = group_or_world(process_group)
        builder = _Builder(ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress,
                           shard, process_group)
        return builder.build()

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
        return (f"Subspace(n={self.n}, {bits}, layers={self.num_layers} ({self.layers}), "
                f"D={self.numel:,}, decouple={self.decouple!r}, scale={self.scale!r}, "
                f"{self.nbytes / 2**20:.1f} MiB, frozen={int(self.frozen.sum())}"
                + (f", shard={self.shard.mode} {self.shard.rank}/{self.shard.world_size}" if self.shard else "")
                + ")")

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
        if self.decouple == "center":
            # x_i − w̄ = X (e_i − 1/n): T = (I − 11ᵀ/n) diag(1/r)
            t = t - t.sum(dim=1, keepdim=True) / self.n
        return t

    def alphas(self, beta: torch.Tensor) -> torch.Tensor:
        """Averaging weights α [L, n] with w̄ + P β = Σ_i α_i x_i per layer (float64).

        Σ_i α_i = 1 for the centred basis; exact for ``bits=None``, approximate under quantization."""
        beta = torch.as_tensor(beta).detach().to("cpu", torch.float64)
        if beta.shape != (self.num_layers, self.n):
            raise ValueError(f"beta must have shape {(self.num_layers, self.n)}, got {tuple(beta.shape)}")
        alpha = 1.0 / self.n + torch.einsum("lij,lj->li", self._transforms(), beta)
        alpha[self.frozen] = 1.0 / self.n
        return alpha

    def beta_for_alphas(self, alpha: torch.Tensor) -> torch.Tensor:
        """β [L, n] (float64) whose point w̄ + Pβ is Σ α_i x_i, for α with Σ α = 1 per layer."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if alpha.dim() == 1:
            alpha = alpha.expand(self.num_layers, self.n)
        if self.decouple == "center":
            # Σ α_i (x_i − w̄) = Σ α_i r_i e_i  (the 1/n terms cancel because Σ α = 1)
            beta = alpha * self.col_norms
        else:
            rhs = alpha - 1.0 / self.n
            beta = torch.linalg.lstsq(self._transforms(), rhs.unsqueeze(-1)).solution.squeeze(-1)
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
    def _meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "names": self.names, "shapes": self.shapes,
            "layers": self.layers, "decouple": self.decouple, "scale": self.scale,
            "n": self.n, "bits": self.bits, "layer_sizes": list(self.layer_sizes),
        }

    def _file_meta(self) -> dict:
        meta = self._meta()
        meta["shard"] = None if self.shard is None else self.shard.to_dict()
        meta["local_sizes"] = list(self.projection.layout.sizes)
        meta["local_n"] = self.projection.layout.n
        return meta

    def _tensors(self) -> dict:
        p = self.projection
        out = {"center": self.center, "scale": self.global_scale, "zero": self.global_zero,
               "col_norms": self.col_norms, "frozen": self.frozen.to(torch.uint8)}
        if p.words is not None:
            out["words"] = p.words
        else:
            out["dense_rows"] = p.dense_rows
        if self.transform is not None:
            out["transform"] = self.transform
        return out

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        tensors = self._tensors()
        for key in ("scale", "zero", "col_norms", "frozen"):
            h.update(tensors[key].contiguous().cpu().numpy().tobytes())
        if self.transform is not None:
            h.update(self.transform.contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def save(self, path) -> None:
        """Write a ``.safetensors`` file (tensors plus JSON metadata; loading it runs no code).

        A sharded subspace saves this rank's part: put ``{rank}`` in the path for one file per rank."""
        from safetensors.torch import save_file

        path = _rank_path(path, self.shard.rank if self.shard else 0)
        meta = {"twa_subspace": json.dumps(self._file_meta()), "fingerprint": self.fingerprint}
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self._tensors().items()}, tmp, metadata=meta)
        os.replace(tmp, path)  # never leave a half-written file under the user's name

    @classmethod
    def load(cls, path, process_group=None) -> "Subspace":
        """Load a subspace file; a sharded one only on the rank (of the world size) it was saved by."""
        from safetensors import safe_open

        rank = 0
        if "{rank}" in os.fspath(path):
            import torch.distributed as dist

            rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        path = _rank_path(path, rank)
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta_raw = f.metadata() or {}
            if "twa_subspace" not in meta_raw:
                raise ValueError(f"{path} is not a twa_kernels subspace file")
            meta = json.loads(meta_raw["twa_subspace"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: subspace format {meta.get('format_version')} is not "
                             f"{FORMAT_VERSION}; rebuild it with this version of twa_kernels")
        shard, group = None, None
        if meta.get("shard") is not None:
            from .distributed import Shard, group_or_world

            shard = Shard(**meta["shard"])
            group = group_or_world(process_group)
            import torch.distributed as dist

            here = (dist.get_rank(group), dist.get_world_size(group))
            if here != (shard.rank, shard.world_size):
                raise ValueError(f"{path} holds rank {shard.rank} of {shard.world_size} ({shard.mode}); "
                                 f"this process is rank {here[0]} of {here[1]}")
        layout = LayerLayout(tuple(meta["local_sizes"]), meta["local_n"], meta["bits"])
        gscale, gzero = tensors["scale"], tensors["zero"]
        cols = slice(shard.col_start, shard.col_stop) if shard and shard.mode == "columns" else slice(None)
        proj = PackedProjection(layout, gscale[:, cols].contiguous(), gzero[:, cols].contiguous(),
                                tensors.get("words"), tensors.get("dense_rows"))
        space = cls(names=meta["names"], shapes=meta["shapes"], layers=meta["layers"],
                    decouple=meta["decouple"], scale=meta["scale"], center=tensors["center"],
                    projection=proj, col_norms=tensors["col_norms"],
                    transform=tensors.get("transform"), frozen=tensors["frozen"].bool(),
                    layer_sizes=meta["layer_sizes"], global_scale=gscale, global_zero=gzero,
                    shard=shard, process_group=group)
        if space.fingerprint != meta_raw.get("fingerprint"):
            raise ValueError(f"{path}: contents do not match the stored fingerprint (corrupt file?)")
        return space


def _rank_path(path, rank: int) -> str:
    return os.fspath(path).replace("{rank}", str(rank))


class _Builder:
    def __init__(self, ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress,
                 shard_mode=None, process_group=None):
        self.ckpts, self.names, self.shapes = ckpts, names, shapes
        self.layers_mode, self.decouple, self.scale, self.bits = layers, decouple, scale, bits
        self.n = len(ckpts)
        self.progress = progress
        # X, the centred copy, P and the codes are alive at once: four fp64 [n, m] chunks.
        self.chunk_elems = max(1, chunk_bytes // (4 * 8 * self.n))
        segs, offset = [], 0
        for nm, shape in zip(names, shapes):
            segs.append(_Segment(nm, shape, offset))
            if segs[-1].numel == 0:
                raise ValueError(f"parameter {nm!r} has no elements")
            offset += segs[-1].numel
        if layers == "param":
            self.layer_segments = [[_Segment(s.name, s.shape, 0)] for s in segs]
        else:
            self.layer_segments = [segs]
        self.sizes = tuple(sum(s.numel for s in ls) for ls in self.layer_segments)
        self.group = process_group
        self.shard = None
        if shard_mode is not None:
            import torch.distributed as dist

            from .distributed import Shard, collective_device, probe_checkpoints, same_on_all_ranks

            self.shard = Shard.plan(shard_mode, sum(self.sizes), self.n, dist.get_world_size(process_group),
                                    dist.get_rank(process_group))
            self.reduce_device = collective_device(process_group)
            same_on_all_ranks(probe_checkpoints(ckpts, names, shapes), process_group, "the checkpoints")
        from .distributed import local_ranges

        self.local = local_ranges(self.sizes, self.shard)
        cols = (self.shard.col_start, self.shard.col_stop) if self._columns else (0, self.n)
        self.cols = slice(*cols)
        self.layout = LayerLayout(tuple(b - a for a, b in self.local), cols[1] - cols[0], bits)

    @property
    def _rows(self):
        return self.shard is not None and self.shard.mode == "rows"

    @property
    def _columns(self):
        return self.shard is not None and self.shard.mode == "columns"

    def _reduce(self, tensor, op):
        """Combine per-rank partial statistics of a row-sharded build (identity otherwise)."""
        if not self._rows:
            return tensor
        import torch.distributed as dist

        t = tensor.to(self.reduce_device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                               "max": dist.ReduceOp.MAX}[op], group=self.group)
        return t.cpu()

    def _chunks(self, layer):
        """(name, first element, stop element, element offset in this rank's part of the layer):
        runs of whole dim-0 rows of each parameter, cut to this rank's range of the layer."""
        lo, hi = self.local[layer]
        for seg in self.layer_segments[layer]:
            inner = math.prod(seg.shape[1:]) if len(seg.shape) > 1 else 1
            step = max(1, self.chunk_elems // inner) * inner
            start, stop = max(lo - seg.offset, 0), min(hi - seg.offset, seg.numel)
            for e0 in range(start - start % inner, stop, step):
                a, b = max(e0, start), min(e0 + step, stop)
                if a < b:
                    yield seg.name, a, b, seg.offset + a - lo

    def _read(self, name, e0, e1):
        """[n, e1 − e0] float64: elements [e0, e1) of one parameter from every checkpoint."""
        shape = self.shapes[self.names.index(name)]
        inner = math.prod(shape[1:]) if len(shape) > 1 else 1
        r0, r1 = e0 // inner, -(-e1 // inner)
        x = self.ckpts.rows(name, r0, r1)
        return x[:, e0 - r0 * inner: e1 - r0 * inner]

    def build(self) -> Subspace:
        lay, n = self.layout, self.n
        L = len(self.sizes)
        center = torch.empty(lay.numel, dtype=torch.float32)
        scale = torch.zeros(L, n, dtype=torch.float32)
        zero = torch.zeros(L, n, dtype=torch.float32)
        col_norms = torch.zeros(L, n, dtype=torch.float64)
        transform = torch.zeros(L, n, n, dtype=torch.float64) if self.decouple == "gram_schmidt" else None
        frozen = torch.zeros(L, dtype=torch.bool)
        if self.bits is None:
            words, dense_rows = None, torch.empty(lay.numel, lay.n, dtype=torch.float32)
        else:
            words, dense_rows = torch.zeros(lay.num_words, dtype=torch.int32), None
        offs = lay.param_offsets.tolist()
        passes = 3 if self.decouple == "gram_schmidt" else 2
        bar = tqdm(total=passes * lay.numel * n * 4, unit="B", unit_scale=True, desc="building subspace",
                   disable=(None if self.progress is None else not self.progress))
        with bar:
            for l in range(L):
                stats = self._pass_statistics(l, center[offs[l]:offs[l + 1]], bar)
                t, shift_center, frozen[l] = self._transform(stats)
                col_norms[l] = stats["norms"]
                if transform is not None:
                    transform[l] = t
                if frozen[l]:
                    # Never moved: all columns zero (scale = zero = 0), the layer stays at w̄.
                    bar.update((passes - 1) * lay.sizes[l] * n * 4)
                    continue
                if self.decouple == "gram_schmidt":
                    lo, hi = self._pass_extremes(l, t, bar)
                else:
                    lo, hi = stats["lo"] * t.diagonal(), stats["hi"] * t.diagonal()
                self._set_quantizer(l, lo, hi, t, scale, zero)
                sums = self._pass_pack(l, t, shift_center, scale[l], zero[l], words, dense_rows, bar)
                if self.scale == "column_norm" and self.bits is not None:
                    exact, quant = (self._reduce(v, "sum") for v in sums)
                    ratio = torch.where(quant > 0, (exact / quant.clamp_min(1e-300)).sqrt(),
                                        torch.zeros_like(quant)).float()
                    scale[l, self.cols] *= ratio
                    zero[l, self.cols] *= ratio
        if bool(frozen.all()):
            raise ValueError(
                f"all {n} checkpoints are identical: they span no subspace to train in")
        if bool(frozen.any()):
            warnings.warn(f"{int(frozen.sum())} of {L} layers never moved across the checkpoints; "
                          "they are kept fixed at their value", stacklevel=3)
        if self._columns:
            # Other ranks rescaled their own columns (column_norm); share them so all agree.
            import torch.distributed as dist

            for t in (scale, zero):
                mine = torch.zeros_like(t)
                mine[:, self.cols] = t[:, self.cols]
                mine = mine.to(self.reduce_device)
                dist.all_reduce(mine, group=self.group)
                t.copy_(mine.cpu())
        proj = PackedProjection(lay, scale[:, self.cols].contiguous(), zero[:, self.cols].contiguous(),
                                words, dense_rows)
        space = Subspace(names=self.names, shapes=self.shapes, layers=self.layers_mode,
                         decouple=self.decouple, scale=self.scale, center=center, projection=proj,
                         col_norms=col_norms, transform=transform, frozen=frozen, layer_sizes=self.sizes,
                         global_scale=scale, global_zero=zero, shard=self.shard, process_group=self.group)
        if self.shard is not None:
            from .distributed import same_on_all_ranks

            same_on_all_ranks(space.fingerprint, self.group, "the subspace built")
        return space

    # pass 1 ------------------------------------------------------------------------------
    def _pass_statistics(self, layer, center_out, bar):
        n = self.n
        dev_sq = torch.zeros(n, dtype=torch.float64)
        raw_sq = torch.zeros(n, dtype=torch.float64)
        lo = torch.full((n,), math.inf, dtype=torch.float64)
        hi = torch.full((n,), -math.inf, dtype=torch.float64)
        gram = torch.zeros(n, n, dtype=torch.float64) if self.decouple == "gram_schmidt" else None
        mode = self.decouple
        for name, e0, e1, at in self._chunks(layer):
            x = self._read(name, e0, e1)  # [n, m]
            # Centre on checkpoint 0 first: differences of fp32 values are exact in fp64, so
            # identical checkpoints centre to exactly zero.
            dev = x - x[0]
            mean_diff = dev.mean(dim=0)
            center_out[at:at + x.shape[1]] = (x[0] + mean_diff).float()
            dev -= mean_diff
            dev_sq += torch.linalg.vector_norm(dev, dim=1) ** 2  # every mode: is the layer frozen?
            if mode == "none":
                raw_sq += torch.linalg.vector_norm(x, dim=1) ** 2
            if mode != "gram_schmidt":  # Gram-Schmidt takes its extremes in pass 2
                src = dev if mode == "center" else x
                lo = torch.minimum(lo, src.amin(dim=1))
                hi = torch.maximum(hi, src.amax(dim=1))
            else:
                gram += x @ x.T
            bar.update(x.numel() * 4)
        dev_sq, raw_sq = self._reduce(dev_sq, "sum"), self._reduce(raw_sq, "sum")
        lo, hi = self._reduce(lo, "min"), self._reduce(hi, "max")
        if gram is not None:
            gram = self._reduce(gram, "sum")
        norms = dev_sq.sqrt() if self.decouple == "center" else raw_sq.sqrt()
        return {"dev_norms": dev_sq.sqrt(), "norms": norms, "lo": lo, "hi": hi, "gram": gram}

    def _transform(self, stats):
        """T for this layer, whether P is taken of centred checkpoints, and whether it is frozen."""
        n = self.n
        dev = stats["dev_norms"]
        if float(dev.max()) == 0.0:
            return torch.zeros(n, n, dtype=torch.float64), False, True
        if self.decouple == "gram_schmidt":
            return _gram_schmidt(stats["gram"]), False, False
        norms = stats["norms"]
        keep = norms > _ZERO_COLUMN_RTOL * norms.max()
        norms.mul_(keep)  # recorded norms of dropped columns are 0: alphas treat them as unused
        inv = torch.where(keep, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        return torch.diag(inv), self.decouple == "center", False

    # pass 2 ------------------------------------------------------------------------------
    def _pass_extremes(self, layer, t, bar):
        lo = torch.full((self.n,), math.inf, dtype=torch.float64)
        hi = torch.full((self.n,), -math.inf, dtype=torch.float64)
        for name, e0, e1, _ in self._chunks(layer):
            x = self._read(name, e0, e1)
            p = t.T @ x
            lo = torch.minimum(lo, p.min(dim=1).values)
            hi = torch.maximum(hi, p.max(dim=1).values)
            bar.update(x.numel() * 4)
        return self._reduce(lo, "min"), self._reduce(hi, "max")

    def _set_quantizer(self, layer, lo, hi, t, scale, zero):
        if self.bits is None:
            return
        live = t.abs().sum(dim=0) > 0  # columns that are not identically zero
        levels = (1 << self.bits) - 1
        if self.scale == "layer":
            lo = torch.where(live, lo, torch.inf).min().expand(self.n)
            hi = torch.where(live, hi, -torch.inf).max().expand(self.n)
        a = ((hi - lo) / levels).float()
        b = lo.float()
        scale[layer] = torch.where(live, a, torch.zeros_like(a))
        zero[layer] = torch.where(live, b, torch.zeros_like(b))

    # pass 3 ------------------------------------------------------------------------------
    def _pass_pack(self, layer, t, shift_center, a, b, words, dense_rows, bar):
        lay = self.layout
        n_local = lay.n
        w0 = int(lay.word_offsets[layer]) if words is not None else 0
        w1 = int(lay.word_offsets[layer + 1]) if words is not None else 0
        exact_sq = torch.zeros(n_local, dtype=torch.float64)
        quant_sq = torch.zeros(n_local, dtype=torch.float64)
        levels = (1 << self.bits) - 1 if self.bits else 0
        a64, b64 = a[self.cols].double(), b[self.cols].double()
        t_local = t[:, self.cols]
        for name, e0, e1, at in self._chunks(layer):
            x = self._read(name, e0, e1)
            if shift_center:
                diff = x - x[0]
                x = diff - diff.mean(dim=0)
            p = (t_local.T @ x).T  # [m, n_local]: rows of this rank's columns of P
            if words is None:
                off = int(lay.param_offsets[layer]) + at
                dense_rows[off:off + p.shape[0]] = p.float()
            else:
                q = torch.where(a64 > 0, torch.round((p - b64) / a64.clamp_min(1e-300)),
                                torch.zeros_like(p)).clamp_(0, levels)
                or_codes_into(words[w0:w1], at * n_local, q.to(torch.uint8), self.bits)
                deq = q * a64 + b64
                exact_sq += (p * p).sum(dim=0)
                quant_sq += (deq * deq).sum(dim=0)
            bar.update(x.numel() * 4)
        return exact_sq, quant_sq


def _gram_schmidt(gram: torch.Tensor) -> torch.Tensor:
    """Upper-triangular T with Q = Xᵀ T orthonormal, from G = X Xᵀ, processing checkpoints in order.

    Classical Gram-Schmidt applied twice ("CGS2", as stable as modified GS), run on coefficient
    vectors in the metric G so the D-sized vectors are never formed. A checkpoint in the span of the
    earlier ones gets a zero column."""
    n = gram.shape[0]
    t = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        v = torch.zeros(n, dtype=torch.float64)
        v[k] = 1.0
        basis = t[:, :k]
        for _ in range(2):
            v = v - basis @ (basis.T @ (gram @ v))
        norm_sq = float(v @ gram @ v)
        if norm_sq > _DEPENDENT_RTOL * float(gram[k, k]):
            t[:, k] = v / math.sqrt(norm_sq)
    return t
