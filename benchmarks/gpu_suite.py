"""Everything a lent GPU should run, in one command that fits one call, in order of value, each step in a
process of its own with a time limit that follows from the budget (a step that fails or runs out of time
is recorded and the next one runs):

1. the GPU tests: ``tests/test_gpu.py`` whole (no ``-k``), the backend tests and the plane-kernel tests
   on CUDA (every backend against the torch reference, every bit width, edge shapes);
2. kernel variants at the headline shape (D = 25.6M, n = 60, 4 bits): every backend as ``auto`` builds
   it, shipped Triton tiles, the v2 plane kernels, dense fp32 and the torch reference, with copy
   bandwidth in the same run; from it, ``cuda_measured_record.json``, the record ``auto`` reads once
   committed as ``twa_kernels/backends/cuda_measured.json``;
3. Table 13 in its ResNet-50 configuration;
4. the roofline sweep, with what is left;

with ``nvidia-smi`` clocks before and after. Every step writes its JSON and markdown into ``--out-dir``;
``gpu_suite.json`` and ``gpu_suite.md``, rewritten as each step ends (a cut leaves what finished), say
what ran, for how long, and how it ended, beside the timing plan.

    bash benchmarks/gpu_first_light.sh DIR        # from a bare copy: install for this GPU, then this
    TWA_COMMIT=$(git rev-parse HEAD) python -m benchmarks.gpu_suite --out-dir DIR --budget-s 420

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
BUDGET_S = 7 * 60  # the suite's share of an 8-minute command: the install's plan is the rest
# Seconds on one H100, and what each figure rests on. Measured: the one GPU run so far (6602335,
# benchmarks/results/gpu_tests_H100_80GB_HBM3.json). Everything else is an estimate until the first
# light run replaces it with the seconds it records.
PLAN = {
    "install": (60, "estimated: _C_cuda built in 52.6 s at 6602335 (measured, MAX_JOBS=16); the plane "
                    "kernels added since, TORCH_CUDA_ARCH_LIST now limited to the visible GPU"),
    "gpu tests": (120, "estimated: 59.2 s at 6602335 (measured) for test_gpu + test_backends -k cuda; now "
                       "also both plane backends and their tests, and Triton's first compile of each"),
    "kernel variants": (80, "estimated: ~20 engines × (a Triton or CUDA compile of a few s + 3 × 23 timed "
                            "steps of ~1.2 ms, 1.14 ms measured for the shipped Triton kernel at 6602335)"),
    "table13": (150, "estimated: two ResNet-50-sized subspaces (n = 60) built on the host, then 5 worker "
                     "processes of ~15 s (start, cudnn autotune, 25 steps)"),
    "roofline": (60, "estimated: whatever is left; the sweep stops at its own limit"),
}


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
            Step("table13", [py, "-m", "benchmarks.table13", "--quick", "--gpus", "1", "--out-dir", out_dir], 300),
            Step("roofline", [py, "-m", "benchmarks.roofline", "--quick", "--sizes", "20000", "--ns", "5",
                              "--iters", "1", "--out-dir", out_dir], 300),
        ]
    unset = {"TRITON_INTERPRET": None}
    return [
        Step("gpu tests", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_gpu.py",
                           "tests/test_backends.py", "tests/test_triton_plane.py", "tests/test_cuda_plane.py"],
             PLAN["gpu tests"][0], unset),
        Step("kernel variants", [py, "-m", "benchmarks.kernel_variants", "--out-dir", out_dir],
             PLAN["kernel variants"][0], unset),
        Step("table13", [py, "-m", "benchmarks.table13", "--model", "resnet50", "--gpus", "1", "--out-dir", out_dir],
             PLAN["table13"][0], unset),
        Step("roofline", [py, "-m", "benchmarks.roofline", "--out-dir", out_dir], PLAN["roofline"][0], unset),
    ]


def limits(planned: list[int], budget: float) -> list[int]:
    """Each step's limit: its planned seconds scaled to the budget (a larger budget gives every step room
    in proportion; a smaller one cuts them alike)."""
    total = sum(planned)
    return [max(1, int(p * budget / total)) for p in planned]


def timing_plan(install_s: float | None) -> str:
    rows = ["| step | planned s on an H100 | basis |", "|---|---|---|"]
    total = 0
    for name, (secs, basis) in PLAN.items():
        shown = secs if name != "install" or install_s is None else round(install_s)
        basis = basis if name != "install" or install_s is None else f"measured in this run ({basis})"
        rows.append(f"| {name} | {shown} | {basis} |")
        total += shown
    rows.append(f"| **total** | **{total}** | of the 480 s (8 minutes) one command may take |")
    return "\n".join(rows)


def write_record(out: Path, device: str, commit: str | None, dry_run: bool) -> Path | None:
    """The backend record of this run's kernel variants, for ``auto`` (committed by a person)."""
    from twa_kernels.backends.measured import record_from_kernel_variants

    found = sorted(out.glob("kernel_variants_*.json"))
    if not found:
        return None
    payload = json.loads(found[-1].read_text())
    record = record_from_kernel_variants(payload, device, commit, payload.get("environment", {}).get("date"))
    record["dry_run"] = dry_run
    path = out / "cuda_measured_record.json"
    path.write_text(json.dumps({"records": [record]}, indent=1))
    return path


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
    lines += ["", "Timing plan:", "", summary["plan"]]
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
    p.add_argument("--budget-s", "--budget", dest="budget", type=float, default=None,
                   help=f"seconds for the whole suite (default {BUDGET_S}; a dry run: the sum of its steps' "
                        "limits); every step's limit follows from it")
    p.add_argument("--install-s", type=float, default=None,
                   help="seconds the install before this took (gpu_first_light.sh passes it), for the plan")
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
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "clocks_before": clocks(), "steps": [],
               "budget_s": args.budget, "install_s": args.install_s, "plan": timing_plan(args.install_s)}
    print("Timing plan:\n" + summary["plan"], flush=True)

    def write():
        summary["seconds"] = round(time.monotonic() - start, 1)
        (out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
        (out / "gpu_suite.md").write_text(render(summary))

    todo = steps(str(out), args.dry_run)
    if args.budget is None:
        args.budget = sum(s.limit_s for s in todo) if args.dry_run else BUDGET_S
        summary["budget_s"] = args.budget
    for step, limit in zip(todo, limits([s.limit_s for s in todo], args.budget)):
        remaining = args.budget - (time.monotonic() - start)
        if remaining < 5:
            summary["steps"].append({"step": step.name, "status": "not run: the suite's budget is spent",
                                     "rc": None, "seconds": 0, "limit_s": 0})
            write()
            continue
        step.limit_s = limit
        result = run_step(step, env, out, remaining)
        summary["steps"].append(result)
        if step.name == "kernel variants":
            record = write_record(out, summary["device"], commit, args.dry_run)
            summary["record"] = None if record is None else record.name
        if step.name == "gpu tests" and result["status"] == "passed":
            # which commit's GPU tests last passed (commit it as benchmarks/results/gpu_tests_last_passed.json)
            (out / "gpu_tests_last_passed.json").write_text(json.dumps(
                {"commit": commit, "device": summary["device"], "date": summary["date"], "dry_run": args.dry_run,
                 "result": (result["last_lines"] or ["passed"])[-1], "command": result["command"]}, indent=1))
        write()
        print(f"{step.name}: {result['status']} in {result['seconds']} s", flush=True)
    summary["clocks_after"] = clocks()
    write()
    print(render(summary))
    return 0 if all(r["status"] == "passed" for r in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
