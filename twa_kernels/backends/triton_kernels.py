"""Fused Triton kernels: dequantize-and-project (P̃ᵀg) and dequantize-and-expand (w += P̃Δβ).

Both read the packed codes directly (see :mod:`twa_kernels.packing`), for all layers in one launch:

* The launch grid is a *block table* built once per engine: program ``i`` owns rows
  ``[row0_i, row0_i + ROWS)`` of layer ``layer_i``; no program straddles two layers, so every program
  knows its layer's offsets from two table loads.
* ``project`` writes one partial ``qᵀg`` row (and ``Σg``) per program; a second launch reduces the
  partials of each layer **in program order** and applies the affine dequantization
  ``c = scale·(qᵀg) + zero·Σg``. No float atomics: the same inputs give the same bits every run.
* ``expand`` folds the affine form in as ``Δw = q·(scale∘Δβ) + Σ zero∘Δβ`` and updates the weights in
  place, with Kahan compensation for bf16/fp16 weights (same operation order as the torch reference).
* All offsets are int64 (a 1.3B × 60 × 4-bit P̃ is 39 GB); products are fp32 multiply + ``tl.sum``,
  never ``tl.dot`` (TF32 on GPUs, and a gemv gains nothing from tensor cores).

Each code is fetched with a gather load of its 32-bit word; neighbouring lanes share words, so the
repeats hit L1. A tile of ``R`` rows with ``R·n·B ≡ 0 (mod 32)`` is a whole run of words, which leaves
room for a register-unpacking variant on the same format once it can be profiled on a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the package works without triton (torch / C++ backends)
    AVAILABLE = False

from ..packing import PackedProjection, codes_per_word
from .blocks import BlockTable, next_pow2

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if AVAILABLE:

    @triton.jit
    def _codes(words_ptr, word_base, rows, cols, n, row_mask, col_mask,
               BITS: tl.constexpr, LOG2_PER_WORD: tl.constexpr):
        """Codes [R, C] of rows × cols of one layer whose stream starts at word ``word_base``."""
        k = rows[:, None] * n + cols[None, :]  # int64 code index inside the layer
        mask = row_mask[:, None] & col_mask[None, :]
        word = tl.load(words_ptr + word_base + (k >> LOG2_PER_WORD), mask=mask, other=0)
        shift = ((k & ((1 << LOG2_PER_WORD) - 1)) * BITS).to(tl.int32)
        return (word >> shift) & ((1 << BITS) - 1)

    @triton.jit
    def _round_to(y, dtype: tl.constexpr):
        """fp32 -> ``dtype`` rounding to nearest even. For bf16 the rounding is done on the bits: the
        Triton CPU interpreter truncates fp32 -> bf16, GPUs round to nearest; this gives the same
        bits on both (overflow rounds to inf as in hardware)."""
        if dtype == tl.bfloat16:
            b = y.to(tl.int32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
            y = b.to(tl.float32, bitcast=True)
        return y.to(dtype)

    @triton.jit
    def _program(prog_layer_ptr, prog_row_ptr, word_off_ptr, param_off_ptr, size_ptr, ROWS: tl.constexpr):
        """This program's layer, its rows [row0, row_end), and the layer's word and element offsets."""
        pid = tl.program_id(0).to(tl.int64)
        layer = tl.load(prog_layer_ptr + pid)
        row0 = tl.load(prog_row_ptr + pid)
        row_end = tl.minimum(tl.load(size_ptr + layer), row0 + ROWS)
        return pid, layer, row0, row_end, tl.load(word_off_ptr + layer), tl.load(param_off_ptr + layer)

    @triton.jit
    def _project_partials_kernel(words_ptr, grad_ptr, prog_layer_ptr, prog_row_ptr, word_off_ptr,
                                 param_off_ptr, size_ptr, part_t_ptr, part_g_ptr, n,
                                 BITS: tl.constexpr, LOG2_PER_WORD: tl.constexpr, N_P2: tl.constexpr,
                                 BLOCK_R: tl.constexpr, ROWS: tl.constexpr):
        pid, layer, row0, row_end, word_base, param_base = _program(
            prog_layer_ptr, prog_row_ptr, word_off_ptr, param_off_ptr, size_ptr, ROWS)
        cols = tl.arange(0, N_P2)
        col_mask = cols < n
        acc = tl.zeros([BLOCK_R, N_P2], dtype=tl.float32)
        gacc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r in range(0, ROWS, BLOCK_R):
            rows = row0 + r + tl.arange(0, BLOCK_R).to(tl.int64)
            row_mask = rows < row_end
            g = tl.load(grad_ptr + param_base + rows, mask=row_mask, other=0.0).to(tl.float32)
            q = _codes(words_ptr, word_base, rows, cols, n, row_mask, col_mask, BITS, LOG2_PER_WORD)
            acc += q.to(tl.float32) * g[:, None]
            gacc += g
        tl.store(part_t_ptr + pid * N_P2 + cols, tl.sum(acc, axis=0))
        tl.store(part_g_ptr + pid, tl.sum(gacc, axis=0))

    @triton.jit
    def _project_reduce_kernel(part_t_ptr, part_g_ptr, layer_prog_ptr, scale_ptr, zero_ptr, out_ptr, n,
                               N_P2: tl.constexpr):
        layer = tl.program_id(0).to(tl.int64)
        first = tl.load(layer_prog_ptr + layer)
        last = tl.load(layer_prog_ptr + layer + 1)
        cols = tl.arange(0, N_P2)
        col_mask = cols < n
        t = tl.zeros([N_P2], dtype=tl.float32)
        gsum = tl.zeros([1], dtype=tl.float32)
        for p in range(first, last):  # fixed order: reproducible sums
            t += tl.load(part_t_ptr + p * N_P2 + cols)
            gsum += tl.load(part_g_ptr + p + tl.zeros([1], dtype=tl.int64))
        scale = tl.load(scale_ptr + layer * n + cols, mask=col_mask, other=0.0)
        zero = tl.load(zero_ptr + layer * n + cols, mask=col_mask, other=0.0)
        c = scale * t + zero * tl.sum(gsum, axis=0)
        tl.store(out_ptr + layer * n + cols, c, mask=col_mask)

    @triton.jit
    def _expand_kernel(words_ptr, w_ptr, comp_ptr, u_ptr, s_ptr, prog_layer_ptr, prog_row_ptr,
                       word_off_ptr, param_off_ptr, size_ptr, n,
                       BITS: tl.constexpr, LOG2_PER_WORD: tl.constexpr, N_P2: tl.constexpr,
                       BLOCK_R: tl.constexpr, ROWS: tl.constexpr, HAS_COMP: tl.constexpr):
        pid, layer, row0, row_end, word_base, param_base = _program(
            prog_layer_ptr, prog_row_ptr, word_off_ptr, param_off_ptr, size_ptr, ROWS)
        cols = tl.arange(0, N_P2)
        col_mask = cols < n
        u = tl.load(u_ptr + layer * N_P2 + cols)  # scale ∘ Δβ, zero beyond n
        s = tl.load(s_ptr + layer)  # Σ_j zero_j Δβ_j
        for r in range(0, ROWS, BLOCK_R):
            rows = row0 + r + tl.arange(0, BLOCK_R).to(tl.int64)
            row_mask = rows < row_end
            q = _codes(words_ptr, word_base, rows, cols, n, row_mask, col_mask, BITS, LOG2_PER_WORD)
            dw = tl.sum(q.to(tl.float32) * u[None, :], axis=1) + s
            ptr = w_ptr + param_base + rows
            w = tl.load(ptr, mask=row_mask, other=0.0)
            if HAS_COMP:
                cptr = comp_ptr + param_base + rows
                comp = tl.load(cptr, mask=row_mask, other=0.0).to(tl.float32)
                y = w.to(tl.float32) + (dw + comp)
                new = _round_to(y, w_ptr.dtype.element_ty)
                tl.store(cptr, _round_to(y - new.to(tl.float32), comp_ptr.dtype.element_ty), mask=row_mask)
                tl.store(ptr, new, mask=row_mask)
            else:
                tl.store(ptr, _round_to(w.to(tl.float32) + dw, w_ptr.dtype.element_ty), mask=row_mask)


class TritonEngine:
    name = "triton"

    def __init__(self, projection: PackedProjection, device: torch.device,
                 block_rows: int | None = None, rows_per_program: int | None = None):
        if not AVAILABLE:
            raise RuntimeError("triton is not installed")
        lay = projection.layout
        self.layout = lay
        self.n = lay.n
        self.n_p2 = max(16, next_pow2(lay.n))
        # Tiles of about 4K codes on a GPU; the CPU interpreter runs one program at a time, so there
        # fewer, larger programs are much faster.
        default_block = max(16, 4096 // self.n_p2) if not INTERPRET else max(16, 65536 // self.n_p2)
        self.block_rows = block_rows or default_block
        self.rows = rows_per_program or (self.block_rows * (8 if not INTERPRET else 4))
        if self.rows % self.block_rows:
            raise ValueError("rows_per_program must be a multiple of block_rows")
        self.bits = lay.bits
        self.log2_per_word = codes_per_word(lay.bits).bit_length() - 1
        self.words = projection.words.to(device)
        self.scale = projection.scale.to(device).contiguous()
        self.zero = projection.zero.to(device).contiguous()
        self.word_off = lay.word_offsets[:-1].to(device)
        self.param_off = lay.param_offsets[:-1].to(device)
        self.sizes = torch.tensor(lay.sizes, dtype=torch.int64, device=device)
        self.table = BlockTable(lay.sizes, self.rows, device)
        P, L = self.table.num_programs, lay.num_layers
        self.part_t = torch.empty(P, self.n_p2, dtype=torch.float32, device=device)
        self.part_g = torch.empty(P, dtype=torch.float32, device=device)
        self.u = torch.zeros(L, self.n_p2, dtype=torch.float32, device=device)

    def _check(self, flat: torch.Tensor, what: str) -> None:
        if flat.numel() != self.layout.numel or not flat.is_contiguous():
            raise ValueError(f"{what} must be a contiguous flat vector of {self.layout.numel} elements")
        if flat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the triton backend computes in fp32 and takes fp32/bf16/fp16 {what}, "
                             f"not {flat.dtype}; use backend='torch' for float64")

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        self._check(grad, "gradients")
        out = torch.empty(self.layout.num_layers, self.n, dtype=torch.float32, device=grad.device)
        tb = self.table
        _project_partials_kernel[(tb.num_programs,)](
            self.words, grad, tb.prog_layer, tb.prog_row, self.word_off, self.param_off, self.sizes,
            self.part_t, self.part_g, self.n, BITS=self.bits, LOG2_PER_WORD=self.log2_per_word,
            N_P2=self.n_p2, BLOCK_R=self.block_rows, ROWS=self.rows)
        _project_reduce_kernel[(self.layout.num_layers,)](
            self.part_t, self.part_g, tb.layer_prog, self.scale, self.zero, out, self.n, N_P2=self.n_p2)
        return out

    def expand(self, weights: torch.Tensor, delta: torch.Tensor,
               compensation: torch.Tensor | None = None) -> None:
        self._check(weights, "weights")
        delta = delta.to(torch.float32)
        self.u[:, : self.n] = self.scale * delta
        s = (self.zero * delta).sum(dim=1)
        tb = self.table
        _expand_kernel[(tb.num_programs,)](
            self.words, weights, weights if compensation is None else compensation, self.u, s,
            tb.prog_layer, tb.prog_row, self.word_off, self.param_off, self.sizes, self.n,
            BITS=self.bits, LOG2_PER_WORD=self.log2_per_word, N_P2=self.n_p2,
            BLOCK_R=self.block_rows, ROWS=self.rows, HAS_COMP=compensation is not None)
