"""The backend registry: every backend's devices, its probe (whether it runs here, why not, and the
fix) and its engine factory, and the rule "auto" follows. :mod:`twa_kernels.backends` re-exports it."""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..packing import PackedProjection
from . import extension, measured
from .contract import Segments
from .dense import DenseEngine
from .torch_ref import TorchEngine


@dataclass(frozen=True)
class Availability:
    """Whether a backend runs on a device: ``detail`` says how it runs or why not, ``fix`` is the one
    command (or step) that turns it on."""

    ok: bool
    detail: str = ""
    fix: str = ""


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    probe: Callable[[torch.device], Availability]
    factory: Callable[[PackedProjection, torch.device, Segments | None], object]
    summary: str


def _triton_probe(module: str):
    """The probe of a Triton backend: its kernel module (``rows.triton_kernels``…) must import."""

    def probe(device: torch.device) -> Availability:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return Availability(False, "on the CPU Triton runs only in its interpreter, for tests",
                                "set TRITON_INTERPRET=1 before importing twa_kernels")
        try:  # imported only when asked for: it imports triton, and reads TRITON_INTERPRET once, at import
            kernels = importlib.import_module(f"{__package__}.{module}")
        except ImportError as err:
            return Availability(False, f"twa_kernels' Triton kernels do not import ({err})", "pip install triton")
        if not kernels.AVAILABLE:
            return Availability(False, "triton is not installed", "pip install triton")
        return Availability(True, "interpreter (TRITON_INTERPRET=1)" if device.type == "cpu" else "")

    return probe


def _extension_probe(kind: str):
    def probe(device: torch.device) -> Availability:
        st = extension.status(kind)
        if st.module is None:
            return Availability(False, st.reason, st.fix)
        if kind == "cpu":
            kernels = "AVX2 + FMA kernels" if st.module.cpu_vector_kernels_available() else "portable kernels only"
            return Availability(True, f"{st.origin}; {kernels}")
        return Availability(True, st.origin)

    return probe


def _triton_engine(projection, device, segments):
    from .rows.triton_kernels import TritonEngine  # imports triton, which reads TRITON_INTERPRET once

    return TritonEngine(projection, device, segments)


def _triton_plane_engine(projection, device, segments):
    from .plane.triton_kernels import TritonPlaneEngine

    return TritonPlaneEngine(projection, device, segments)


def _cuda_plane_engine(projection, device, segments):
    from .plane.cuda_engine import CudaPlaneEngine

    return CudaPlaneEngine(projection, device, segments)


def _extension_engine(projection, device, segments):
    from .rows.extension_engine import ExtensionEngine

    return ExtensionEngine(projection, device, segments)


def _torch_engine(projection, device, segments):
    return TorchEngine(projection, device, segments)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("triton", ("cuda", "cpu"), _triton_probe("rows.triton_kernels"), _triton_engine,
            "fused Triton kernels, all layers per launch"),
    Backend("triton_plane", ("cuda", "cpu"), _triton_probe("plane.triton_kernels"), _triton_plane_engine,
            "v2 Triton kernels on the plane layout (selectable; not measured on a GPU yet)"),
    Backend("cuda", ("cuda",), _extension_probe("cuda"), _extension_engine, "CUDA C++ kernels from csrc/"),
    Backend("cuda_plane", ("cuda",), _extension_probe("cuda"), _cuda_plane_engine,
            "v2 CUDA kernels on the plane layout (selectable; not measured on a GPU yet)"),
    Backend("cpp", ("cpu",), _extension_probe("cpu"), _extension_engine,
            "C++/OpenMP kernels from csrc/ (AVX2 + FMA where the CPU has it)"),
    Backend("torch", ("cuda", "cpu"), lambda device: Availability(True, "always"), _torch_engine,
            "the plain reference: dequantize, then matmul"),
)}
BACKENDS = ("auto", *REGISTRY)
# What "auto" takes, fastest first, where no measurement says otherwise (on a GPU, see measured.py).
# Triton on the CPU is the interpreter: for tests, never chosen.
PREFERENCE = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
_WARNED: set = set()


def preference(device: torch.device) -> tuple[tuple[str, ...], str]:
    """(the order "auto" tries on ``device``, why): on a GPU whose family has a committed measurement,
    the backends measured correct, fastest first (then the written order for the rest); else the
    order written above."""
    written = PREFERENCE.get(device.type, ("torch",))
    if device.type != "cuda":
        return written, "the order written in code"
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""
    found = measured.measured_order(name) if name else None
    if found is None:
        family = measured.device_family(name) if name else "this GPU"
        return written, (f"no measured record for {family} in {measured.RECORD_FILE.name} yet: today's order "
                         f"({' > '.join(written)}), written in code")
    order, record = found
    rest = tuple(b for b in written if b not in order)
    return tuple(order) + rest, (f"measured on {record['device']} at {str(record.get('commit'))[:10]} "
                                 f"({measured.RECORD_FILE.name}): the fastest correct first")


