"""Building the parts of a :class:`~twa_kernels.subspace.Subspace` from checkpoints, streamed.

Construction streams the checkpoints layer by layer and row chunk by row chunk, so memory holds the
n checkpoints of one chunk (a bounded number of bytes) plus the packed result, never n full copies.
All arithmetic on checkpoint values is done in float64, which keeps the centring of nearly equal
checkpoints exact (differences of fp32 numbers are exact in fp64).

Per layer, with X the [n, D_l] stack of checkpoints:

* pass 1: centre w̄ = mean, the column norms r_i = ‖x_i − w̄‖, their extremes (and the raw norms /
  extremes for ``decouple="none"``, the Gram matrix XXᵀ for ``"gram_schmidt"``);
* pass 2 (``gram_schmidt`` only): extremes of P = Xᵀ T, T from Gram-Schmidt in the Gram metric;
* pass 3: quantize (:mod:`twa_kernels.quantize`) and pack (:mod:`twa_kernels.packing`).

Every variant is written as ``P = (X − s)ᵀ T`` with a per-layer n × n matrix T and shift s (w̄ for
"center", 0 otherwise), which also gives the averaging weights in closed form (see the Subspace).
A distributed build computes this rank's part; its placement (:mod:`twa_kernels.placement`) says
which part and how the ranks' statistics combine.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .packing import LayerLayout, PackedProjection, or_codes_into
from .placement import Placement, plan
from .quantize import column_norm_ratio, min_max_quantizer, quantize
from .parts import NOISE_RTOL, SubspaceParts, held_reasons

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


class Builder:
    """Builds the parts of a :class:`Subspace` (or this rank's part of it, as its placement says) in up to three passes."""

    def __init__(self, ckpts, names, shapes, layers, decouple, scale, bits, chunk_bytes, progress,
                 shard_mode=None, process_group=None, placement: Placement | None = None):
        self.ckpts, self.names, self.shapes = ckpts, names, shapes
        self.layers_mode, self.decouple_mode, self.scale_mode, self.bits = layers, decouple, scale, bits
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
        if placement is not None:
            self.placement = placement
        elif shard_mode is None:
            self.placement = Placement()
        else:
            self.placement = plan(shard_mode, sum(self.sizes), self.n, dist.get_world_size(process_group),
                                  dist.get_rank(process_group))
        # A rank of "rows" / "fsdp" reads only its rows: comparing every row costs one more read of the set
        full = self.placement.mode in ("rows", "fsdp")
        self.placement.check_same(lambda: ckpts.fingerprint(names, shapes, full=full), process_group, "the checkpoints")
        self.local = self.placement.layer_ranges(self.sizes)
        self.cols = self.placement.column_slice(self.n)
        self.layout = LayerLayout(tuple(b - a for a, b in self.local), self.cols.stop - self.cols.start, bits)

    def _layer_labels(self) -> list[str]:
        return [segs[0].name if len(segs) == 1 else "model" for segs in self.layer_segments]

    def _reduce(self, tensor, op):
        return self.placement.reduce(tensor, op, self.group)

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

    def build(self) -> SubspaceParts:
        lay, n = self.layout, self.n
        L = len(self.sizes)
        center = torch.empty(lay.numel, dtype=torch.float32)
        scale = torch.zeros(L, n, dtype=torch.float32)
        zero = torch.zeros(L, n, dtype=torch.float32)
        col_norms = torch.zeros(L, n, dtype=torch.float64)
        spread = torch.zeros(L, dtype=torch.float64)
        center_norms = torch.zeros(L, dtype=torch.float64)
        transform = torch.zeros(L, n, n, dtype=torch.float64) if self.decouple_mode == "gram_schmidt" else None
        coords = torch.zeros(L, n, n, dtype=torch.float64) if self.decouple_mode == "gram_schmidt" else None
        frozen = torch.zeros(L, dtype=torch.bool)
        if self.bits is None:
            words, dense_rows = None, torch.empty(lay.numel, lay.n, dtype=torch.float32)
        else:
            words, dense_rows = torch.zeros(lay.num_words, dtype=torch.int32), None
        offs = lay.param_offsets.tolist()
        passes = 3 if self.decouple_mode == "gram_schmidt" else 2
        bar = tqdm(total=passes * lay.numel * n * 4, unit="B", unit_scale=True, desc="building subspace",
                   disable=(None if self.progress is None else not self.progress))
        with bar:
            for l in range(L):
                stats = self._pass_statistics(l, center[offs[l]:offs[l + 1]], bar)
                t, shift_center, frozen[l] = self._transform(stats)
                col_norms[l] = stats["norms"]
                spread[l] = stats["dev_norms"].square().mean().sqrt()
                center_norms[l] = stats["center_norm"]
                if transform is not None:
                    transform[l] = t
                    coords[l] = t.T @ stats["gram"]  # Pᵀ x_i: exact where T drops a dependent checkpoint
                if frozen[l]:
                    # Never moved: all columns zero (scale = zero = 0), the layer stays at w̄.
                    bar.update((passes - 1) * lay.sizes[l] * n * 4)
                    continue
                if self.decouple_mode == "gram_schmidt":
                    lo, hi = self._pass_extremes(l, t, bar)
                else:
                    lo, hi = stats["lo"] * t.diagonal(), stats["hi"] * t.diagonal()
                self._set_quantizer(l, lo, hi, t, scale, zero)
                sums = self._pass_pack(l, t, shift_center, scale[l], zero[l], words, dense_rows, bar)
                if self.scale_mode == "column_norm" and self.bits is not None:
                    ratio = column_norm_ratio(*(self._reduce(v, "sum") for v in sums))
                    scale[l, self.cols] *= ratio
                    zero[l, self.cols] *= ratio
        if bool(frozen.all()):
            raise ValueError(f"all {n} checkpoints are identical (or differ only by the rounding of fp32 weights): "
                             "they span no subspace to train in")
        if bool(frozen.any()):
            reasons = held_reasons(self._layer_labels(), spread, frozen, center_norms)
            listed = "; ".join(f"{nm!r} {why}" for nm, why in list(reasons.items())[:5])
            more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
            warnings.warn(f"{len(reasons)} of {L} layers are held fixed at their centre: {listed}{more}",
                          stacklevel=3)
        self.placement.share_quantizer(scale, zero, self.group)
        proj = PackedProjection(lay, scale[:, self.cols].contiguous(), zero[:, self.cols].contiguous(),
                                words, dense_rows)
        return SubspaceParts(names=self.names, shapes=self.shapes, layers_mode=self.layers_mode,
                             decouple_mode=self.decouple_mode, scale_mode=self.scale_mode, center=center,
                             projection=proj, col_norms=col_norms, spread=spread, transform=transform,
                             checkpoint_coords=coords, frozen=frozen, layer_sizes=self.sizes, global_scale=scale,
                             global_zero=zero, placement=self.placement, process_group=self.group)

    # pass 1 ------------------------------------------------------------------------------
    def _pass_statistics(self, layer, center_out, bar):
        n = self.n
        dev_sq = torch.zeros(n, dtype=torch.float64)
        raw_sq = torch.zeros(n, dtype=torch.float64)
        lo = torch.full((n,), math.inf, dtype=torch.float64)
        hi = torch.full((n,), -math.inf, dtype=torch.float64)
        gram = torch.zeros(n, n, dtype=torch.float64) if self.decouple_mode == "gram_schmidt" else None
        center_sq = torch.zeros((), dtype=torch.float64)
        mode = self.decouple_mode
        for name, e0, e1, at in self._chunks(layer):
            x = self._read(name, e0, e1)  # [n, m]
            # Centre on checkpoint 0 first: differences of fp32 values are exact in fp64, so
            # identical checkpoints centre to exactly zero.
            dev = x - x[0]
            mean_diff = dev.mean(dim=0)
            center = x[0] + mean_diff
            center_out[at:at + x.shape[1]] = center.float()
            center_sq += center.square().sum()
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
        center_sq = self._reduce(center_sq, "sum")
        lo, hi = self._reduce(lo, "min"), self._reduce(hi, "max")
        if gram is not None:
            gram = self._reduce(gram, "sum")
        norms = dev_sq.sqrt() if self.decouple_mode == "center" else raw_sq.sqrt()
        return {"dev_norms": dev_sq.sqrt(), "norms": norms, "lo": lo, "hi": hi, "gram": gram,
                "center_norm": center_sq.sqrt()}

    def _transform(self, stats):
        """T for this layer, whether P is taken of centred checkpoints, and whether it is frozen."""
        n = self.n
        dev = stats["dev_norms"]
        if float(dev.max()) <= NOISE_RTOL * float(stats["center_norm"]):  # identical, or rounding noise
            return torch.zeros(n, n, dtype=torch.float64), False, True
        if self.decouple_mode == "gram_schmidt":
            return _gram_schmidt(stats["gram"]), False, False
        norms = stats["norms"]
        keep = norms > _ZERO_COLUMN_RTOL * norms.max()
        norms.mul_(keep)  # recorded norms of dropped columns are 0: alphas treat them as unused
        inv = torch.where(keep, 1.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
        return torch.diag(inv), self.decouple_mode == "center", False

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
        scale[layer], zero[layer] = min_max_quantizer(lo, hi, live, self.bits, self.scale_mode)

    # pass 3 ------------------------------------------------------------------------------
    def _pass_pack(self, layer, t, shift_center, a, b, words, dense_rows, bar):
        lay = self.layout
        n_local = lay.n
        w0 = int(lay.word_offsets[layer]) if words is not None else 0
        w1 = int(lay.word_offsets[layer + 1]) if words is not None else 0
        exact_sq = torch.zeros(n_local, dtype=torch.float64)
        quant_sq = torch.zeros(n_local, dtype=torch.float64)
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
                q = quantize(p, a64, b64, self.bits)
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
