"""The v2 Triton kernels, on the plane device layout (:mod:`.layout`): backend ``triton_plane``.

Selectable (``backend="triton_plane"``), tested in the interpreter against the torch reference for every
bit width, and compiled for sm_80/sm_90 in CI; it becomes what ``"auto"`` takes on CUDA only after a GPU
run has passed the GPU tests with it and measured it faster than ``triton`` (README says which kernels
were measured on a GPU).

What differs from the shipped ``triton`` kernels (:mod:`..rows.triton_kernels`), and why:

* **Loads.** A thread loads ``V`` consecutive words per column (16 bytes at 4 and 8 bits) with no
  per-load predicate in full tiles, and sees ``V`` consecutive rows per field, so gradients and
  weights load ``V`` elements at a time too. Codes are loaded ``.cg`` (L2 only) so that the gradients
  a program re-reads per column block stay in L1.
* **Three instructions per code.** A field ``i`` becomes a float as ``bits((x & mask_i) | 0x4B000000) −
  2^23 = q·2^pos_i`` — one LOP3 (inline PTX with register operands: ptxas would split the immediate form
  into two), one FADD, then the FFMA. The factor ``2^pos_i`` is undone exactly: project multiplies the
  gradient by ``2^-pos_i`` before the FFMA, expand keeps one accumulator per field and scales it once
  per row. Fields that would pass bit 22 take one shift per word first. The interpreter runs the same
  bits with plain integer operations (it cannot run inline PTX).
* **Reduction and fold in one small launch.** ``project`` writes one partial ``qᵀg`` row per program
  and column block; the reduction sums a layer's partials in blocks of ``REDUCE_ROWS`` (a fixed tree:
  the same bits every run, no atomics) and folds ``c = scale·t + zero·Σg`` in the same launch.
* **u and s inside expand**: ``u_j = scale_j·Δβ_j`` per column and ``s = Σ zero∘Δβ`` per program, so
  expand is one launch.

Expand's per-field accumulators are one tensor built by a tree of ``tl.join`` (each join adds a
dimension of 2 held inside the thread), so that the loop over columns carries ``E`` accumulators for
any bit width without data movement.
"""

from __future__ import annotations


import torch

from ...packing import PackedProjection
from ..contract import Segments
from ..triton_common import AVAILABLE, INTERPRET, Launch
from .engine import PlaneEngine

REDUCE_ROWS = 64

