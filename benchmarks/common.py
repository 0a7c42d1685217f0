"""What every benchmark shares: the record of where and with what it ran, timing, the device's own
copy bandwidth, and saving results as JSON under benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from twa_kernels.backends import backend_report, fastest_off, format_backend_report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, CPU)"


def environment(device: torch.device) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(RESULTS)).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # A copy of the tree run elsewhere (the lent GPU machine) names its commit in TWA_COMMIT: its own
        # .git, if it has one, may be stale.
        "commit": os.environ.get("TWA_COMMIT") or git("rev-parse", "HEAD"),
        "dirty": None if os.environ.get("TWA_COMMIT") else bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "backends": [r.as_dict() for r in backend_report(device)],
    }


def announce_backends(device: torch.device) -> str | None:
    """Print, before any work, which kernel backend runs on ``device`` and every one that is off, with why
    and the command that fixes it. Returns a one-line warning for result titles when the fastest
    backend for the device is off, else None."""
    report = backend_report(device)
    print(format_backend_report(report), flush=True)
    slower = fastest_off(report, device.type)
    if slower is None:
        return None
    chosen, fastest = slower
    return (f"**The faster {fastest.name!r} backend was off** ({fastest.detail}); TWA ran on {chosen.name!r}. "
            f"Fix: {fastest.fix}")


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "_")
    return "cpu"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> list[float]:
    """Seconds per call, one sample per call (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def median(xs):
    return statistics.median(xs)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """The device's own copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = median(time_fn(lambda: dst.copy_(src), device, warmup=2, iters=iters))
    del src, dst
    return 2 * nbytes / t


def save(name: str, device: torch.device, payload: dict, markdown: str | None = None,
         out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{name}_{device_tag(device)}")
    env = environment(device)  # before the file is opened: rewriting a tracked result is not a dirty tree
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, **payload}, f, indent=1)
    if markdown is not None:
        with open(base + ".md", "w") as f:
            f.write(markdown)
    return base + ".json"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
