"""The Triton kernels compile to machine code for Hopper (sm_90) and Ampere (sm_80) GPUs, checked
without a GPU: the interpreter runs the kernels' logic on CPU, this checks what the interpreter cannot
(the compiler accepts every construct, for every bit width and dtype), compiled exactly as a launch
compiles them (``tests/triton_aot.py``)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def _aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_every_variant_compiles_for_sm90_and_sm80():
    lines = [ln for ln in _aot("90", "80").splitlines() if "cubin" in ln]
    assert len(lines) == 2 * 21, lines  # 16 project/expand variants + the reduce, 4 plane ones, per arch


def test_aot_compile_uses_the_launch_specialization():
    # The old hand-written signatures carried no alignment attributes, so expand compiled to other code
    # (48 registers instead of the launch's 39); now every tensor argument carries the launch's.
    assert "sm_90: 21 variants compiled with the launch's specialization" in _aot("--check", "90")


def test_plane_kernels_issue_at_most_four_instructions_per_code(tmp_path):
    # The v2 kernels' target, read from the SASS of the hot loops compiled as a launch compiles them; the
    # script also checks that each hot loop does one FFMA per code of the kernel's geometry.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "benchmarks.sass_counts", "--bits", "4", "--out-dir", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "sass_counts.json").read_text())["rows"]
    plane = {(r["backend"], r["kernel"]): r["per_code"] for r in rows if r["backend"].endswith("plane")}
    assert {k for k in plane if k[0] == "triton_plane"} == {("triton_plane", "project"), ("triton_plane", "expand")}
    assert all(v <= 4 for v in plane.values()), plane
    shipped = {r["kernel"]: r["per_code"] for r in rows if r["backend"] == "triton"}
    assert all(plane[("triton_plane", k)] < shipped[k] for k in ("project", "expand"))
    if shutil.which("nvcc"):  # the CUDA kernels, compiled by nvcc for sm_90 (this is also their compile check)
        assert {k for k in plane if k[0] == "cuda_plane"} == {("cuda_plane", "project"), ("cuda_plane", "expand")}
        cuda = {r["kernel"]: r["per_code"] for r in rows if r["backend"] == "cuda"}
        assert all(plane[("cuda_plane", k)] < cuda[k] for k in ("project", "expand"))
