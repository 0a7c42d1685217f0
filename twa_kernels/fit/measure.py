"""What ``twa fit`` measures about itself: wall time and peak memory per phase, and each TWA step timed
phase by phase (forward, backward, P̃ᵀg, P̃β, the rest of the optimizer step)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

from ..optim.base import APPLY_EVENT, PROJECT_EVENT


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident set since start or the last :func:`reset_peak_rss` (Linux). It counts
    the pages of memory-mapped checkpoint files that were read, which the kernel takes back under pressure."""
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Start a new peak (Linux's clear_refs "5"); elsewhere a no-op, and peaks run from the start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Phases:
    """Wall time, peak RSS and peak anonymous memory (what the process allocated, sampled every 0.1 s)
    of named phases of one process."""

    def __init__(self):
        self.record: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        reset_peak_rss()
        peak_anon = [_status_bytes("RssAnon") or 0]
        done = threading.Event()

        def sample():
            while not done.wait(0.1):
                peak_anon[0] = max(peak_anon[0], _status_bytes("RssAnon") or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            peak_anon[0] = max(peak_anon[0], _status_bytes("RssAnon") or 0)
            self.record[name] = {"wall_s": wall, "peak_rss_bytes": peak_rss_bytes(),
                                 "peak_anon_bytes": peak_anon[0] or None}


def _projection_seconds(prof) -> dict:
    """Seconds spent in the optimizer's Pᵀg and Pβ during a profiled step."""
    out = {}
    for evt in prof.key_averages():
        if evt.key in (PROJECT_EVENT, APPLY_EVENT):
            device_us = getattr(evt, "device_time_total", 0) or 0
            out[evt.key] = (device_us or evt.cpu_time_total) / 1e6
    return {"project_s": out.get(PROJECT_EVENT, 0.0), "apply_s": out.get(APPLY_EVENT, 0.0)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(loss_fn, opt, device) -> dict:
    """One TWA step (``loss_fn()`` gives the batch's loss), timed phase by phase; the optimizer step runs
    under the profiler, for Pᵀg and Pβ."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    loss = loss_fn()
    sync(device)
    t1 = time.perf_counter()
    loss.backward()
    sync(device)
    t2 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.step()
        sync(device)
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    split = _projection_seconds(prof)
    return {"loss": float(loss.detach()), "forward_s": t1 - t0, "backward_s": t2 - t1, **split,
            "rule_s": max(0.0, (t3 - t2) - split["project_s"] - split["apply_s"]), "step_s": t3 - t0}
