"""The packed B-bit format of the projection P̃ = [P̃^1 … P̃^L].

Layout (every backend reads exactly this; pack and unpack below are its definition):

* Each layer ``l`` is a ``D_l × n`` matrix stored **row-major** as one stream of codes: code
  ``k = d·n + j`` is entry ``(d, j)``. One row (the ``n`` coefficients of one weight) is therefore
  contiguous, so ``P̃ᵀg`` and ``P̃Δβ`` both read a tile of rows as one contiguous byte range.
* The stream is cut into little-endian 32-bit words of ``E = 32 / B`` codes each. Code ``k`` sits in
  word ``k // E`` at bits ``[(k % E)·B, (k % E)·B + B)``: the **first code takes the lowest bits**.
  In bytes: for B = 4, element 0 of a pair is the *low* nibble (``codes [1, 2] -> byte 0x21``); for
  B = 2, ``codes [0, 1, 2, 3] -> byte 0b11100100``.
* Layer ``l`` starts at word ``word_offsets[l]`` (int64: a 1.3B-parameter model with n = 60 at
  4 bits needs 39 GB, past 2^31), so every layer starts on a word boundary; the unused tail bits of
  a layer's last word are zero.
* Dequantization is affine per (layer, column): ``P̃^l[d, j] = scale[l, j] · q + zero[l, j]``.
  The paper's per-layer quantization (Eq. 16) repeats one ``(a, b)`` along the row. A column that is
  zero (a checkpoint equal to the centre, a layer that never moved) has ``scale = zero = 0`` and so
  decodes to exactly 0 whatever its codes.

``bits=None`` keeps P in fp32 as one ``[D, n]`` row-major matrix (the paper's "TWA w/o quantization").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

SUPPORTED_BITS = (1, 2, 4, 8)
WORD_BITS = 32


def check_bits(bits) -> None:
    if bits is None:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit width {bits!r}: choose one of {SUPPORTED_BITS} or None for fp32"
        )


def codes_per_word(bits: int) -> int:
    return WORD_BITS // bits


def words_for(num_codes: int, bits: int) -> int:
    return -(-num_codes // codes_per_word(bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (any shape, read row-major) into int32 words, first code in the low bits."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    per_word = codes_per_word(bits)
    pad = (-flat.numel()) % per_word
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per_word, dtype=torch.int64, device=flat.device) * bits
    words = (flat.view(-1, per_word) << shifts).sum(dim=1)
    # Two's-complement wrap of bit 31 into the int32 sign bit; the bit pattern is what matters.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, num_codes: int, first_code: int = 0) -> torch.Tensor:
    """Codes ``first_code … first_code + num_codes - 1`` of a word stream, as uint8."""
    check_bits(bits)
    per_word = codes_per_word(bits)
    w0 = first_code // per_word
    w1 = words_for(first_code + num_codes, bits)
    chunk = words[w0:w1].to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    codes = (chunk[:, None] >> shifts) & ((1 << bits) - 1)
    skip = first_code - w0 * per_word
    return codes.reshape(-1)[skip : skip + num_codes].to(torch.uint8)


def or_codes_into(words: torch.Tensor, first_code: int, codes: torch.Tensor, bits: int) -> None:
    """Write ``codes`` at code position ``first_code`` of a zero-initialised word stream (in place).

    Lets a layer be packed chunk by chunk from chunks that need not start on a word boundary."""
    per_word = codes_per_word(bits)
    lead = first_code % per_word
    flat = codes.reshape(-1)
    if lead:
        flat = torch.cat([flat.new_zeros(lead), flat])
    packed = pack_codes(flat, bits)
    w0 = first_code // per_word
    words[w0 : w0 + packed.numel()] |= packed


@dataclass(frozen=True)
class LayerLayout:
    """Sizes and offsets of the L layers inside the flat parameter vector and the packed stream."""

    sizes: tuple[int, ...]
    n: int
    bits: int | None

    def __post_init__(self):
        check_bits(self.bits)
        if self.n < 1:
            raise ValueError("a subspace needs at least one column")
        # A rank of a row-sharded subspace may hold no rows of some layers: sizes may be 0 there.
        if any(s < 0 for s in self.sizes):
            raise ValueError("layer sizes cannot be negative")

    @property
    def num_layers(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @cached_property
    def param_offsets(self) -> torch.Tensor:
        """int64 [L + 1]: layer l is ``flat[param_offsets[l]:param_offsets[l + 1]]``."""
        return cumsum_from_zero(self.sizes)

    @cached_property
    def word_offsets(self) -> torch.Tensor:
        """int64 [L + 1]: layer l's codes are ``words[word_offsets[l]:word_offsets[l + 1]]``."""
        if self.bits is None:
            raise ValueError("an fp32 subspace has no packed words")
        return cumsum_from_zero([words_for(s * self.n, self.bits) for s in self.sizes])

    @property
    def num_words(self) -> int:
        return int(self.word_offsets[-1])


def cumsum_from_zero(values) -> torch.Tensor:
    """int64 [len + 1]: 0, then the running sums of ``values`` (offsets of consecutive pieces)."""
    out = torch.zeros(len(values) + 1, dtype=torch.int64)
    out[1:] = torch.cumsum(torch.tensor(list(values), dtype=torch.int64), 0)
    return out


@dataclass
class PackedProjection:
    """P̃ for all layers: packed codes (or dense fp32) plus per-(layer, column) scale and zero."""

    layout: LayerLayout
    scale: torch.Tensor  # fp32 [L, n]
    zero: torch.Tensor  # fp32 [L, n]
    words: torch.Tensor | None = None  # int32 [num_words], when bits is not None
    dense_rows: torch.Tensor | None = None  # fp32 [D, n], when bits is None

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def nbytes(self) -> int:
        store = self.words if self.words is not None else self.dense_rows
        return store.numel() * store.element_size() + 2 * self.scale.numel() * 4

    def to(self, device) -> "PackedProjection":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedProjection(
            self.layout, move(self.scale), move(self.zero), move(self.words), move(self.dense_rows)
        )

    def layer_codes(self, layer: int, row_start: int = 0, row_stop: int | None = None) -> torch.Tensor:
        """uint8 codes of rows [row_start, row_stop) of one layer, shape [rows, n]."""
        lay = self.layout
        row_stop = lay.sizes[layer] if row_stop is None else row_stop
        n = lay.n
        w0, w1 = (int(x) for x in lay.word_offsets[layer : layer + 2])
        codes = unpack_codes(self.words[w0:w1], lay.bits, (row_stop - row_start) * n, row_start * n)
        return codes.view(row_stop - row_start, n)

    def dequantize(self, layer: int, row_start: int = 0, row_stop: int | None = None,
                   dtype=torch.float32) -> torch.Tensor:
        """Rows [row_start, row_stop) of P̃^l as floats (only that chunk is materialised)."""
        lay = self.layout
        row_stop = lay.sizes[layer] if row_stop is None else row_stop
        if self.dense_rows is not None:
            base = int(lay.param_offsets[layer])
            return self.dense_rows[base + row_start : base + row_stop].to(dtype)
        q = self.layer_codes(layer, row_start, row_stop).to(dtype)
        return q * self.scale[layer].to(dtype) + self.zero[layer].to(dtype)
