"""The one list of csrc/ sources and compiler flags, shared by setup.py and the JIT loader.

Kept free of package imports so setup.py can load it before twa_kernels is installed."""

import os

CSRC = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc"))
CPU_SOURCES = ["twa_bindings.cpp", "twa_cpu.cpp", "twa_cpu_avx2.cpp"]
CUDA_SOURCES = ["twa_cuda.cu", "twa_cuda_launch.cpp"]


def extension_kwargs(with_cuda: bool, native: bool, relative: bool = False) -> dict:
    """Sources and flags; ``native`` adds -march=native (only for builds used on this machine);
    ``relative`` gives paths relative to the repository root, as setuptools requires."""
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if native:
        cxx.append("-march=native")
    root = "csrc" if relative else CSRC
    sources = [os.path.join(root, s) for s in CPU_SOURCES]
    macros = []
    extra = {"cxx": cxx}
    if with_cuda:
        sources += [os.path.join(root, s) for s in CUDA_SOURCES]
        macros.append(("TWA_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++17"]
    return {"sources": sources, "extra_compile_args": extra, "extra_link_args": ["-fopenmp"],
            "define_macros": macros, "with_cuda": with_cuda}
