"""Compile the Triton kernels of an engine for a real GPU ahead of time, with no GPU present (Triton
ships ptxas), exactly as a launch compiles them: through :meth:`triton.JITFunction.warmup` with the
engine's own :class:`~.triton_common.Launch` objects, so the signature, the constants and the
specialization (which pointers are 16-byte aligned, which integers divisible by 16) are the launch's.
A stand-in driver tells Triton which GPU to compile for; nothing is launched.

Must run with ``TRITON_INTERPRET`` unset (the interpreter compiles nothing): ``tests/triton_aot.py``
and ``benchmarks/sass_counts.py`` run it in a process of their own.
"""

from __future__ import annotations

import os


class CompileOnlyDriver:
    """What ``JITFunction.run(warmup=True)`` asks of the active driver, for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


def compile_launch(launch, arch: int):
    """The compiled kernel a launch of ``launch`` gets on an sm_``arch`` GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compiles need TRITON_INTERPRET unset")
    from triton.runtime import driver

    driver.set_active(CompileOnlyDriver(arch))
    launch.kernel.device_caches.clear()  # the binder keeps the target it was made for
    return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.constants)


def triton_tool(name: str) -> str:
    """The path of a CUDA tool Triton ships (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"this triton ships no {name} ({path})")
    return path
