"""The C++/CUDA extension from ``csrc/``: the ``cpp`` (CPU, OpenMP) and ``cuda`` backends.

Loading order: the module built at install time (``twa_kernels._C``); otherwise it is compiled on
first use with ``torch.utils.cpp_extension.load`` and cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``); if that fails too the package warns once and runs on the other backends.
``TWA_NO_EXTENSION=1`` turns the extension off.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..packing import PackedProjection
from .blocks import BlockTable

_STATE: dict = {}


def _compile():
    from torch.utils import cpp_extension

    from .extension_sources import extension_kwargs

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None \
        and torch.cuda.is_available()
    kw = extension_kwargs(with_cuda=with_cuda, native=True)
    kw.pop("with_cuda")
    cflags = kw["extra_compile_args"]["cxx"] + [f"-D{m}" for m, _ in kw["define_macros"]]
    return cpp_extension.load(
        name="twa_kernels_C" + ("_cuda" if with_cuda else "_cpu"), sources=kw["sources"],
        extra_cflags=cflags, extra_cuda_cflags=kw["extra_compile_args"].get("nvcc", []) +
        [f"-D{m}" for m, _ in kw["define_macros"]], extra_ldflags=kw["extra_link_args"],
        with_cuda=with_cuda, verbose=False)


def load():
    """The extension module, or None (with one warning saying why)."""
    if "module" in _STATE:
        return _STATE["module"]
    module = None
    if os.environ.get("TWA_NO_EXTENSION") != "1":
        try:
            from .. import _C as module  # built by setup.py
        except ImportError:
            try:
                module = _compile()
            except Exception as err:  # no compiler, no headers, a failed build: other backends work
                warnings.warn(f"twa_kernels: the C++/CUDA extension is unavailable ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}); "
                              "backends 'cpp' and 'cuda' are off, 'triton' and 'torch' still work",
                              RuntimeWarning, stacklevel=3)
    _STATE["module"] = module
    return module


def available(device: torch.device) -> bool:
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False
    module = load()
    if module is None:
        return False
    return device.type == "cpu" or bool(module.with_cuda)


def default_rows_per_program(module, n: int, bits: int, device: torch.device) -> int:
    """CUDA: 64 rows per block. CPU: about 16K codes per program (the portable kernel's unpacked
    codes, 64 KiB of floats, stay in L2), a whole number of periods and at least eight, so that the
    vectorised kernel runs on every program and its per-program tables cost little beside it."""
    if device.type == "cuda":
        return 64
    period = module.period_rows(n, bits)
    rows = max((1 << 14) // n, 8 * period)
    return -(-rows // (4 * period)) * 4 * period


class ExtensionEngine:
    """``vectorized=False`` keeps the cpp backend on its portable kernels (tests run both)."""

    def __init__(self, projection: PackedProjection, device: torch.device, rows_per_program: int | None = None,
                 vectorized: bool = True):
        self.module = load()
        if self.module is None:
            raise RuntimeError("the twa_kernels C++/CUDA extension is unavailable")
        self.name = "cuda" if device.type == "cuda" else "cpp"
        lay = projection.layout
        self.layout = lay
        self.rows = rows_per_program or default_rows_per_program(self.module, lay.n, lay.bits, device)
        # Which CPU kernel runs (the rule is the extension's own: CPU, n and program alignment).
        self.vectorized = bool(vectorized and device.type == "cpu"
                               and self.module.cpu_vector_kernel_fits(lay.n, lay.bits, self.rows))
        table = BlockTable(lay.sizes, self.rows, device)
        self.tables = [
            projection.words.to(device), lay.word_offsets[:-1].to(device), lay.param_offsets[:-1].to(device),
            torch.tensor(lay.sizes, dtype=torch.int64, device=device), table.prog_layer, table.prog_row,
            table.layer_prog, projection.scale.to(device).contiguous(), projection.zero.to(device).contiguous(),
        ]

    def project(self, grad: torch.Tensor) -> torch.Tensor:
        return self.module.project(self.tables, self.rows, self.layout.n, self.layout.bits, grad,
                                   self.layout.numel, self.vectorized)

    def expand(self, weights: torch.Tensor, delta: torch.Tensor,
               compensation: torch.Tensor | None = None) -> None:
        self.module.expand(self.tables, self.rows, self.layout.n, self.layout.bits, weights, compensation,
                           delta.to(torch.float32).contiguous(), self.layout.numel, self.vectorized)
