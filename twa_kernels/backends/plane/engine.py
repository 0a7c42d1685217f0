"""What the plane engines (``triton_plane``, ``cuda_plane``) share."""

from __future__ import annotations

import torch

from ...packing import PackedProjection
from ..contract import KernelEngine, Segments
from .layout import PlaneLayout, PlaneTables


class PlaneEngine(KernelEngine):
    """P̃'s plane words on the device (one copy, permuted from the canonical words once), the launch
    tables, and project's partial buffers (rows padded to ``column_block``); the scales, zeros and
    address tables are :class:`~..contract.KernelEngine`'s. Subclasses launch, and fold in their reduce
    launch."""

    name = "plane"

    def __init__(self, projection: PackedProjection, device, segments: Segments | None, threads: int,
                 tiles_per_program: int, column_block: int):
        lay = projection.layout
        if lay.bits is None:
            raise ValueError("the plane layout holds packed codes; an fp32 P is a dense matmul")
        super().__init__(projection, device, segments)
        self.plane = PlaneLayout(tuple(lay.sizes), lay.n, lay.bits, threads)
        self.tables = PlaneTables.build(self.plane, self.plane.pack(projection, self.device), self.segments,
                                        tiles_per_program, self.device)
        self.column_block = column_block
        self.n_pad = -(-lay.n // column_block) * column_block
        self.part_t = torch.empty(self.tables.num_programs, self.n_pad, dtype=torch.float32, device=self.device)
        self.part_g = torch.empty(self.tables.num_programs, dtype=torch.float32, device=self.device)