if AVAILABLE:
    import triton
    import triton.language as tl

    from ..triton_common import TL_DTYPES, _update_weights

    @triton.jit
    def _high_shift(BITS: tl.constexpr):
        """Fields whose bits would pass bit 22 are read from ``x >> _high_shift``: the smallest multiple
        of BITS ≥ 9 (so that the top field lands at bits ≤ 22)."""
        return BITS * ((9 + BITS - 1) // BITS)

    @triton.jit
    def _field_pos(I: tl.constexpr, BITS: tl.constexpr):
        """The bit where field I sits in the word its float is made from."""
        if BITS * (I + 1) > 23:
            return BITS * I - _high_shift(BITS)
        else:
            return BITS * I

    @triton.jit
    def _field(x, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr):
        """Field I of the words ``x`` as the exact float ``q·2^pos`` (pos = :func:`_field_pos`)."""
        if BITS * (I + 1) > 23:
            xx = x >> _high_shift(BITS)
        else:
            xx = x
        m: tl.constexpr = ((1 << BITS) - 1) << _field_pos(I, BITS)
        if USE_ASM:
            y = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                          [xx, tl.full(xx.shape, m, tl.int32),
                                           tl.full(xx.shape, 0x4B000000, tl.int32)],
                                          dtype=tl.int32, is_pure=True, pack=1)
        else:
            y = (xx & m) | 0x4B000000
        return y.to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _field_scale(I: tl.constexpr, BITS: tl.constexpr):
        """2^-pos of field I: undoes :func:`_field`'s factor exactly."""
        return 1.0 / (1 << _field_pos(I, BITS))

    # A tree of joins over the E fields of the words x [T, V]: the leaf of field I is what KIND names.
    # VALUE: the field as a float (q·2^pos); ZERO: 0.0; SCALE: 2^-pos; ROW: q + I·pw (its row in the tile;
    # with pw = 0, the word index q itself in the tree's shape).
    VALUE = tl.constexpr(0)
    ZERO = tl.constexpr(1)
    SCALE = tl.constexpr(2)
    ROW = tl.constexpr(3)

    @triton.jit
    def _leaf(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        if KIND == VALUE:
            out = _field(x, I, BITS, USE_ASM)
        elif KIND == ZERO:
            out = tl.zeros(q.shape, tl.float32)
        elif KIND == SCALE:
            out = tl.full(q.shape, _field_scale(I, BITS), tl.float32)
        else:
            out = q + I * pw
        return out

    @triton.jit
    def _tree2(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        return tl.join(_leaf(x, q, pw, I, BITS, USE_ASM, KIND), _leaf(x, q, pw, I + 1, BITS, USE_ASM, KIND))

    @triton.jit
    def _tree4(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        return tl.join(_tree2(x, q, pw, I, BITS, USE_ASM, KIND), _tree2(x, q, pw, I + 2, BITS, USE_ASM, KIND))

    @triton.jit
    def _tree8(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        return tl.join(_tree4(x, q, pw, I, BITS, USE_ASM, KIND), _tree4(x, q, pw, I + 4, BITS, USE_ASM, KIND))

    @triton.jit
    def _tree16(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        return tl.join(_tree8(x, q, pw, I, BITS, USE_ASM, KIND), _tree8(x, q, pw, I + 8, BITS, USE_ASM, KIND))

    @triton.jit
    def _tree32(x, q, pw, I: tl.constexpr, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        return tl.join(_tree16(x, q, pw, I, BITS, USE_ASM, KIND), _tree16(x, q, pw, I + 16, BITS, USE_ASM, KIND))

    @triton.jit
    def _fields(x, q, pw, BITS: tl.constexpr, USE_ASM: tl.constexpr, KIND: tl.constexpr):
        """All E = 32 / BITS leaves, shape [T, V, 2, …, 2] (log2 E trailing twos)."""
        if BITS == 8:
            out = _tree4(x, q, pw, 0, BITS, USE_ASM, KIND)
        elif BITS == 4:
            out = _tree8(x, q, pw, 0, BITS, USE_ASM, KIND)
        elif BITS == 2:
            out = _tree16(x, q, pw, 0, BITS, USE_ASM, KIND)
        else:
            out = _tree32(x, q, pw, 0, BITS, USE_ASM, KIND)
        return out

    @triton.jit
    def _program(prog_seg_ptr, prog_tile_ptr, prog_end_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr,
                 full_tiles_ptr, tail_words_ptr, V: tl.constexpr):
        """This program's segment, layer, tiles [t0, t1), the segment's rows [lo, hi) inside the layer,
        the layer's first word, its full tiles and the words per column of its partial tile."""
        pid = tl.program_id(0).to(tl.int64)
        seg = tl.load(prog_seg_ptr + pid)
        layer = tl.load(seg_layer_ptr + seg)
        lo = tl.load(seg_row_ptr + seg)
        hi = lo + tl.load(seg_size_ptr + seg)
        word_base = tl.multiple_of(tl.load(word_off_ptr + layer), V)
        return (pid, seg, layer, tl.load(prog_tile_ptr + pid), tl.load(prog_end_ptr + pid), lo, hi, word_base,
                tl.load(full_tiles_ptr + layer), tl.load(tail_words_ptr + layer).to(tl.int32))

    @triton.jit
    def _layer_base(addr_ptr, seg, lo, DTYPE: tl.constexpr, V: tl.constexpr, ALIGNED: tl.constexpr):
        """A pointer to row 0 of the segment's layer (the segment itself starts at row ``lo``), marked
        V-element aligned where the caller checked it is."""
        esize: tl.constexpr = DTYPE.primitive_bitwidth // 8
        base = (tl.load(addr_ptr + seg) - lo * esize).to(tl.pointer_type(DTYPE))
        if ALIGNED:
            base = tl.multiple_of(base, V * esize)
        return base

    @triton.jit
    def _is_aligned(addr_ptr, seg, lo, DTYPE: tl.constexpr, V: tl.constexpr):
        esize: tl.constexpr = DTYPE.primitive_bitwidth // 8
        return (tl.load(addr_ptr + seg) - lo * esize) % (V * esize) == 0

    @triton.jit
    def _full_range(t0, t1, lo, hi, full_tiles, R: tl.constexpr):
        """[a, b): the tiles of [t0, t1) that are whole and lie inside the segment's rows [lo, hi)."""
        a = tl.maximum(t0, (lo + R - 1) // R)
        b = tl.maximum(a, tl.minimum(tl.minimum(t1, full_tiles), hi // R))
        return a, b

    @triton.jit
    def _project_tiles(words_ptr, g_ptr, t0, t1, lo, hi, word_base, full_tiles, tail_pw, cols, gacc,
                       N: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr, T: tl.constexpr,
                       USE_ASM: tl.constexpr, WITH_GSUM: tl.constexpr):
        """qᵀg over this program's tiles for the columns ``cols`` [JB] (clamped to N − 1: no predicate),
        as per-thread partials [JB, T, V] (columns outermost: each thread holds all JB columns of its
        words, so the gradients it multiplies them with need no exchange between threads); with WITH_GSUM also Σg into ``gacc`` [T, V]."""
        E: tl.constexpr = 32 // BITS
        PW: tl.constexpr = V * T
        R: tl.constexpr = E * PW
        q = tl.arange(0, T)[:, None] * V + tl.arange(0, V)[None, :]
        acc = tl.zeros([cols.shape[0], T, V], tl.float32)
        a, b = _full_range(t0, t1, lo, hi, full_tiles, R)
        for tile in range(a, b):  # whole tiles inside the segment: no predicates
            r0 = tile * R
            x = tl.load(words_ptr + word_base + tile * (N * PW) + (cols[:, None, None] * PW + q[None, :, :]),
                        cache_modifier=".cg")
            gp = g_ptr + r0
            for i in tl.static_range(E):
                g = tl.load(gp + (q + i * PW)).to(tl.float32)
                if WITH_GSUM:
                    gacc += g
                acc += _field(x, i, BITS, USE_ASM) * (g * _field_scale(i, BITS))[None, :, :]
        for tile in range(t0, t1):  # the (at most two) tiles a layer's end or a segment boundary cuts
            if (tile < a) | (tile >= b):
                r0 = tile * R
                pw = tl.where(tile < full_tiles, PW, tail_pw)
                in_tile = q < pw
                x = tl.load(words_ptr + word_base + tile * (N * PW) + (cols[:, None, None] * pw + q[None, :, :]),
                            mask=in_tile[None, :, :], other=0)
                for i in tl.static_range(E):
                    rows = r0 + (q + i * pw)
                    g = tl.load(g_ptr + rows, mask=in_tile & (rows >= lo) & (rows < hi), other=0.0).to(tl.float32)
                    if WITH_GSUM:
                        gacc += g
                    acc += _field(x, i, BITS, USE_ASM) * (g * _field_scale(i, BITS))[None, :, :]
        return acc, gacc

    @triton.jit
    def _project_program(words_ptr, grad_addr_ptr, part_t_ptr, part_g_ptr, pid, seg, t0, t1, lo, hi, word_base,
                         full_tiles, tail_pw, N: tl.constexpr, G_DTYPE: tl.constexpr, BITS: tl.constexpr,
                         V: tl.constexpr, T: tl.constexpr, JB: tl.constexpr, N_PAD: tl.constexpr,
                         USE_ASM: tl.constexpr, ALIGNED: tl.constexpr):
        g_ptr = _layer_base(grad_addr_ptr, seg, lo, G_DTYPE, V, ALIGNED)
        block = tl.arange(0, JB)
        gacc = tl.zeros([T, V], tl.float32)
        # Column block 0 also sums g; the others re-read g from L1 (the codes bypass it).
        acc, gacc = _project_tiles(words_ptr, g_ptr, t0, t1, lo, hi, word_base, full_tiles, tail_pw,
                                   tl.minimum(block, N - 1), gacc, N, BITS, V, T, USE_ASM, True)
        tl.store(part_t_ptr + pid * N_PAD + block, tl.sum(tl.sum(acc, axis=2), axis=1))
        tl.store(part_g_ptr + pid, tl.sum(tl.sum(gacc, axis=1), axis=0))
        for cb in range(1, N_PAD // JB):
            cols = cb * JB + block
            acc, gacc = _project_tiles(words_ptr, g_ptr, t0, t1, lo, hi, word_base, full_tiles, tail_pw,
                                       tl.minimum(cols, N - 1), gacc, N, BITS, V, T, USE_ASM, False)
            tl.store(part_t_ptr + pid * N_PAD + cols, tl.sum(tl.sum(acc, axis=2), axis=1))

    @triton.jit
    def _plane_project_kernel(words_ptr, grad_addr_ptr, prog_seg_ptr, prog_tile_ptr, prog_end_ptr, seg_layer_ptr,
                              seg_row_ptr, seg_size_ptr, word_off_ptr, full_tiles_ptr, tail_words_ptr, part_t_ptr,
                              part_g_ptr, N: tl.constexpr, G_DTYPE: tl.constexpr, BITS: tl.constexpr,
                              V: tl.constexpr, T: tl.constexpr, JB: tl.constexpr, N_PAD: tl.constexpr,
                              USE_ASM: tl.constexpr):
        pid, seg, layer, t0, t1, lo, hi, word_base, full_tiles, tail_pw = _program(
            prog_seg_ptr, prog_tile_ptr, prog_end_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr,
            full_tiles_ptr, tail_words_ptr, V)
        if _is_aligned(grad_addr_ptr, seg, lo, G_DTYPE, V):
            _project_program(words_ptr, grad_addr_ptr, part_t_ptr, part_g_ptr, pid, seg, t0, t1, lo, hi, word_base,
                             full_tiles, tail_pw, N, G_DTYPE, BITS, V, T, JB, N_PAD, USE_ASM, True)
        else:
            _project_program(words_ptr, grad_addr_ptr, part_t_ptr, part_g_ptr, pid, seg, t0, t1, lo, hi, word_base,
                             full_tiles, tail_pw, N, G_DTYPE, BITS, V, T, JB, N_PAD, USE_ASM, False)

    @triton.jit
    def _plane_reduce_kernel(part_t_ptr, part_g_ptr, layer_prog_ptr, scale_ptr, zero_ptr, c_ptr, N: tl.constexpr,
                             N_PAD: tl.constexpr, N_P2: tl.constexpr, RB: tl.constexpr):
        """c[l] = scale[l]·Σ_p t_p + zero[l]·Σ_p (Σg)_p over the layer's programs, in blocks of RB (a
        fixed summation tree: reproducible bits)."""
        layer = tl.program_id(0).to(tl.int64)
        first = tl.load(layer_prog_ptr + layer)
        last = tl.load(layer_prog_ptr + layer + 1)
        cols = tl.arange(0, N_P2)
        col_ok = cols < N
        t = tl.zeros([N_P2], tl.float32)
        gsum = tl.zeros([RB], tl.float32)
        for p0 in range(first, last, RB):
            progs = p0 + tl.arange(0, RB)
            ok = progs < last
            t += tl.sum(tl.load(part_t_ptr + progs[:, None] * N_PAD + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                                other=0.0), axis=0)
            gsum += tl.load(part_g_ptr + progs, mask=ok, other=0.0)
        gs = tl.sum(gsum, axis=0)
        scale = tl.load(scale_ptr + layer * N + cols, mask=col_ok, other=0.0)
        zero = tl.load(zero_ptr + layer * N + cols, mask=col_ok, other=0.0)
        tl.store(c_ptr + layer * N + cols, scale * t + zero * gs, mask=col_ok)

    @triton.jit
    def _expand_program(words_ptr, w_addr_ptr, comp_addr_ptr, scale_ptr, delta_ptr, s, seg, layer, t0, t1, lo, hi,
                        word_base, full_tiles, tail_pw, N: tl.constexpr, W_DTYPE: tl.constexpr, BITS: tl.constexpr,
                        V: tl.constexpr, T: tl.constexpr, UNROLL: tl.constexpr, USE_ASM: tl.constexpr,
                        HAS_COMP: tl.constexpr, ALIGNED: tl.constexpr):
        E: tl.constexpr = 32 // BITS
        PW: tl.constexpr = V * T
        R: tl.constexpr = E * PW
        w_ptr = _layer_base(w_addr_ptr, seg, lo, W_DTYPE, V, ALIGNED)
        comp_ptr = w_ptr
        if HAS_COMP:
            comp_ptr = _layer_base(comp_addr_ptr, seg, lo, tl.bfloat16, V, ALIGNED)
        q = tl.arange(0, T)[:, None] * V + tl.arange(0, V)[None, :]
        scales = _fields(q, q, PW, BITS, USE_ASM, SCALE)
        a, b = _full_range(t0, t1, lo, hi, full_tiles, R)
        for tile in range(a, b):  # whole tiles inside the segment: no predicates
            wb = word_base + tile * (N * PW)
            acc = _fields(q, q, PW, BITS, USE_ASM, ZERO)
            for j in tl.range(0, N, loop_unroll_factor=UNROLL):
                x = tl.load(words_ptr + wb + (j * PW + q), cache_modifier=".cg")
                u = tl.load(scale_ptr + layer * N + j) * tl.load(delta_ptr + layer * N + j)
                acc += _fields(x, q, PW, BITS, USE_ASM, VALUE) * u
            rows = tile * R + _fields(q, q, PW, BITS, USE_ASM, ROW)
            _update_weights(w_ptr, comp_ptr, rows, None, acc * scales + s, HAS_COMP)
        for tile in range(t0, t1):  # the (at most two) tiles a layer's end or a segment boundary cuts
            if (tile < a) | (tile >= b):
                wb = word_base + tile * (N * PW)
                pw = tl.where(tile < full_tiles, PW, tail_pw)
                in_tile = q < pw
                acc = _fields(q, q, PW, BITS, USE_ASM, ZERO)
                for j in range(0, N):
                    x = tl.load(words_ptr + wb + (j * pw + q), mask=in_tile, other=0)
                    u = tl.load(scale_ptr + layer * N + j) * tl.load(delta_ptr + layer * N + j)
                    acc += _fields(x, q, pw, BITS, USE_ASM, VALUE) * u
                rows = tile * R + _fields(q, q, pw, BITS, USE_ASM, ROW)
                mask = (_fields(q, q, 0, BITS, USE_ASM, ROW) < pw) & (rows >= lo) & (rows < hi)
                _update_weights(w_ptr, comp_ptr, rows, mask, acc * scales + s, HAS_COMP)

    @triton.jit
    def _plane_expand_kernel(words_ptr, w_addr_ptr, comp_addr_ptr, scale_ptr, zero_ptr, delta_ptr, prog_seg_ptr,
                             prog_tile_ptr, prog_end_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr,
                             full_tiles_ptr, tail_words_ptr, N: tl.constexpr, N_P2: tl.constexpr,
                             W_DTYPE: tl.constexpr, BITS: tl.constexpr, V: tl.constexpr, T: tl.constexpr,
                             UNROLL: tl.constexpr, USE_ASM: tl.constexpr, HAS_COMP: tl.constexpr):
        pid, seg, layer, t0, t1, lo, hi, word_base, full_tiles, tail_pw = _program(
            prog_seg_ptr, prog_tile_ptr, prog_end_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr,
            full_tiles_ptr, tail_words_ptr, V)
        cols = tl.arange(0, N_P2)
        col_ok = cols < N
        s = tl.sum(tl.load(zero_ptr + layer * N + cols, mask=col_ok, other=0.0)
                   * tl.load(delta_ptr + layer * N + cols, mask=col_ok, other=0.0), axis=0)  # Σ zero∘Δβ
        aligned = _is_aligned(w_addr_ptr, seg, lo, W_DTYPE, V)
        if HAS_COMP:
            aligned = aligned & _is_aligned(comp_addr_ptr, seg, lo, tl.bfloat16, V)
        if aligned:
            _expand_program(words_ptr, w_addr_ptr, comp_addr_ptr, scale_ptr, delta_ptr, s, seg, layer, t0, t1, lo, hi,
                            word_base, full_tiles, tail_pw, N, W_DTYPE, BITS, V, T, UNROLL, USE_ASM, HAS_COMP, True)
        else:
            _expand_program(words_ptr, w_addr_ptr, comp_addr_ptr, scale_ptr, delta_ptr, s, seg, layer, t0, t1, lo, hi,
                            word_base, full_tiles, tail_pw, N, W_DTYPE, BITS, V, T, UNROLL, USE_ASM, HAS_COMP, False)


class TritonPlaneEngine(PlaneEngine):
    """P̃ in the plane layout on one device, and its three launches: project, its reduction (with the
    affine fold), expand (with u and s). ``num_warps`` sets the tile's threads (``threads`` overrides
    it, for tests that want many small tiles); ``tiles_per_program``, ``column_block`` (project's
    columns per pass) and ``unroll`` (expand's column loop) are the tuning knobs."""

    name = "triton_plane"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None,
                 num_warps: int = 4, threads: int | None = None, tiles_per_program: int | None = None,
                 column_block: int = 8, unroll: int = 2):
        if not AVAILABLE:
            raise RuntimeError("triton is not installed")
        self.num_warps, self.unroll = num_warps, unroll
        # Two tiles per program on a GPU (the prototype's measured-best shape); in the interpreter, which
        # runs one program at a time, fewer, longer programs are faster.
        tiles = tiles_per_program or (8 if INTERPRET else 2)
        super().__init__(projection, device, segments, threads or 32 * num_warps, tiles, column_block)
        self.n_p2 = max(16, 1 << max(0, (self.layout.n - 1).bit_length()))

    def _geometry(self):
        tb = self.tables
        return (tb.prog_seg, tb.prog_tile, tb.prog_end, tb.seg_layer, tb.seg_row, tb.seg_size, tb.word_off,
                tb.full_tiles, tb.tail_words)

    def _shape(self):
        return dict(N=self.layout.n, BITS=self.layout.bits, V=self.plane.vec, T=self.plane.threads,
                    USE_ASM=not INTERPRET, num_warps=self.num_warps)

    def project_launches(self, addresses, dtype, c) -> list:
        tb = self.tables
        n = self.layout.n
        return [
            Launch(_plane_project_kernel, (tb.num_programs,),
                   (tb.words, addresses, *self._geometry(), self.part_t, self.part_g),
                   dict(G_DTYPE=TL_DTYPES[dtype], JB=self.column_block, N_PAD=self.n_pad, **self._shape())),
            Launch(_plane_reduce_kernel, (self.layout.num_layers,),
                   (self.part_t, self.part_g, tb.layer_prog, self.scale, self.zero, c),
                   dict(N=n, N_PAD=self.n_pad, N_P2=self.n_p2, RB=REDUCE_ROWS)),
        ]

    def expand_launches(self, addresses, dtype, comp_addresses, delta) -> list:
        tb = self.tables
        comp = addresses if comp_addresses is None else comp_addresses
        return [Launch(_plane_expand_kernel, (tb.num_programs,),
                       (tb.words, addresses, comp, self.scale, self.zero, delta, *self._geometry()),
                       dict(N_P2=self.n_p2, W_DTYPE=TL_DTYPES[dtype], UNROLL=self.unroll,
                            HAS_COMP=comp_addresses is not None, **self._shape()))]

    def project(self, grads) -> torch.Tensor:
        """c = P̃ᵀg, ``[L, n]`` float32, for a flat gradient vector or a list of segment tensors."""
        addresses, dtype = self.addresses.grads(grads)
        c = torch.empty(self.layout.num_layers, self.layout.n, dtype=torch.float32, device=self.device)
        launches = self.project_launches(addresses, dtype, c)
        if self.tables.num_programs == 0:  # this rank holds no rows: c = 0 from the reduction alone
            launches = launches[1:]
        for launch in launches:
            launch()
        return c

    def expand(self, weights, delta: torch.Tensor, compensation=None) -> None:
        """weights += P̃Δβ in place; with ``compensation`` (bf16, like ``weights``), Kahan-compensated."""
        w_addr, dtype, c_addr = self.addresses.weights(weights, compensation)
        if self.tables.num_programs == 0:
            return
        delta = delta.to(self.device, torch.float32).contiguous()
        for launch in self.expand_launches(w_addr, dtype, c_addr, delta):
            launch()
