"""The *plane* device layout of P̃'s codes, read by the v2 GPU kernels (``triton_plane``, ``cuda_plane``;
what their engines share is :class:`.engine.PlaneEngine`).

The canonical packed format (:mod:`twa_kernels.packing`: row-major codes, first code in the low
bits) is what is saved, loaded and read on the CPU. On a GPU the engine permutes it once, when P̃
goes to the device, into planes that suit coalesced 16-byte loads — the idea of Marlin's and Machete's
offline weight pre-shuffle. Still one copy of P̃ on the device, read by both products.

With ``E = 32 / bits`` codes per word, ``T`` threads per tile and ``V = min(4, bits)`` words per thread
load (16 bytes at 4 and 8 bits, 8 at 2 bits, 4 at 1 bit):

* a layer's rows are cut into *tiles* of ``R = E·V·T`` rows; a tile stores, for each column ``j``,
  ``PW = V·T`` consecutive words, and word ``q`` of column ``j`` holds rows ``tile0 + i·PW + q`` in its
  field ``i`` (bits ``[i·bits, (i + 1)·bits)``), ``i = 0 … E − 1``;
* so a thread that owns words ``[V·t, V·t + V)`` of a column does one ``V``-word load per column, and
  sees, per field, ``V`` consecutive rows: its gradients and weights load ``V`` elements at a time too;
* a layer's last, partial tile is *narrower* rather than padded to a whole tile: ``pw`` words per column
  with ``pw`` the smallest multiple of ``V`` such that ``E·pw`` covers the rows left (at most ``E·V − 1``
  padding rows per layer). Every layer starts on a ``V``-word boundary.

Rows past a layer's end decode to code 0 and are never stored to; any ``n`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from ...packing import PackedProjection, codes_per_word, cumsum_from_zero
from ..contract import Segments


def words_per_load(bits: int) -> int:
    """Words one thread loads per column: 16 bytes where a thread's rows per tile stay ≤ 32
    (registers), fewer at 1 and 2 bits, whose words hold 32 and 16 codes."""
    return min(4, bits)


@dataclass(frozen=True)
class PlaneLayout:
    """Where every code of every layer sits in the plane words (see the module docstring)."""

    sizes: tuple[int, ...]
    n: int
    bits: int
    threads: int

    @property
    def per_word(self) -> int:
        return codes_per_word(self.bits)

    @property
    def vec(self) -> int:
        return words_per_load(self.bits)

    @property
    def tile_words(self) -> int:
        """PW: words per column in a full tile."""
        return self.vec * self.threads

    @property
    def tile_rows(self) -> int:
        return self.per_word * self.tile_words

    def full_tiles(self, layer: int) -> int:
        return self.sizes[layer] // self.tile_rows

    def tail_words(self, layer: int) -> int:
        """pw of the layer's partial last tile (0 when the layer is whole tiles)."""
        rest = self.sizes[layer] - self.full_tiles(layer) * self.tile_rows
        unit = self.per_word * self.vec
        return -(-rest // unit) * self.vec

    def tiles(self, layer: int) -> int:
        return self.full_tiles(layer) + (self.tail_words(layer) > 0)

    def layer_words(self, layer: int) -> int:
        return self.n * (self.full_tiles(layer) * self.tile_words + self.tail_words(layer))

    @cached_property
    def word_offsets(self) -> torch.Tensor:
        """int64 [L + 1]: layer l's plane words are ``[word_offsets[l], word_offsets[l + 1])``."""
        return cumsum_from_zero([self.layer_words(l) for l in range(len(self.sizes))])

    @property
    def num_words(self) -> int:
        return int(self.word_offsets[-1])

    def pack(self, projection: PackedProjection, device, chunk_rows: int = 1 << 18) -> torch.Tensor:
        """The plane words of ``projection`` (canonical packed words, on any device) on ``device``.
        Works in chunks of whole tiles, on the device, so no layer is ever unpacked whole."""
        lay = projection.layout
        if (lay.sizes, lay.n, lay.bits) != (self.sizes, self.n, self.bits):
            raise ValueError("the projection does not have this plane layout's shape")
        device = torch.device(device)
        source = projection.to(device) if projection.device != device else projection
        out = torch.empty(self.num_words, dtype=torch.int32, device=device)
        offs = self.word_offsets.tolist()
        R, PW = self.tile_rows, self.tile_words
        step = max(1, chunk_rows // R)
        for l, size in enumerate(self.sizes):
            pos = offs[l]
            for t0 in range(0, self.full_tiles(l), step):
                t1 = min(self.full_tiles(l), t0 + step)
                codes = source.layer_codes(l, t0 * R, t1 * R)
                words = self._planes(codes, t1 - t0, PW)
                out[pos:pos + words.numel()] = words
                pos += words.numel()
            pw = self.tail_words(l)
            if pw:
                first = self.full_tiles(l) * R
                codes = torch.zeros(self.per_word * pw, self.n, dtype=torch.uint8, device=device)
                codes[:size - first] = source.layer_codes(l, first, size)
                words = self._planes(codes, 1, pw)
                out[pos:pos + words.numel()] = words
                pos += words.numel()
            assert pos == offs[l + 1]
        return out

    def _planes(self, codes: torch.Tensor, tiles: int, pw: int) -> torch.Tensor:
        """codes [tiles·E·pw, n] → words [tiles, n, pw] flattened: word (t, j, q) holds rows
        t·E·pw + i·pw + q of column j in field i."""
        c = codes.view(tiles, self.per_word, pw, self.n).to(torch.int64)
        words = torch.zeros(tiles, self.n, pw, dtype=torch.int64, device=codes.device)
        for i in range(self.per_word):
            words |= c[:, i].transpose(1, 2) << (self.bits * i)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(-1)

    def layer_codes(self, words: torch.Tensor, layer: int) -> torch.Tensor:
        """The inverse of :meth:`pack` for one layer: uint8 codes [D_l, n] (for tests and checks)."""
        start = int(self.word_offsets[layer])
        mask = (1 << self.bits) - 1
        PW, E = self.tile_words, self.per_word
        shifts = torch.arange(E, dtype=torch.int64, device=words.device) * self.bits
        pieces = []
        for t in range(self.tiles(layer)):
            pw = PW if t < self.full_tiles(layer) else self.tail_words(layer)
            w = words[start:start + self.n * pw].to(torch.int64).view(self.n, pw) & 0xFFFFFFFF
            start += self.n * pw
            fields = (w[:, None, :] >> shifts[None, :, None]) & mask  # [n, E, pw]
            pieces.append(fields.permute(1, 2, 0).reshape(E * pw, self.n))
        if not pieces:
            return torch.zeros(0, self.n, dtype=torch.uint8, device=words.device)
        return torch.cat(pieces)[:self.sizes[layer]].to(torch.uint8)


@dataclass(frozen=True)
class PlaneTables:
    """The launch geometry of a plane engine. A program works on at most ``tiles_per_program`` tiles of
    one segment (``[prog_tile[p], prog_end[p])`` of its layer's tiles); a tile that a segment boundary
    cuts is visited by the program of each segment, each taking its own rows. Programs come in layer
    order, so a layer's partial sums are ``[layer_prog[l], layer_prog[l + 1])``, summed in a fixed order."""

    plane: PlaneLayout
    words: torch.Tensor  # int32: the plane words
    word_off: torch.Tensor  # [L]
    full_tiles: torch.Tensor  # [L]
    tail_words: torch.Tensor  # [L]
    seg_layer: torch.Tensor  # [S]
    seg_row: torch.Tensor  # [S]
    seg_size: torch.Tensor  # [S]
    prog_seg: torch.Tensor  # [P]
    prog_tile: torch.Tensor  # [P]
    prog_end: torch.Tensor  # [P]
    layer_prog: torch.Tensor  # [L + 1]
    tiles_per_program: int

    @classmethod
    def build(cls, plane: PlaneLayout, words: torch.Tensor, segments: Segments, tiles_per_program: int,
              device) -> "PlaneTables":
        R = plane.tile_rows
        prog_seg, prog_tile, prog_end = [], [], []
        per_layer = [0] * len(plane.sizes)
        for s, (size, layer, row) in enumerate(zip(segments.sizes, segments.layer, segments.row)):
            first, last = row // R, (row + size - 1) // R + 1
            for t in range(first, last, tiles_per_program):
                prog_seg.append(s)
                prog_tile.append(t)
                prog_end.append(min(last, t + tiles_per_program))
                per_layer[layer] += 1
        L = len(plane.sizes)

        def long(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64).to(device)

        return cls(plane=plane, words=words, word_off=plane.word_offsets[:-1].to(device),
                   full_tiles=long(plane.full_tiles(l) for l in range(L)),
                   tail_words=long(plane.tail_words(l) for l in range(L)),
                   seg_layer=long(segments.layer), seg_row=long(segments.row), seg_size=long(segments.sizes),
                   prog_seg=long(prog_seg), prog_tile=long(prog_tile), prog_end=long(prog_end),
                   layer_prog=cumsum_from_zero(per_layer).to(device), tiles_per_program=int(tiles_per_program))

    @property
    def num_programs(self) -> int:
        return self.prog_seg.numel()
