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
                 transform, frozen):
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
        self.fingerprint = self._compute_fingerprint()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, model: torch.nn.Module, checkpoints: Sequence, bits: int | None = 4,
                         decouple: str = "center", layers: str = "param", scale: str = "layer",
                         progress: bool | None = None, chunk_bytes: int = 256 << 20) -> "Subspace":
        """Build the subspace of ``checkpoints`` (state_dicts or ``.pt`` / ``.safetensors`` paths).

        ``scale``: ``"layer"`` is the paper's Eq. 16 (one scale and zero per layer); ``"column"`` one
        per (layer, column); ``"column_norm"`` per column, rescaled so each dequantized column keeps
        the norm of its fp64 column (at 1–2 bits min-max codes otherwise inflate column norms by
        roughly max|P|·√D_l, which makes a learning rate tuned at 4 bits diverge).
        ``progress``: show a progress bar (``None``: only on a terminal).
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
        builder = _Builder(ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress)
        return builder.build()

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        return self.projection.layout.n

    @property
    def bits(self) -> int | None:
        return self.projection.layout.bits

    @property
    def num_layers(self) -> int:
        return self.projection.layout.num_layers

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return self.projection.layout.sizes

    @property
    def numel(self) -> int:
        return self.projection.layout.numel

    @property
    def nbytes(self) -> int:
        """Bytes of P̃ as the kernels hold it on the device (codes plus scales and zeros)."""
        return self.projection.nbytes

    def __repr__(self):
        bits = "fp32" if self.bits is None else f"{self.bits}-bit"
        return (f"Subspace(n={self.n}, {bits}, layers={self.num_layers} ({self.layers}), "
                f"D={self.numel:,}, decouple={self.decouple!r}, scale={self.scale!r}, "
                f"{self.nbytes / 2**20:.1f} MiB, frozen={int(self.frozen.sum())})")

    # ------------------------------------------------------------------ maths helpers
    def dense(self, layer: int) -> torch.Tensor:
        """fp32 [D_l, n]: the dequantized P̃^l (materialises the whole layer; for tests and study)."""
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
        offs = self.projection.layout.param_offsets.tolist()
        return [slice(a, b) for a, b in zip(offs[:-1], offs[1:])]

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict:
        return {
            "format_version": FORMAT_VERSION, "names": self.names, "shapes": self.shapes,
            "layers": self.layers, "decouple": self.decouple, "scale": self.scale,
            "n": self.n, "bits": self.bits, "layer_sizes": list(self.layer_sizes),
        }

    def _tensors(self) -> dict:
        p = self.projection
        out = {"center": self.center, "scale": p.scale, "zero": p.zero,
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
        for key in ("scale", "zero", "col_norms", "frozen"):
            h.update(self._tensors()[key].contiguous().cpu().numpy().tobytes())
        if self.transform is not None:
            h.update(self.transform.contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    def save(self, path) -> None:
        """Write a ``.safetensors`` file (tensors plus JSON metadata; loading it runs no code)."""
        from safetensors.torch import save_file

        meta = {"twa_subspace": json.dumps(self._meta()), "fingerprint": self.fingerprint}
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self._tensors().items()}, tmp, metadata=meta)
        os.replace(tmp, path)  # never leave a half-written file under the user's name

    @classmethod
    def load(cls, path) -> "Subspace":
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta_raw = f.metadata() or {}
            if "twa_subspace" not in meta_raw:
                raise ValueError(f"{path} is not a twa_kernels subspace file")
            meta = json.loads(meta_raw["twa_subspace"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: subspace format {meta.get('format_version')} is not "
                             f"{FORMAT_VERSION}; rebuild it with this version of twa_kernels")
        layout = LayerLayout(tuple(meta["layer_sizes"]), meta["n"], meta["bits"])
        proj = PackedProjection(layout, tensors["scale"], tensors["zero"], tensors.get("words"),
                                tensors.get("dense_rows"))
        space = cls(names=meta["names"], shapes=meta["shapes"], layers=meta["layers"],
                    decouple=meta["decouple"], scale=meta["scale"], center=tensors["center"],
                    projection=proj, col_norms=tensors["col_norms"],
                    transform=tensors.get("transform"), frozen=tensors["frozen"].bool())
        if space.fingerprint != meta_raw.get("fingerprint"):
            raise ValueError(f"{path}: contents do not match the stored fingerprint (corrupt file?)")
        return space


class _Builder:
    def __init__(self, ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress):
        self.ckpts, self.names, self.shapes = ckpts, names, shapes
        self.layers_mode, self.decouple, self.scale, self.bits = layers, decouple, scale, bits
        self.n = len(ckpts)
        self.progress = progress
        # X, the centred copy, P and the codes are alive at once: four fp64 [n, m] chunks.
        self.chunk_elems = max(1, chunk_bytes // (4 * 8 * self.n))
        segs, offset = [], 0
        for nm, shape in zip(names, shapes):
            segs.append(_Segment(nm, shape, offset))
            offset += segs[-1].numel
        if layers == "param":
            self.layer_segments = [[_Segment(s.name, s.shape, 0)] for s in segs]
        else:
            self.layer_segments = [segs]
        self.layout = LayerLayout(tuple(sum(s.numel for s in ls) for ls in self.layer_segments),
                                  self.n, bits)

    def _chunks(self, layer):
        """(name, row_start, row_stop, element offset in layer) over the layer's segments."""
        for seg in self.layer_segments[layer]:
            inner = math.prod(seg.shape[1:]) if len(seg.shape) > 1 else 1
            rows = seg.shape[0] if seg.shape else 1
            step = max(1, self.chunk_elems // inner)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                yield seg.name, r0, r1, seg.offset + r0 * inner

    def build(self) -> Subspace:
        lay, n = self.layout, self.n
        L = lay.num_layers
        center = torch.empty(lay.numel, dtype=torch.float32)
        scale = torch.zeros(L, n, dtype=torch.float32)
        zero = torch.zeros(L, n, dtype=torch.float32)
        col_norms = torch.zeros(L, n, dtype=torch.float64)
        transform = torch.zeros(L, n, n, dtype=torch.float64) if self.decouple == "gram_schmidt" else None
        frozen = torch.zeros(L, dtype=torch.bool)
        if self.bits is None:
            words, dense_rows = None, torch.empty(lay.numel, n, dtype=torch.float32)
        else:
            words, dense_rows = torch.zeros(lay.num_words, dtype=torch.int32), None
        offs = lay.param_offsets.tolist()
        passes = 3 if self.decouple == "gram_schmidt" else 2
        total_bytes = passes * lay.numel * n * 4
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="building subspace",
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
                sums = self._pass_pack(l, t, shift_center, center[offs[l]:offs[l + 1]], scale[l],
                                       zero[l], words, dense_rows, bar)
                if self.scale == "column_norm" and self.bits is not None:
                    exact, quant = sums
                    ratio = torch.where(quant > 0, (exact / quant.clamp_min(1e-300)).sqrt(),
                                        torch.zeros_like(quant)).float()
                    scale[l] *= ratio
                    zero[l] *= ratio
        if bool(frozen.all()):
            raise ValueError(
                f"all {n} checkpoints are identical: they span no subspace to train in")
        if bool(frozen.any()):
            warnings.warn(f"{int(frozen.sum())} of {L} layers never moved across the checkpoints; "
                          "they are kept fixed at their value", stacklevel=3)
        proj = PackedProjection(lay, scale, zero, words, dense_rows)
        return Subspace(names=self.names, shapes=self.shapes, layers=self.layers_mode,
                        decouple=self.decouple, scale=self.scale, center=center, projection=proj,
                        col_norms=col_norms, transform=transform, frozen=frozen)

    # pass 1 ------------------------------------------------------------------------------
    def _pass_statistics(self, layer, center_out, bar):
        n = self.n
        dev_sq = torch.zeros(n, dtype=torch.float64)
        raw_sq = torch.zeros(n, dtype=torch.float64)
        lo = torch.full((n,), math.inf, dtype=torch.float64)
        hi = torch.full((n,), -math.inf, dtype=torch.float64)
        gram = torch.zeros(n, n, dtype=torch.float64) if self.decouple == "gram_schmidt" else None
        for name, r0, r1, e0 in self._chunks(layer):
            x = self.ckpts.rows(name, r0, r1)  # [n, m]
            # Centre on checkpoint 0 first: differences of fp32 values are exact in fp64, so
            # identical checkpoints centre to exactly zero.
            diff = x - x[0]
            mean_diff = diff.mean(dim=0)
            center_out[e0:e0 + x.shape[1]] = (x[0] + mean_diff).float()
            dev = diff - mean_diff
            dev_sq += (dev * dev).sum(dim=1)
            raw_sq += (x * x).sum(dim=1)
            src = dev if self.decouple == "center" else x
            lo = torch.minimum(lo, src.min(dim=1).values)
            hi = torch.maximum(hi, src.max(dim=1).values)
            if gram is not None:
                gram += x @ x.T
            bar.update(x.numel() * 4)
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
        for name, r0, r1, _ in self._chunks(layer):
            x = self.ckpts.rows(name, r0, r1)
            p = t.T @ x
            lo = torch.minimum(lo, p.min(dim=1).values)
            hi = torch.maximum(hi, p.max(dim=1).values)
            bar.update(x.numel() * 4)
        return lo, hi

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
    def _pass_pack(self, layer, t, shift_center, center, a, b, words, dense_rows, bar):
        n = self.n
        lay = self.layout
        w0 = int(lay.word_offsets[layer]) if words is not None else 0
        w1 = int(lay.word_offsets[layer + 1]) if words is not None else 0
        exact_sq = torch.zeros(n, dtype=torch.float64)
        quant_sq = torch.zeros(n, dtype=torch.float64)
        levels = (1 << self.bits) - 1 if self.bits else 0
        a64, b64 = a.double(), b.double()
        for name, r0, r1, e0 in self._chunks(layer):
            x = self.ckpts.rows(name, r0, r1)
            if shift_center:
                diff = x - x[0]
                x = diff - diff.mean(dim=0)
            p = (t.T @ x).T  # [m, n]: rows of P for this chunk
            if words is None:
                off = int(lay.param_offsets[layer]) + e0
                dense_rows[off:off + p.shape[0]] = p.float()
            else:
                q = torch.where(a64 > 0, torch.round((p - b64) / a64.clamp_min(1e-300)),
                                torch.zeros_like(p)).clamp_(0, levels)
                or_codes_into(words[w0:w1], e0 * n, q.to(torch.uint8), self.bits)
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
