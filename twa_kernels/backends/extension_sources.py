"""The csrc/ sources and compiler flags of the two extension modules, shared by setup.py and the
loader that compiles on first use.

* ``twa_kernels._C``: the ``cpp`` backend (CPU). Needs a C++ compiler with OpenMP.
* ``twa_kernels._C_cuda``: the ``cuda`` backend. Needs a CUDA build of torch and nvcc.

They are separate modules so that one failing to build never takes the other down. No ``-std=`` flag
is passed: torch's extension tooling adds the standard its own headers need (C++17 on older torch,
C++20 on the newest), so the sources compile with every torch the package supports.

Kept free of package imports so setup.py can load it before twa_kernels is installed.
"""

import glob
import os

CSRC = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc"))
# csrc/ mirrors the backends: the modules' bindings and shared headers at the top, each kernel family in
# a folder of its own (rows/: cpp and cuda; plane/: cuda_plane).
CPU_SOURCES = ["twa_bindings.cpp", "rows/twa_cpu.cpp", "rows/twa_cpu_avx2.cpp"]
CUDA_SOURCES = ["twa_bindings_cuda.cpp", "rows/twa_cuda_launch.cpp", "rows/twa_cuda.cu",
                "plane/twa_cuda_plane_launch.cpp", "plane/twa_cuda_plane.cu"]
MODULES = {"cpu": "_C", "cuda": "_C_cuda"}
# Compiled for these GPUs when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (a CUDA build of torch
# on a machine without a GPU): Ampere and Hopper natively, newer GPUs through the PTX.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def torch_minor(torch_version: str) -> str:
    """"2.14" of "2.14.1+cu130": what a built module records, and what the loader compares."""
    return ".".join(torch_version.split("+")[0].split(".")[:2])


def torch_version_macros(torch_version: str) -> list:
    """``TWA_TORCH_MAJOR`` / ``TWA_TORCH_MINOR``: the module records the torch it was built against."""
    major, minor = torch_minor(torch_version).split(".")
    return [("TWA_TORCH_MAJOR", major), ("TWA_TORCH_MINOR", minor)]


def cpu_extension_kwargs(torch_version: str, native: bool, relative: bool = False) -> dict:
    """Sources and flags of ``_C``; ``native`` adds -march=native (only for builds used on this machine;
    the AVX2 kernels are chosen at run time either way); ``relative`` gives paths relative to the
    repository root, as setuptools requires."""
    root = "csrc" if relative else CSRC
    cxx = ["-O3", "-fopenmp"] + (["-march=native"] if native else [])
    return {"sources": [os.path.join(root, s) for s in CPU_SOURCES], "extra_compile_args": {"cxx": cxx},
            "extra_link_args": ["-fopenmp"], "define_macros": torch_version_macros(torch_version)}


def cuda_extension_kwargs(torch_version: str, relative: bool = False) -> dict:
    root = "csrc" if relative else CSRC
    return {"sources": [os.path.join(root, s) for s in CUDA_SOURCES],
            # --threads 0: nvcc compiles the architectures of TORCH_CUDA_ARCH_LIST in parallel
            "extra_compile_args": {"cxx": ["-O3"], "nvcc": ["-O3", "--threads", "0"]},
            "define_macros": torch_version_macros(torch_version)}


def ensure_cuda_arch_list(gpu_visible: bool) -> str | None:
    """Set TORCH_CUDA_ARCH_LIST to the default when it is unset and no GPU is visible (torch would
    otherwise look for a device to read the architecture from and fail). Returns the list in force."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not gpu_visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    return os.environ.get("TORCH_CUDA_ARCH_LIST")


def _is_cuda_home(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h")) and \
        os.path.isfile(os.path.join(path, "bin", "nvcc"))


def find_cuda_home(torch_guess: str | None, cuda_version: str | None) -> str | None:
    """A CUDA toolkit with nvcc *and* its headers. ``CUDA_HOME`` / ``CUDA_PATH`` win when set; otherwise
    torch's guess (the parent of the ``nvcc`` on PATH) is kept when it has the headers, and the usual
    install places are tried when it does not (an ``nvcc`` wrapper script in /usr/local/bin makes that
    guess /usr/local), the toolkit of torch's own CUDA version first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = [torch_guess, "/usr/local/cuda"]
    if cuda_version:
        candidates.append(f"/usr/local/cuda-{cuda_version}")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_cuda_home(c)), None)


def use_cuda_home(cpp_extension, cuda_version: str | None) -> str | None:
    """Point torch's extension tooling at :func:`find_cuda_home` (it reads its module-level CUDA_HOME
    when it builds include paths and finds nvcc). Returns the toolkit in use, or None."""
    home = find_cuda_home(cpp_extension.CUDA_HOME, cuda_version)
    if home is not None:
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("CUDA_HOME", home)
    return home
