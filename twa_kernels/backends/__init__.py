"""One dispatch point for the projection kernels.

An *engine* holds P̃ on one device and offers two operations over all layers at once:

* ``project(grad) -> c``: c[l] = P̃^lᵀ grad^l, ``[L, n]`` in float32 (float64 for float64 grads);
* ``expand(weights, delta, compensation=None)``: weights^l += P̃^l delta[l], in place.

``grad`` and ``weights`` are flat vectors of all parameters in layer order. Backends:

=========  ==========================================================================
``triton``  fused Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``)
``cuda``    CUDA C++ extension from ``csrc/``
``cpp``     CPU C++/OpenMP extension from ``csrc/``
``torch``   the plain reference (dequantize a chunk, then matmul), any device
=========  ==========================================================================

``bits=None`` (fp32 P, "TWA w/o quantization") is a dense matmul whatever the backend.
"""

from __future__ import annotations

import os

import torch

from ..packing import PackedProjection

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        try:
            from . import triton_kernels
        except ImportError:
            return False
        return triton_kernels.AVAILABLE
    return False


def _extension_usable(device: torch.device) -> bool:
    try:
        from . import extension
    except ImportError:
        return False
    return extension.available(device)


def available_backends(device) -> list[str]:
    device = torch.device(device)
    out = []
    if _triton_usable(device):
        out.append("triton")
    if device.type == "cuda" and _extension_usable(device):
        out.append("cuda")
    if device.type == "cpu" and _extension_usable(device):
        out.append("cpp")
    out.append("torch")
    return out


def resolve_backend(backend: str, device) -> str:
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    usable = available_backends(device)
    if backend == "auto":
        preferred = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpp", "torch")
        return next(b for b in preferred if b in usable)
    if backend not in usable:
        hint = {
            "triton": "needs a CUDA device (or TRITON_INTERPRET=1 set before import, on CPU) and triton",
            "cuda": "needs a CUDA device and the compiled csrc/ extension",
            "cpp": "needs CPU tensors and the compiled csrc/ extension",
        }[backend]
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: it {hint}")
    return backend


def make_engine(projection: PackedProjection, device, backend: str = "auto", dtype=None):
    """The engine for parameters of ``dtype`` on ``device``. The kernels compute in fp32: float64
    parameters get the reference under "auto" and an error from an explicit kernel backend."""
    device = torch.device(device)
    name = resolve_backend(backend, device)  # unknown or unusable backends are reported first
    if dtype == torch.float64:
        if backend not in ("auto", "torch"):
            raise ValueError(f"backend {backend!r} computes in fp32; float64 parameters need backend='torch'")
        name = "torch"
    if projection.layout.bits is None:
        from .dense import DenseEngine

        return DenseEngine(projection, device)
    if name == "triton":
        from .triton_kernels import TritonEngine

        return TritonEngine(projection, device)
    if name in ("cuda", "cpp"):
        from .extension import ExtensionEngine

        return ExtensionEngine(projection, device)
    from .torch_ref import TorchEngine

    return TorchEngine(projection, device)
