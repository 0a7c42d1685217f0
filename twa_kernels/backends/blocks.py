"""The launch grid shared by the kernel backends.

Every kernel backend cuts each layer into runs of ``rows_per_program`` rows; a program (Triton
program, CUDA block, OpenMP task) owns one run, never two layers, so it finds its offsets with two
table loads, and per-layer reductions read the partials of ``[layer_prog[l], layer_prog[l + 1])`` in a
fixed order (reproducible results, no float atomics).
"""

from __future__ import annotations

import torch


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class BlockTable:
    """The launch grid shared by project and expand: (layer, first row) per program, int64 rows."""

    def __init__(self, sizes, rows_per_program: int, device):
        sizes_t = torch.tensor(sizes, dtype=torch.int64)
        counts = (sizes_t + rows_per_program - 1) // rows_per_program
        self.num_programs = int(counts.sum())
        self.prog_layer = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), counts)
        starts = torch.zeros(len(sizes) + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(counts, 0)
        local = torch.arange(self.num_programs, dtype=torch.int64) - starts[self.prog_layer]
        self.prog_row = (local * rows_per_program).to(device)
        self.prog_layer = self.prog_layer.to(device)
        self.layer_prog = starts.to(device)  # programs of layer l: [layer_prog[l], layer_prog[l + 1])
