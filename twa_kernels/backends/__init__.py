"""One dispatch point for the projection kernels.

An *engine* holds P̃ on one device and offers two operations over all layers at once:

* ``project(grads) -> c``: c[l] = P̃^lᵀ grad^l, ``[L, n]`` in float32 (float64 for float64 grads);
* ``expand(weights, delta, compensation=None)``: weights^l += P̃^l delta[l], in place.

``grads`` and ``weights`` are the parameters' own tensors, as a list of segments in layer order, or one
flat vector of all layers (:mod:`.contract`: the protocol every engine implements and what they share).
The backends form one registry (:data:`REGISTRY`, in :mod:`.registry`): each names the devices it runs
on, how to tell whether it runs here (a probe that says why not, and the command that fixes it), and
how to make its engine. The kernels come in two families, a folder each (``csrc/`` mirrors them):

================  ==========================================================================
``triton``        rows family (:mod:`.rows`): fused Triton kernels (CUDA; on CPU only under
                  ``TRITON_INTERPRET=1``)
``cuda``          rows family: CUDA C++, extension module ``twa_kernels._C_cuda`` (``csrc/rows/``)
``cpp``           rows family: CPU C++/OpenMP, extension module ``twa_kernels._C`` (``csrc/rows/``)
``triton_plane``  plane family (:mod:`.plane`): the v2 Triton kernels on the plane device layout;
                  selectable, not yet taken by ``"auto"``: no GPU run has measured them
``cuda_plane``    plane family: the v2 CUDA kernels (``csrc/plane/``, in ``_C_cuda``);
                  selectable, not yet taken by ``"auto"``: no GPU run has measured them
``torch``         the plain reference (dequantize a chunk, then matmul), any device
================  ==========================================================================

An explicit backend probes (and, for the extension, compiles) nothing but itself. ``"auto"`` takes
the fastest backend that runs, and when that is not the fastest there is for the device, it warns
once per process saying which runs, which is off, why, and the command that fixes it.
``bits=None`` (fp32 P, "TWA w/o quantization") is a dense matmul whatever the backend.
"""

from __future__ import annotations

from . import extension, measured
from .registry import (BACKENDS, PREFERENCE, REGISTRY, Availability, Backend, BackendStatus, available_backends,
                       backend_report, fastest_off, format_backend_report, make_engine, preference, probe,
                       resolve_backend)

__all__ = ["BACKENDS", "PREFERENCE", "REGISTRY", "Availability", "Backend", "BackendStatus", "available_backends",
           "backend_report", "extension", "fastest_off", "format_backend_report", "make_engine", "measured",
           "preference", "probe", "resolve_backend"]
