"""Fused Triton kernels: dequantize-and-project (qᵀg) and dequantize-and-expand (w += q·u + s).

Both read the packed codes directly (see :mod:`twa_kernels.packing`), for all layers in one launch,
over the tables of :mod:`twa_kernels.backends.rows.engine` (the affine fold is the engine's, so the
kernels see codes only):

* Program ``i`` owns rows ``[prog_row_i, prog_row_i + ROWS)`` of segment ``prog_seg_i``; no program
  straddles two segments, so three table loads give it its layer, its first row inside the layer and
  the address of its gradients or weights (the parameters' own tensors, from an int64 address table).
* Codes are unpacked in registers. A tile is ``[rows, slots, 32 / bits]``: slot ``s`` of a row is the
  32 bits that hold its columns ``[32s / bits, 32(s + 1) / bits)``, one funnel shift of two
  neighbouring words (a row may start at any bit), then compile-time shifts. A slot's columns are
  the same on every tile, so qᵀg accumulates per slot in registers with no per-code index math.
  Codes become floats as ``bits(0x4B000000 | q) − 2^23``, exact, and without the int→float unit
  (a quarter of the FMA rate). Wide rows (n·bits > 1024 at most) run in windows of slots.
* ``project`` writes one partial ``qᵀg`` row (and ``Σg``) per program; a second launch reduces the
  partials of each layer **in program order**. No float atomics: the same inputs give the same bits
  every run.
* ``expand`` adds ``Δw = q·u + s`` (``u = scale∘Δβ``, ``s = Σ zero∘Δβ``) to the weights in place, with
  Kahan compensation for bf16/fp16 weights (same operation order as the torch reference).
* Offsets are int64 where they can pass 2^31 (a 1.3B × 60 × 4-bit P̃ is 39 GB), int32 inside a tile.
  Products are fp32 multiply-adds, never ``tl.dot`` (TF32 on GPUs; a gemv gains nothing from
  tensor cores).

Every launch is described by :meth:`TritonEngine.project_launches` / :meth:`TritonEngine.expand_launches`
(kernel, grid, arguments), which both the engine and the ahead-of-time compile
(``tests/triton_aot.py``) use, so what is compiled offline is what a launch compiles.

An earlier design fetched every code with its own gather load of its word: 2.6× slower on an H100
(``benchmarks/results/kernel_variants_*_first.md``), from its per-code index arithmetic.
"""

from __future__ import annotations

import math

import torch

from ...packing import PackedProjection, codes_per_word
from ..contract import Segments
from ..triton_common import AVAILABLE, INTERPRET, Launch
from .engine import RowsEngine

DEFAULT_TILE_CODES = 4096
DEFAULT_TILES_PER_PROGRAM = 32

