"""Everything a lent GPU should run, in one command that fits one call (9 minutes on one H100), in order
of value, each step in a process of its own with a time limit of its own (a step that fails or runs out
of time is recorded and the next one runs):

1. the GPU tests: ``tests/test_gpu.py`` whole (no ``-k``), the backend tests and the plane-kernel tests
   on CUDA;
2. kernel variants at the headline shape (D = 25.6M, n = 60, 4 bits): shipped Triton tiles, the v2
   plane kernels (``triton_plane`` and ``cuda_plane``), ``cuda``, dense fp32 and the torch reference,
   with copy bandwidth in the same run;
3. the roofline sweep;
4. Table 13 in its ResNet-50 configuration;

with ``nvidia-smi`` clocks before and after. Every step writes its JSON and markdown into ``--out-dir``;
``gpu_suite.json`` and ``gpu_suite.md`` say what ran, for how long, and how it ended.

    TWA_COMMIT=$(git rev-parse HEAD) python -m benchmarks.gpu_suite --out-dir DIR

Install first (``pip install --no-build-isolation -e ".[triton,test]"``): that builds ``_C_cuda`` (the
``cuda`` and ``cuda_plane`` kernels) for the visible GPU, which would otherwise be compiled inside the
first step's time limit.

The commit comes from ``--commit`` or ``TWA_COMMIT`` (the device's copy of ``.git`` can be stale).
``--dry-run`` runs every step in its small CPU form (Triton in the interpreter, tiny sizes), which CI
does to keep this script working; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 9 * 60


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: int
    env: dict = field(default_factory=dict)


def steps(out_dir: str, dry_run: bool) -> list[Step]:
    py = sys.executable
    if dry_run:
        interp = {"TRITON_INTERPRET": "1"}
        return [
            Step("gpu tests", [py, "-m", "pytest", "-q", "tests/test_gpu.py"], 120),
            Step("kernel variants", [py, "-m", "benchmarks.kernel_variants", "--device", "cpu", "--size", "2000",
                                     "--layers", "4", "--n", "3", "--out-dir", out_dir], 300, interp),
            Step("roofline", [py, "-m", "benchmarks.roofline", "--quick", "--sizes", "20000", "--ns", "5",
                              "--iters", "1", "--out-dir", out_dir], 300),
            Step("table13", [py, "-m", "benchmarks.table13", "--quick", "--gpus", "1", "--out-dir", out_dir], 300),
        ]
    unset = {"TRITON_INTERPRET": None}
    return [
        Step("gpu tests", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu.py",
                           "tests/test_backends.py", "tests/test_triton_plane.py"], 170, unset),
        Step("kernel variants", [py, "-m", "benchmarks.kernel_variants", "--out-dir", out_dir], 150, unset),
        Step("roofline", [py, "-m", "benchmarks.roofline", "--out-dir", out_dir], 120, unset),
        Step("table13", [py, "-m", "benchmarks.table13", "--model", "resnet50", "--gpus", "1", "--out-dir", out_dir],
             100, unset),
    ]


def clocks() -> str | None:
    """nvidia-smi's clocks and power, or None where there is no nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    q = "name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    out = subprocess.run([smi, f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True)
    return (out.stdout or out.stderr).strip()


def run_step(step: Step, env: dict, log_dir: Path, remaining_s: float) -> dict:
    limit = max(1, int(min(step.limit_s, remaining_s)))
    env = dict(env)
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log = log_dir / f"{step.name.replace(' ', '_')}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(step.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=limit).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, f"stopped at its {limit} s limit"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"step": step.name, "command": " ".join(step.command), "status": status, "rc": rc,
            "seconds": round(time.monotonic() - start, 1), "limit_s": limit, "log": log.name, "last_lines": tail}


def render(summary: dict) -> str:
    lines = [f"GPU suite on {summary['device']}, commit {str(summary['commit'])[:10]}, {summary['date']}"
             + (" — **dry run on a CPU: timings mean nothing**" if summary["dry_run"] else ""), "",
             "| step | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']} | {r['limit_s']} |" for r in summary["steps"]]
    if summary.get("clocks_before"):
        lines += ["", "nvidia-smi before:", "", "```", summary["clocks_before"], "```"]
    if summary.get("clocks_after"):
        lines += ["", "nvidia-smi after:", "", "```", summary["clocks_after"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--commit", default=None, help="the commit this tree is (default: $TWA_COMMIT, else git)")
    p.add_argument("--dry-run", action="store_true", help="the small CPU form of every step (what CI runs)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite")
    args = p.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_suite needs a CUDA device; --dry-run runs its small CPU form")
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    commit = args.commit or os.environ.get("TWA_COMMIT")
    if commit is None:
        got = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = got.stdout.strip() or None
    if commit:
        env["TWA_COMMIT"] = commit  # every step's environment() records it
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    start = time.monotonic()
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "commit": commit, "dry_run": args.dry_run, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clocks_before": clocks(), "steps": []}
    for step in steps(str(out), args.dry_run):
        remaining = args.budget - (time.monotonic() - start)
        if remaining < 5:
            summary["steps"].append({"step": step.name, "status": "not run: the suite's budget is spent",
                                     "rc": None, "seconds": 0, "limit_s": 0})
            continue
        result = run_step(step, env, out, remaining)
        summary["steps"].append(result)
        print(f"{step.name}: {result['status']} in {result['seconds']} s", flush=True)
    summary["clocks_after"] = clocks()
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_suite.md").write_text(render(summary))
    print(render(summary))
    return 0 if all(r["status"] == "passed" for r in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
