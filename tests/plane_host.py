"""The host build of the cuda_plane kernels (tests/csrc/plane_host.cpp over csrc/plane/twa_plane.h), behind
the interface of ``_C_cuda``'s plane entry points, so that ``CudaPlaneEngine`` runs on the CPU in tests.

Compiled once per source content with the system C++ compiler (no torch headers: seconds), into a
directory of its own under the system's temporary directory; ``-ffp-contract=off`` so the compiler fuses no
multiply-add the GPU code does not (the kernels spell every fused one as ``fmaf``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from twa_kernels.backends.plane.cuda_engine import COLUMN_BLOCK

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "csrc" / "plane_host.cpp", ROOT / "csrc" / "plane" / "twa_plane.h", ROOT / "csrc" / "twa_layout.h"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # tiles of 8 or 128 threads (plane_host.cpp's dispatch)

_POINTERS = ("words", "word_off", "full_tiles", "tail_words", "seg_layer", "seg_row", "seg_size", "prog_seg",
             "prog_tile", "prog_end", "layer_prog")


class _Tables(ctypes.Structure):
    """csrc/plane/twa_plane.h's PlaneTables."""
    _fields_ = [(name, ctypes.c_void_p) for name in _POINTERS] + [
        ("num_programs", ctypes.c_int64), ("num_layers", ctypes.c_int64), ("num_segments", ctypes.c_int64),
        ("n", ctypes.c_int), ("n_pad", ctypes.c_int), ("bits", ctypes.c_int), ("threads", ctypes.c_int)]


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build() -> ctypes.CDLL:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"twa_plane_host_{digest}"
    lib = out_dir / "plane_host.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"plane_host.{os.getpid()}.so"
        subprocess.run([compiler(), "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC",
                        f"-I{ROOT / 'csrc'}", str(SOURCES[0]), "-o", str(tmp)], check=True, capture_output=True)
        os.replace(tmp, lib)  # atomic: a parallel build never loads a half-written file
    return ctypes.CDLL(str(lib))


def _ptr(x: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if x is None else x.data_ptr())


class HostPlaneKernels:
    """``plane_project`` / ``plane_expand`` with ``_C_cuda``'s arguments, run by the host build."""

    def __init__(self):
        self.lib = build()
        for fn in (self.lib.twa_plane_host_project, self.lib.twa_plane_host_expand):
            fn.restype = ctypes.c_int

    @staticmethod
    def _tables(tb, n_pad: int) -> _Tables:
        plane = tb.plane
        return _Tables(*[_ptr(getattr(tb, name)) for name in _POINTERS], tb.num_programs, len(plane.sizes),
                       tb.seg_size.numel(), plane.n, n_pad, plane.bits, plane.threads)

    @staticmethod
    def _check(rc: int):
        if rc:
            raise ValueError({1: "bit width", 2: "dtype", 3: "threads per tile"}[rc] + " not in the host build")

    def plane_project(self, tables, addresses, dtype, scale, zero, part_t, part_g) -> torch.Tensor:
        c = torch.empty(len(tables.plane.sizes), tables.plane.n, dtype=torch.float32)
        t = self._tables(tables, part_t.shape[1])
        self._check(self.lib.twa_plane_host_project(ctypes.byref(t), _ptr(addresses), DTYPES[dtype], _ptr(scale),
                                                    _ptr(zero), _ptr(part_t), _ptr(part_g), _ptr(c)))
        return c

    def plane_expand(self, tables, w_addr, dtype, c_addr, scale, zero, delta) -> None:
        t = self._tables(tables, -(-tables.plane.n // COLUMN_BLOCK) * COLUMN_BLOCK)
        self._check(self.lib.twa_plane_host_expand(ctypes.byref(t), _ptr(w_addr), DTYPES[dtype], _ptr(c_addr),
                                                   _ptr(scale), _ptr(zero), _ptr(delta)))