if AVAILABLE:
    import triton
    import triton.language as tl

    from ..triton_common import TL_DTYPES, _update_weights

    @triton.jit
    def _program(prog_seg_ptr, prog_row_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr,
                 ROWS: tl.constexpr):
        """This program's segment and layer, its first row inside the segment, how many rows it has,
        its first row inside the layer, and the layer's first word."""
        pid = tl.program_id(0).to(tl.int64)
        seg = tl.load(prog_seg_ptr + pid)
        row0 = tl.load(prog_row_ptr + pid)
        layer = tl.load(seg_layer_ptr + seg)
        rows = tl.minimum(tl.load(seg_size_ptr + seg) - row0, ROWS)
        layer_row0 = tl.load(seg_row_ptr + seg) + row0
        return pid, seg, layer, row0, rows, layer_row0, tl.load(word_off_ptr + layer)

    @triton.jit
    def _code_to_float(q):
        """Exact int → fp32 for codes < 2^23 without the conversion unit (a quarter of the FMA rate on
        recent GPUs): 0x4B000000 | q is the float 2^23 + q."""
        return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _slot_codes(words_ptr, num_words, first_word, rel_word, shift, mask, BITS: tl.constexpr):
        """Codes [R, S, 32 / BITS] as floats. Slot ``s`` of a row holds its columns
        ``[32s / BITS, 32(s + 1) / BITS)``: the 32 bits at bit ``row·n·BITS + 32·s`` of the layer's
        stream, one funnel shift of two neighbouring words (``rel_word`` [R, S, 1] from ``first_word``,
        ``shift`` [R, 1, 1]), then unpacked in registers with compile-time shifts."""
        ptr = words_ptr + first_word + rel_word
        words_left = tl.minimum(num_words - first_word, 1 << 30).to(tl.int32)  # the last slot's 2nd word
        lo = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.uint64)
        hi = tl.load(ptr + 1, mask=mask & (rel_word + 1 < words_left), other=0)
        hi = hi.to(tl.uint32, bitcast=True).to(tl.uint64)
        x = (((hi << 32) | lo) >> shift).to(tl.uint32)
        j = (tl.arange(0, 32 // BITS) * BITS).to(tl.uint32)[None, None, :]
        return _code_to_float((x >> j) & ((1 << BITS) - 1))

    @triton.jit
    def _slot_cols(slots, BITS: tl.constexpr):
        """Column of each element of :func:`_slot_codes` for these slots: [S, 32 / BITS]."""
        return slots[:, None] * (32 // BITS) + tl.arange(0, 32 // BITS)[None, :]

    @triton.jit
    def _row_bits(n, layer_row0, BITS: tl.constexpr, BLOCK_R: tl.constexpr):
        """Tile-relative row index, and each row's first word (from the tile's) and bit shift. The
        engine makes BLOCK_R·n·BITS a multiple of 32, so these are the same for every tile of a
        program; a segment may start at any row of its layer, hence the program's own bit offset."""
        i = tl.arange(0, BLOCK_R)
        bit = ((layer_row0 * n * BITS) & 31).to(tl.int32) + i * (n * BITS)
        return i, bit >> 5, (bit & 31).to(tl.uint64)[:, None, None]

    @triton.jit
    def _slots_project_kernel(words_ptr, grad_addr_ptr, prog_seg_ptr, prog_row_ptr, seg_layer_ptr, seg_row_ptr,
                              seg_size_ptr, word_off_ptr, part_t_ptr, part_g_ptr, num_words, n, n_slots, n_windows,
                              G_DTYPE: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr,
                              N_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr):
        pid, seg, layer, row0, rows, layer_row0, word_base = _program(
            prog_seg_ptr, prog_row_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr, ROWS)
        grad_ptr = tl.load(grad_addr_ptr + seg).to(tl.pointer_type(G_DTYPE)) + row0
        i, row_word, shift = _row_bits(n, layer_row0, BITS, BLOCK_R)
        gacc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for win in range(n_windows):
            slots = win * SLOTS + tl.arange(0, SLOTS)
            slot_mask = (slots < n_slots)[None, :, None]
            rel_word = row_word[:, None, None] + slots[None, :, None]
            acc = tl.zeros([BLOCK_R, SLOTS, 32 // BITS], dtype=tl.float32)
            for r in range(0, ROWS, BLOCK_R):
                row_mask = i < (rows - r).to(tl.int32)
                g = tl.load(grad_ptr + r + i, mask=row_mask, other=0.0).to(tl.float32)
                first_word = word_base + ((layer_row0 + r) * n * BITS >> 5)
                q = _slot_codes(words_ptr, num_words, first_word, rel_word, shift,
                                row_mask[:, None, None] & slot_mask, BITS)
                acc += q * g[:, None, None]
                gacc += tl.where(win == 0, g, 0.0)
            tl.store(part_t_ptr + pid * N_PAD + _slot_cols(slots, BITS), tl.sum(acc, axis=0),
                     mask=(slots < n_slots)[:, None])
        tl.store(part_g_ptr + pid, tl.sum(gacc, axis=0))

    @triton.jit
    def _slots_expand_kernel(words_ptr, w_addr_ptr, comp_addr_ptr, u_ptr, s_ptr, prog_seg_ptr, prog_row_ptr,
                             seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr, num_words, n, n_slots, n_windows,
                             W_DTYPE: tl.constexpr, BITS: tl.constexpr, SLOTS: tl.constexpr,
                             N_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr,
                             HAS_COMP: tl.constexpr):
        pid, seg, layer, row0, rows, layer_row0, word_base = _program(
            prog_seg_ptr, prog_row_ptr, seg_layer_ptr, seg_row_ptr, seg_size_ptr, word_off_ptr, ROWS)
        w_ptr = tl.load(w_addr_ptr + seg).to(tl.pointer_type(W_DTYPE)) + row0
        comp_ptr = w_ptr
        if HAS_COMP:
            comp_ptr = tl.load(comp_addr_ptr + seg).to(tl.pointer_type(tl.bfloat16)) + row0
        i, row_word, shift = _row_bits(n, layer_row0, BITS, BLOCK_R)
        s = tl.load(s_ptr + layer)  # Σ_j zero_j Δβ_j
        for r in range(0, ROWS, BLOCK_R):
            rows_left = i < (rows - r).to(tl.int32)
            row_mask = rows_left[:, None, None]
            first_word = word_base + ((layer_row0 + r) * n * BITS >> 5)
            dw = tl.zeros([BLOCK_R], dtype=tl.float32)
            for win in range(n_windows):
                slots = win * SLOTS + tl.arange(0, SLOTS)
                # scale ∘ Δβ, zero past n: masks the padding
                u = tl.load(u_ptr + layer * N_PAD + _slot_cols(slots, BITS))
                q = _slot_codes(words_ptr, num_words, first_word, row_word[:, None, None] + slots[None, :, None], shift,
                                row_mask & (slots < n_slots)[None, :, None], BITS)
                dw += tl.sum(tl.sum(q * u[None, :, :], axis=2), axis=1)
            _update_weights(w_ptr, comp_ptr, r + i, rows_left, dw + s, HAS_COMP)

    @triton.jit
    def _project_reduce_kernel(part_t_ptr, part_g_ptr, layer_prog_ptr, t_ptr, gsum_ptr, n,
                               N_PAD: tl.constexpr, N_P2: tl.constexpr):
        layer = tl.program_id(0).to(tl.int64)
        first = tl.load(layer_prog_ptr + layer)
        last = tl.load(layer_prog_ptr + layer + 1)
        cols = tl.arange(0, N_P2)
        col_mask = cols < n
        t = tl.zeros([N_P2], dtype=tl.float32)
        gsum = tl.zeros([1], dtype=tl.float32)
        for p in range(first, last):  # fixed order: reproducible sums
            t += tl.load(part_t_ptr + p * N_PAD + cols, mask=col_mask, other=0.0)
            gsum += tl.load(part_g_ptr + p + tl.zeros([1], dtype=tl.int64))
        tl.store(t_ptr + layer * n + cols, t, mask=col_mask)
        tl.store(gsum_ptr + layer + tl.zeros([1], dtype=tl.int64), gsum)


class TritonEngine(RowsEngine):
    """P̃ on one device and the two fused launches (plus the small ordered reduction of ``project``).
    ``tile_codes``, ``num_warps`` and ``tiles_per_program`` (or ``rows_per_program``) are the tuning
    knobs (``benchmarks/kernel_variants.py``); ``block_rows`` overrides the rows per tile."""

    name = "triton"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None,
                 block_rows: int | None = None, rows_per_program: int | None = None, tile_codes: int | None = None,
                 num_warps: int = 4, tiles_per_program: int | None = None):
        if not AVAILABLE:
            raise RuntimeError("triton is not installed")
        lay = projection.layout
        self.num_warps = num_warps
        self.n, self.bits = lay.n, lay.bits
        per_word = codes_per_word(lay.bits)
        self.n_slots = -(-lay.n // per_word)
        self.slots = window_slots(self.n_slots)
        self.n_windows = -(-self.n_slots // self.slots)
        self.n_pad = self.n_windows * self.slots * per_word
        self.n_p2 = max(16, 1 << max(0, (lay.n - 1).bit_length()))
        # Tiles of 4K codes on a GPU (measured best on an H100, kernel_variants); the CPU interpreter
        # runs one program at a time, so there fewer, larger programs are much faster.
        tile = tile_codes or (65536 if INTERPRET else DEFAULT_TILE_CODES)
        block_rows = block_rows or 1 << max(0, (max(1, tile // (self.slots * per_word)) - 1).bit_length())
        align = 32 // math.gcd(lay.n * lay.bits, 32)  # every tile starts on a word: BLOCK_R·n·bits ≡ 0 (mod 32)
        self.block_rows = -(-block_rows // align) * align
        if self.block_rows * lay.n * lay.bits >= 2**31:
            raise ValueError("block_rows · n · bits must stay below 2^31")
        tiles = tiles_per_program or (4 if INTERPRET else DEFAULT_TILES_PER_PROGRAM)
        rows = rows_per_program or self.block_rows * tiles
        self.rows = -(-rows // self.block_rows) * self.block_rows
        super().__init__(projection, device, segments, self.rows)
        P, L = self.tables.num_programs, lay.num_layers
        self.part_t = torch.empty(P, self.n_pad, dtype=torch.float32, device=self.device)
        self.part_g = torch.empty(P, dtype=torch.float32, device=self.device)
        self.u = torch.zeros(L, self.n_pad, dtype=torch.float32, device=self.device)

    def _geometry(self):
        tb = self.tables
        return (tb.prog_seg, tb.prog_row, tb.seg_layer, tb.seg_row, tb.seg_size, tb.word_off)

    def _scalars(self):
        return (self.tables.words.numel(), self.n, self.n_slots, self.n_windows)

    def _tiles(self):
        return dict(BITS=self.bits, SLOTS=self.slots, N_PAD=self.n_pad, BLOCK_R=self.block_rows, ROWS=self.rows,
                    num_warps=self.num_warps)

    def project_launches(self, addresses, dtype, t, gsum) -> list[Launch]:
        tb = self.tables
        return [
            Launch(_slots_project_kernel, (tb.num_programs,),
                   (tb.words, addresses, *self._geometry(), self.part_t, self.part_g, *self._scalars()),
                   dict(G_DTYPE=TL_DTYPES[dtype], **self._tiles())),
            Launch(_project_reduce_kernel, (self.layout.num_layers,),
                   (self.part_t, self.part_g, tb.layer_prog, t, gsum, self.n), dict(N_PAD=self.n_pad, N_P2=self.n_p2)),
        ]

    def expand_launches(self, addresses, dtype, comp_addresses, s) -> list[Launch]:
        tb = self.tables
        comp = addresses if comp_addresses is None else comp_addresses
        return [Launch(_slots_expand_kernel, (tb.num_programs,),
                       (tb.words, addresses, comp, self.u, s, *self._geometry(), *self._scalars()),
                       dict(W_DTYPE=TL_DTYPES[dtype], HAS_COMP=comp_addresses is not None, **self._tiles()))]

    def _project_codes(self, addresses, dtype):
        L = self.layout.num_layers
        t = torch.empty(L, self.n, dtype=torch.float32, device=self.device)
        gsum = torch.empty(L, dtype=torch.float32, device=self.device)
        for launch in self.project_launches(addresses, dtype, t, gsum):
            launch()
        return t, gsum

    def _expand_codes(self, addresses, dtype, comp_addresses, u, s):
        self.u[:, : self.n] = u  # padded to whole windows of slots: the padding stays 0
        for launch in self.expand_launches(addresses, dtype, comp_addresses, s):
            launch()


def window_slots(n_slots: int) -> int:
    """Slots per column window (a power of two, at most 32): the widest whose padding is at most one
    slot or 1/8 of the useful ones, so that n = 60 at 4 bits is one window of 8 and n = 300 five of 8."""
    for s in (32, 16, 8, 4, 2):
        padded = -(-n_slots // s) * s
        if padded - n_slots <= 1 or padded * 8 <= n_slots * 9:
            return s
    return 1
