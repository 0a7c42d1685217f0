"""The rows kernels of the extension modules (``csrc/rows/``): backends ``cpp`` (``_C``, CPU,
OpenMP with AVX2 + FMA kernels chosen at run time) and ``cuda`` (``_C_cuda``). The modules are built or
loaded by :mod:`..extension`; this is the engine that launches them."""

from __future__ import annotations

import torch

from ...packing import PackedProjection
from .. import extension
from ..contract import Segments
from .engine import RowsEngine


def default_rows_per_program(module, n: int, bits: int, device: torch.device) -> int:
    """CUDA: 64 rows per block. CPU: about 16K codes per program (the portable kernel's unpacked
    codes, 64 KiB of floats, stay in L2), a whole number of periods and at least eight, so that the
    vectorised kernel runs on every program and its per-program tables cost little beside it."""
    if device.type == "cuda":
        return 64
    period = module.period_rows(n, bits)
    rows = max((1 << 14) // n, 8 * period)
    return -(-rows // (4 * period)) * 4 * period


class ExtensionEngine(RowsEngine):
    """The cpp or cuda backend: the kernels of the extension module for the device.
    ``vectorized=False`` keeps the cpp backend on its portable kernels (tests run both)."""

    def __init__(self, projection: PackedProjection, device: torch.device, segments: Segments | None = None,
                 rows_per_program: int | None = None, vectorized: bool = True):
        device = torch.device(device)
        kind = "cuda" if device.type == "cuda" else "cpu"
        self.module = extension.load(kind)
        if self.module is None:
            raise RuntimeError(f"the twa_kernels {kind} extension is unavailable: {extension.status(kind).reason}")
        self.name = "cuda" if kind == "cuda" else "cpp"
        lay = projection.layout
        rows = rows_per_program or default_rows_per_program(self.module, lay.n, lay.bits, device)
        super().__init__(projection, device, segments, rows)
        # Which CPU kernel runs (the rule is the extension's own: CPU, n and program alignment).
        self.vectorized = bool(vectorized and kind == "cpu" and self.module.cpu_vector_kernel_fits(lay.n, lay.bits, rows))
        self._cpu_args = (self.vectorized,) if kind == "cpu" else ()

    def _project_codes(self, addresses, dtype):
        return self.module.project(self.tables, addresses, dtype, *self._cpu_args)

    def _expand_codes(self, addresses, dtype, comp_addresses, u, s):
        self.module.expand(self.tables, addresses, dtype, comp_addresses, u, s, *self._cpu_args)
