"""The extension modules from ``csrc/``: ``_C`` (the ``cpp`` backend) and ``_C_cuda`` (the ``cuda`` backend).

Each module is looked for in this order, on its own (one failing never takes the other down):

1. the module built at install time (``pip install --no-build-isolation -e .``), unless it was built
   against another torch than the one running (its C++ ABI may differ);
2. otherwise it is compiled on first use with ``torch.utils.cpp_extension.load`` into a cache directory
   of its own per torch version (``$TORCH_EXTENSIONS_DIR/twa_kernels/...``), under a file lock, so that
   two processes never build at once and a lock left by a killed build never hangs the next one;
3. if that fails too, the backend is off, and :func:`status` says why, with the compiler's first error
   (not ninja's last line) and the one command that fixes it.

``TWA_NO_EXTENSION=1`` turns both off.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch

from . import extension_sources as src

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised across processes there
    fcntl = None

REINSTALL = 'pip install --no-build-isolation -e ".[triton]"'


@dataclass(frozen=True)
class ModuleStatus:
    """Whether an extension module loaded: ``origin`` says how, or ``reason`` why not, and ``fix`` is the
    one command (or step) that makes it load."""

    module: object | None
    origin: str = ""
    reason: str = ""
    fix: str = ""


_STATUS: dict[str, ModuleStatus] = {}


def cache_root() -> str:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch_extensions")
    return os.path.join(base, "twa_kernels")


def build_directory(kind: str) -> str:
    """One directory per (kind, python, torch build): a module compiled for one torch is never loaded by
    another."""
    tag = re.sub(r"[^A-Za-z0-9_.]", "_", f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}")
    return os.path.join(cache_root(), tag, kind)


def first_error(log: str) -> str:
    """The line a person needs from a failed build: the compiler's first error, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    # gcc/clang "file:line:col: error: ...", then nvcc's and the linker's own wordings
    for pattern in (r":\s*(fatal )?error\b", r"\berror\b", r"undefined reference|cannot find|not found"):
        for ln in lines:
            if re.search(pattern, ln, re.IGNORECASE) and not ln.startswith(("ninja:", "FAILED:", "Error building")):
                return ln
    return lines[-1] if lines else "(no output)"


def _prerequisites(kind: str) -> tuple[str, str] | None:
    """(reason, fix) when a compile cannot even start here."""
    # torch's extension tooling is imported only to compile: it is slow to import and, on a CUDA build of
    # torch without a GPU, warns at import
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found)", "install one, e.g. `apt-get install g++`"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed", "pip install ninja"
    # (a CPU build of torch never gets here for "cuda": the loader turns it away first)
    if kind == "cuda" and src.use_cuda_home(cpp_extension, torch.version.cuda) is None:
        return (f"no CUDA toolkit found (nvcc and headers; torch is built for CUDA {torch.version.cuda})",
                f"install the CUDA {torch.version.cuda} toolkit and set CUDA_HOME")
    return None


class BuildFailed(RuntimeError):
    pass


class _BuildLock:
    """An exclusive lock beside the build directory, held for the whole compile. While it is held no other
    build of ours runs, so a torch ``lock`` file found in the directory is stale (left by a killed build)
    and is removed instead of waited on forever."""

    def __init__(self, directory: str):
        self.path = directory.rstrip(os.sep) + ".lock"
        self.directory = directory

    def __enter__(self):
        os.makedirs(self.directory, exist_ok=True)
        self.file = open(self.path, "w")
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_EX)
            stale = os.path.join(self.directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
        return self

    def __exit__(self, *exc):
        if fcntl is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def _compile(kind: str):
    from torch.utils import cpp_extension

    if kind == "cuda":
        src.ensure_cuda_arch_list(gpu_visible=torch.cuda.is_available())
        kw = src.cuda_extension_kwargs(torch.__version__)
        cflags, cuda_flags, ldflags = kw["extra_compile_args"]["cxx"], kw["extra_compile_args"]["nvcc"], []
    else:
        kw = src.cpu_extension_kwargs(torch.__version__, native=os.environ.get("TWA_PORTABLE") != "1")
        cflags, cuda_flags, ldflags = kw["extra_compile_args"]["cxx"], [], kw["extra_link_args"]
    macros = [f"-D{name}={value}" for name, value in kw["define_macros"]]
    directory = build_directory(kind)
    with _BuildLock(directory):
        try:
            return cpp_extension.load(
                name=f"twa_kernels{src.MODULES[kind]}", sources=kw["sources"], extra_cflags=cflags + macros,
                extra_cuda_cflags=cuda_flags + macros, extra_ldflags=ldflags, with_cuda=kind == "cuda",
                build_directory=directory, verbose=False)
        except Exception as err:
            log = os.path.join(directory, "build.log")
            with open(log, "w") as f:
                f.write(str(err))
            raise BuildFailed(f"compiling csrc/ failed: {first_error(str(err))} (whole log: {log})") from None


def _installed(kind: str):
    """The module built at install time, or (None, why not)."""
    name = f"twa_kernels.{src.MODULES[kind]}"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == name
        return None, "not built at install" if missing else f"the installed {name} does not load ({err})"
    built_for = getattr(module, "torch_version", "unknown")
    if built_for != src.torch_minor(torch.__version__):
        return None, f"the installed {name} was built for torch {built_for}, this is torch {torch.__version__}"
    return module, ""


def _load(kind: str) -> ModuleStatus:
    if os.environ.get("TWA_NO_EXTENSION") == "1":
        return ModuleStatus(None, reason="turned off by TWA_NO_EXTENSION=1", fix="unset TWA_NO_EXTENSION")
    if kind == "cuda":
        if torch.version.cuda is None:
            return ModuleStatus(None, reason="this torch is a CPU build", fix="install a CUDA build of torch")
        if not torch.cuda.is_available():
            return ModuleStatus(None, reason="no CUDA device is visible", fix="run on a machine with an NVIDIA GPU")
    module, not_installed = _installed(kind)
    if module is not None:
        return ModuleStatus(module, origin="built at install")
    missing = _prerequisites(kind)
    if missing is not None:
        reason, fix = missing
        return ModuleStatus(None, reason=f"{not_installed}, and it cannot be compiled here: {reason}", fix=fix)
    try:
        module = _compile(kind)
    except Exception as err:  # a failed build: the other backends still work
        return ModuleStatus(None, reason=f"{not_installed}; {err}",
                            fix=f"fix the error above, then `{REINSTALL}` (or report it with the log)")
    return ModuleStatus(module, origin=f"compiled on first use ({not_installed}), cached in {build_directory(kind)}")


def status(kind: str) -> ModuleStatus:
    """Load (once per process) and report the ``"cpu"`` or ``"cuda"`` module."""
    if kind not in src.MODULES:
        raise ValueError(f"unknown extension kind {kind!r}: 'cpu' or 'cuda'")
    if kind not in _STATUS:
        _STATUS[kind] = _load(kind)
    return _STATUS[kind]


def load(kind: str = "cpu"):
    """The module for ``kind``, or None (:func:`status` says why)."""
    return status(kind).module
