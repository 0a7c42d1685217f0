"""What the Triton kernels of both families share: the dtypes they take, the rounding and the
(Kahan-compensated) weight update they end expand with, and :class:`Launch`, one launch as an engine
makes it (the AOT compile, :mod:`.aot`, compiles the same objects).

Importing this imports triton, which reads ``TRITON_INTERPRET`` once: the registry imports the kernel
modules only when a Triton backend is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # the package works without triton (torch / C++ backends)
    AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if AVAILABLE:
    TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

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
    def _update_weights(w_ptr, comp_ptr, offs, mask, dw, HAS_COMP: tl.constexpr):
        """w += dw in place; with HAS_COMP, Kahan-compensated in the torch reference's order. ``mask``
        None: every offset is in range (no predicates)."""
        ptr = w_ptr + offs
        if mask is None:
            w = tl.load(ptr)
        else:
            w = tl.load(ptr, mask=mask, other=0.0)
        if HAS_COMP:
            cptr = comp_ptr + offs
            if mask is None:
                comp = tl.load(cptr).to(tl.float32)
            else:
                comp = tl.load(cptr, mask=mask, other=0.0).to(tl.float32)
            y = w.to(tl.float32) + (dw + comp)
            new = _round_to(y, w_ptr.dtype.element_ty)
            tl.store(cptr, _round_to(y - new.to(tl.float32), comp_ptr.dtype.element_ty), mask=mask)
            tl.store(ptr, new, mask=mask)
        else:
            tl.store(ptr, _round_to(w.to(tl.float32) + dw, w_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the engine makes it: ``kernel[grid](*args, **constants)``."""

    kernel: object
    grid: tuple[int, ...]
    args: tuple
    constants: dict

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constants)
