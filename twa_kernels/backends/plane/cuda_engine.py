"""The v2 CUDA kernels on the plane device layout (:mod:`.layout`): backend ``cuda_plane``.

The kernels are ``csrc/plane/twa_cuda_plane.cu`` (in the ``_C_cuda`` module, beside the shipped
``cuda`` kernels); their per-thread work is ``csrc/plane/twa_plane.h``, which also compiles for the host,
so the tests run it against the torch reference on a machine without a GPU (``tests/test_cuda_plane.py``). Like
``triton_plane`` they are selectable and not taken by ``"auto"`` until a GPU run has passed the GPU
tests with them and measured them faster.

The design is the Triton plane kernels' (one ``V``-word load per column, a field in LOP3 + FADD +
FFMA, per-thread accumulators; project's partial rows reduced and folded by one small launch in a
fixed order; ``u``/``s`` formed inside expand), with 128 threads per tile and per block, two tiles
per program and eight columns per project pass: the kernels are compiled for that shape.
"""

from __future__ import annotations

import torch

from ...packing import PackedProjection
from .. import extension
from ..contract import Segments
from .engine import PlaneEngine

THREADS = 128  # kThreads in csrc/plane/twa_cuda_plane.cu
COLUMN_BLOCK = 8  # kColumnBlock in csrc/plane/twa_plane.h


class CudaPlaneEngine(PlaneEngine):
    """P̃ in the plane layout on a GPU and the two ``_C_cuda`` plane entry points (project with its
    reduction and fold; expand). ``kernels`` replaces the module (an object with the same
    ``plane_project`` / ``plane_expand``): the tests pass the host build of the same kernels, with
    ``threads`` set to the tile width that build was compiled for."""

    name = "cuda_plane"

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None,
                 tiles_per_program: int = 2, kernels=None, threads: int = THREADS):
        device = torch.device(device)
        if kernels is None:
            if threads != THREADS:
                raise ValueError(f"the cuda_plane kernels are compiled for {THREADS} threads per tile")
            kernels = extension.load("cuda") if device.type == "cuda" else None
            if kernels is None:
                reason = extension.status("cuda").reason if device.type == "cuda" else f"{device} is not a GPU"
                raise RuntimeError(f"the cuda_plane backend is unavailable: {reason}")
        self.kernels = kernels
        super().__init__(projection, device, segments, threads, tiles_per_program, COLUMN_BLOCK)

    def project(self, grads) -> torch.Tensor:
        """c = P̃ᵀg, ``[L, n]`` float32, for a flat gradient vector or a list of segment tensors."""
        addresses, dtype = self.addresses.grads(grads)
        return self.kernels.plane_project(self.tables, addresses, dtype, self.scale, self.zero, self.part_t,
                                          self.part_g)

    def expand(self, weights, delta: torch.Tensor, compensation=None) -> None:
        """weights += P̃Δβ in place; with ``compensation`` (bf16, like ``weights``), Kahan-compensated."""
        w_addr, dtype, c_addr = self.addresses.weights(weights, compensation)
        delta = delta.to(self.device, torch.float32).contiguous()
        self.kernels.plane_expand(self.tables, w_addr, dtype, c_addr, self.scale, self.zero, delta)