def probe(name: str, device) -> Availability:
    """Whether backend ``name`` runs on ``device``; probes that backend alone."""
    device = torch.device(device)
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    backend = REGISTRY[name]
    if device.type not in backend.devices:
        return Availability(False, f"runs on {' and '.join(backend.devices)} tensors only",
                            f"use backend='auto' for {device.type} tensors")
    if device.type == "cuda" and not torch.cuda.is_available():
        return Availability(False, "no CUDA device is visible", "run on a machine with an NVIDIA GPU")
    return backend.probe(device)


def available_backends(device) -> list[str]:
    """Every backend that runs on ``device`` (probes them all)."""
    return [name for name in REGISTRY if probe(name, device).ok]


def _auto(device: torch.device) -> str | None:
    preferred, _ = preference(device)
    skipped = []
    for name in preferred:
        found = probe(name, device)
        if found.ok:
            if skipped and device.type not in _WARNED:
                _WARNED.add(device.type)
                off, why = skipped[0]
                warnings.warn(f"twa_kernels: the {name!r} backend runs on {device.type}, not the faster {off!r}: "
                              f"{why.detail}. Fix: {why.fix}. (`python -m twa_kernels backends` reports every "
                              "backend.)", RuntimeWarning, stacklevel=4)
            return name
        skipped.append((name, found))
    return None


def resolve_backend(backend: str, device) -> str:
    device = torch.device(device)
    if backend == "auto":
        chosen = _auto(device)
        if chosen is None:
            found = probe("torch", device)
            raise RuntimeError(f"no backend runs on {device}: {found.detail}. Fix: {found.fix}")
        return chosen
    found = probe(backend, device)
    if not found.ok:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {found.detail}. Fix: {found.fix}")
    return backend


def make_engine(projection: PackedProjection, device, backend: str = "auto", dtype=None,
                segments: Segments | None = None):
    """The engine for parameters of ``dtype`` on ``device``, cut into ``segments`` (default: one per
    layer). The kernels compute in fp32: float64 parameters get the reference under "auto" and an error
    from an explicit kernel backend."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if projection.layout.bits is None:
        return DenseEngine(projection, device, segments)
    if dtype == torch.float64 and backend == "auto":
        return _torch_engine(projection, device, segments)
    name = resolve_backend(backend, device)  # an explicit backend that cannot run here is reported first
    if dtype == torch.float64 and name != "torch":
        raise ValueError(f"backend {backend!r} computes in fp32; float64 parameters need backend='torch'")
    return REGISTRY[name].factory(projection, device, segments)


@dataclass(frozen=True)
class BackendStatus:
    name: str
    device: str
    available: bool
    chosen: bool
    detail: str
    fix: str
    summary: str

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def backend_report(device=None) -> list[BackendStatus]:
    """Every backend for ``device`` (default: the CPU, and CUDA too when a GPU is visible): whether it
    runs, how or why not, the command that fixes it, and which one ``backend="auto"`` takes."""
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    out = []
    for dev in devices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            chosen = _auto(dev)
        for name, backend in REGISTRY.items():
            if dev.type in backend.devices:
                found = probe(name, dev)
                out.append(BackendStatus(name, dev.type, found.ok, name == chosen, found.detail,
                                         "" if found.ok else found.fix, backend.summary))
    return out


def fastest_off(report: list[BackendStatus], device: str) -> tuple[BackendStatus, BackendStatus] | None:
    """(the backend that runs, the faster one that is off) on ``device``, or None when the fastest runs."""
    rows = [r for r in report if r.device == device]
    chosen = next((r for r in rows if r.chosen), None)
    best = next((r for r in rows if r.name == preference(torch.device(device))[0][0]), None)
    if chosen is None or best is None or best is chosen:
        return None
    return chosen, best


def format_backend_report(report: list[BackendStatus]) -> str:
    """The report as lines a person reads: per device, first what runs and, when a faster backend is off,
    why and the command that fixes it; then every backend (* runs, + available, - off)."""
    lines = []
    width = max((len(r.name) for r in report), default=0) + 1
    for device in dict.fromkeys(r.device for r in report):
        rows = [r for r in report if r.device == device]
        chosen = next((r for r in rows if r.chosen), None)
        head = f"{device}: no backend runs ({rows[-1].detail})" if chosen is None else \
            f"{device}: backend {chosen.name!r} runs"
        slower = fastest_off(report, device)
        if slower is not None:
            head += f" -- the faster {slower[1].name!r} is OFF: {slower[1].detail}. Fix: {slower[1].fix}"
        lines.append(head)
        for r in rows:
            mark = "*" if r.chosen else ("+" if r.available else "-")
            text = r.detail if r.available else f"off: {r.detail}" + (f" (fix: {r.fix})" if r.fix else "")
            lines.append(f"  {mark} {r.name:<{width}}{text}")
        order, why = preference(torch.device(device))
        lines.append(f"  auto tries {' > '.join(order)}: {why}")
    return "\n".join(lines)
