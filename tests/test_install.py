"""How the package meets a new machine: the extension loader, the backend registry and its report."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import twa_kernels as twa
from backend_cases import random_projection
from twa_kernels import backends
from twa_kernels.backends import registry
from twa_kernels.backends import Availability, extension, make_engine

ROOT = Path(__file__).resolve().parents[1]


def test_first_error_is_the_compilers_not_ninjas():
    log = """Error building extension 'twa_kernels_C': [1/4] c++ -MMD -std=c++17 -c twa_cpu.cpp -o twa_cpu.o
FAILED: twa_cpu.o
c++ -MMD -std=c++17 -c twa_cpu.cpp
In file included from /venv/torch/include/torch/extension.h:5,
/venv/torch/include/torch/csrc/api/include/torch/all.h:5:2: error: #error C++20 or later compatible compiler is required to use PyTorch.
    5 | #error C++20 or later compatible compiler is required to use PyTorch.
/venv/torch/include/ATen/ATen.h:5:2: error: #error C++20 or later compatible compiler is required to use ATen.
ninja: build stopped: subcommand failed."""
    assert extension.first_error(log).endswith("all.h:5:2: error: #error C++20 or later compatible compiler is "
                                               "required to use PyTorch.")
    nvcc = "FAILED: twa_cuda.cuda.o\ntwa_cuda.cu(12): error: identifier \"foo\" is undefined\nninja: build stopped"
    assert extension.first_error(nvcc) == 'twa_cuda.cu(12): error: identifier "foo" is undefined'
    assert extension.first_error("ninja: build stopped: subcommand failed.") == "ninja: build stopped: subcommand failed."


def test_a_stale_torch_lock_does_not_hang_the_next_build(tmp_path):
    directory = tmp_path / "cpu"
    directory.mkdir()
    (directory / "lock").write_text("")  # left by a build that was killed
    with extension._BuildLock(str(directory)):
        assert not (directory / "lock").exists()


def test_a_module_built_for_another_torch_is_not_loaded(monkeypatch):
    class Stale:
        torch_version = "1.0"

    monkeypatch.setattr(extension.importlib, "import_module", lambda name: Stale())
    module, why = extension._installed("cpu")
    assert module is None and "built for torch 1.0" in why and torch.__version__ in why


def test_the_cuda_build_gets_an_arch_list_without_a_gpu(monkeypatch):
    from twa_kernels.backends import extension_sources as src

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert src.ensure_cuda_arch_list(gpu_visible=False) == src.DEFAULT_CUDA_ARCH_LIST
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert src.ensure_cuda_arch_list(gpu_visible=True) is None  # torch reads the visible GPU's
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert src.ensure_cuda_arch_list(gpu_visible=False) == "8.6"  # the user's choice stands


def test_no_language_standard_is_forced_on_torchs_headers():
    from twa_kernels.backends import extension_sources as src

    flags = src.cpu_extension_kwargs("2.14.1", native=True)["extra_compile_args"]["cxx"]
    flags += sum(src.cuda_extension_kwargs("2.14.1")["extra_compile_args"].values(), [])
    assert not [f for f in flags if f.startswith("-std")]
    assert ("TWA_TORCH_MINOR", "14") in src.cpu_extension_kwargs("2.14.1+cu130", native=False)["define_macros"]


def _refuse(*args, **kwargs):
    raise AssertionError("an explicit backend probed the extension")


def test_an_explicit_backend_probes_nothing_else(monkeypatch):
    proj = random_projection((5, 3), 4, 4, seed=0)
    monkeypatch.setattr(extension, "status", _refuse)
    assert make_engine(proj, "cpu", "torch").name == "torch"
    dense = random_projection((5, 3), 4, None, seed=0)
    assert make_engine(dense, "cpu", "cpp").name == "dense"  # fp32 P: a matmul whatever the backend
    with pytest.raises(ValueError, match="unknown backend 'cpu'"):
        make_engine(proj, "cpu", "cpu")


def test_auto_says_once_which_faster_backend_is_off_why_and_the_fix(monkeypatch):
    cpp = backends.REGISTRY["cpp"]
    off = Availability(False, "compiling csrc/ failed: x.cpp:1:1: error: boom", "pip install ninja")
    monkeypatch.setitem(backends.REGISTRY, "cpp", backends.Backend("cpp", cpp.devices, lambda d: off, cpp.factory,
                                                                   cpp.summary))
    monkeypatch.setattr(registry, "_WARNED", set())
    proj = random_projection((5, 3), 4, 4, seed=0)
    with pytest.warns(RuntimeWarning) as record:
        assert make_engine(proj, "cpu").name == "torch"
    text = str(record[0].message)
    assert "'torch' backend runs" in text and "'cpp'" in text and "error: boom" in text and "pip install ninja" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_engine(proj, "cpu")  # once per process
    with pytest.raises(RuntimeError, match="backend 'cpp' cannot run on cpu: compiling csrc/ failed.*Fix: pip"):
        make_engine(proj, "cpu", "cpp")
    report = twa.backend_report("cpu")
    assert [r.name for r in report if r.chosen] == ["torch"]
    text = twa.format_backend_report(report)
    assert text.splitlines()[0].startswith("cpu: backend 'torch' runs -- the faster 'cpp' is OFF: compiling")


def test_backends_command_reports_what_auto_takes():
    out = subprocess.run([sys.executable, "-m", "twa_kernels", "backends", "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {r["name"] for r in report if r["device"] == "cpu"} == {"triton", "triton_plane", "cpp", "torch"}
    chosen = [r["name"] for r in report if r["chosen"] and r["device"] == "cpu"]
    assert chosen == [backends.resolve_backend("auto", "cpu")]
    for r in report:
        assert r["available"] or (r["detail"] and r["fix"]), r
    text = subprocess.run([sys.executable, "-m", "twa_kernels", "backends"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600).stdout
    assert text.startswith(f"cpu: backend {chosen[0]!r} runs")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_compile_on_first_use_with_a_stale_lock(tmp_path):
    """A copy of the package without the module built at install: the first use compiles it into its own
    cache (past a lock a killed build left behind), the second loads it from there."""
    shutil.copytree(ROOT / "twa_kernels", tmp_path / "twa_kernels",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "cache"), TWA_PORTABLE="1")
    env.pop("TWA_NO_EXTENSION", None)
    # The copy, not an editable install's module map, provides twa_kernels here.
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
             "from twa_kernels.backends import extension as e; "
             "s = e.status('cpu'); print(s.origin or s.reason); print(e.build_directory('cpu'))")
    first = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr
    origin, directory = first.stdout.strip().splitlines()[-2:]
    assert origin.startswith("compiled on first use (not built at install)"), first.stdout
    assert directory.startswith(str(tmp_path / "cache"))
    Path(directory, "lock").write_text("")
    second = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)
    assert second.returncode == 0 and second.stdout.startswith("compiled on first use"), second.stderr


def test_importing_the_package_imports_no_training_stack():
    code = ("import sys, twa_kernels; heavy = [m for m in ('transformers', 'lightning', 'accelerate') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
