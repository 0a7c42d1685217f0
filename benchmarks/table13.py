"""The paper's Table 13: time per training step and peak memory of SGD, TWA with an fp32 P
("w/o quantization") and TWA with a 4-bit fused P, each as a ratio to SGD.

    python -m benchmarks.table13            # GPU: ResNet-50, batch 256, 3x224x224, 1000 classes, n = 60
                                            # no GPU: the small embedded default on CPU (minutes)
    python -m benchmarks.table13 --quick --out-dir DIR   # seconds: a smoke test of the whole job

Before any work it prints which kernel backend runs and, when a faster one is off, why and the command
that fixes it; the JSON records the same.

Peak memory: every configuration in a fresh subprocess, so its peak (``torch.cuda.max_memory_allocated``
on a GPU, the process's peak RSS on a CPU) is its own. Time on a GPU: the same subprocesses. Time on a
CPU: every configuration in **one** process, each on its own copy of the model, their steps interleaved
(the order rotating every round); each round gives each configuration's step time divided by SGD's in
the same round, and the table reports the median of those ratios with their 10th–90th percentile
range, "within noise" where that range holds 0. On a shared CPU the drift between processes is larger
than TWA's cost, and only ratios taken side by side hold up. Rows for k GPUs: with fewer devices than k
the run measures what one rank of the ``columns`` mode holds and does (⌈n/k⌉ columns of P̃); the extra
all-reduce of that mode is not measured, and the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm

from benchmarks.common import announce_backends, environment, markdown_table, median, pick_device, save, sync, time_fn

PAPER = {1: (5.3, 3.7), 2: (5.0, 1.9), 4: (3.5, 1.0)}  # TWA vs SGD, % time and % memory, A100 40G
CONFIGS = {"sgd": None, "twa_fp32": "fp32", "twa_4bit": 4, "twa_4bit_paper": 4}
# The default coordinates are scaled per layer by the checkpoints' spread (n·L work beside the D·n of the
# projections); the paper's unscaled ones run beside them in the first row to show what that costs.
COORDINATES = {"twa_4bit_paper": "paper"}


def make_model(args):
    from benchmarks.models import resnet50, small_resnet

    return resnet50(args.classes) if args.model == "resnet50" else small_resnet(args.classes)


def build_subspace(args, n_cols: int, bits, path: str) -> None:
    """A subspace of ``n_cols`` synthetic checkpoints (random steps from the initial weights): the
    cost measured does not depend on what the checkpoints hold."""
    import twa_kernels as twa

    torch.manual_seed(0)
    model = make_model(args)
    base = {k: v for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)

    def checkpoint(i):
        return {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                for k, v in base.items()}

    ckpts = [checkpoint(i) for i in range(n_cols)]
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, progress=False)
    space.save(path)


def worker(args) -> dict:
    import twa_kernels as twa

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = make_model(args).to(device)
    if args.subspace is None:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        backend, p_bytes = "torch.optim.SGD", 0
    else:
        space = twa.Subspace.load(args.subspace)
        opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1, momentum=0.9, coordinates=args.coordinates)
        backend, p_bytes = opt.backend, space.nbytes
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    times = time_fn(step, device, warmup=args.warmup, iters=args.iters)
    # the optimizer's step alone (the gradients of the last step stay): where the coordinates differ
    opt_times = time_fn(opt.step, device, warmup=args.warmup, iters=4 * args.iters)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"time_s": median(times), "times_s": times, "opt_step_s": median(opt_times), "peak_bytes": peak,
            "p_bytes": p_bytes, "coordinates": None if args.subspace is None else args.coordinates,
            "backend": backend, "params": sum(p.numel() for p in model.parameters())}


def interleaved_worker(args) -> dict:
    """Every configuration in this process, on its own copy of the model, one step each per round in a
    rotating order: {config key: [step seconds per round]} (CPU timing; see the module doc)."""
    import copy

    import twa_kernels as twa

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = make_model(args).to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    runs = []
    for key, path, coordinates in json.loads(args.interleave):
        m = copy.deepcopy(model)
        if path is None:
            opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = twa.ProjectedSGD(m.parameters(), twa.Subspace.load(path), lr=0.1, momentum=0.9,
                                   coordinates=coordinates)
        runs.append((key, m, opt))
    times = {key: [] for key, _, _ in runs}
    for i in range(args.warmup + args.iters * args.rounds):
        shift = i % len(runs)  # each configuration takes every place in the order in turn
        for key, m, opt in runs[shift:] + runs[:shift]:
            seconds = timed_step(m, opt, x, y, device)
            if i >= args.warmup:
                times[key].append(seconds)
    return times


def timed_step(model, opt, x, y, device) -> float:
    """Seconds of one whole training step (zero_grad, forward, backward, optimizer step), synchronised."""
    t0 = time.perf_counter()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def percentile(xs, q: float) -> float:
    """The q-quantile of ``xs`` (linear interpolation between order statistics)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio_summary(times: list[float], sgd: list[float]) -> dict:
    """Per-round step-time ratios to SGD's, in percent: median, 10th and 90th percentiles, and whether that
    range holds 0 (the difference is within the rounds' noise)."""
    pct = [100 * (t / s - 1) for t, s in zip(times, sgd)]
    low, high = percentile(pct, 0.1), percentile(pct, 0.9)
    return {"median_pct": median(pct), "p10_pct": low, "p90_pct": high, "within_noise": low <= 0 <= high,
            "rounds": len(pct)}


def coordinates_worker(args) -> dict:
    """Both coordinates in one process, on two copies of one model, steps interleaved: the ratio of their
    step times is not blurred by the drift between processes (which, on a shared CPU, exceeds it)."""
    import copy

    import twa_kernels as twa

    device = pick_device(args.device)
    torch.manual_seed(0)
    model = make_model(args).to(device)
    space = twa.Subspace.load(args.subspace)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    runs = {}
    for mode in ("spread", "paper"):
        m = copy.deepcopy(model)
        # lr 0: both run every operation of their step, and both models stay at the same point, so the
        # forward and backward cost the same and any difference is the coordinates' own
        runs[mode] = (m, twa.ProjectedSGD(m.parameters(), space, lr=0.0, momentum=0.9, coordinates=mode))
    step_s, opt_s = {k: [] for k in runs}, {k: [] for k in runs}

    def order(i):  # alternate which goes first, against caches warmed by the other
        return list(runs.items())[:: 1 if i % 2 else -1]

    for i in range(args.warmup + 4 * args.iters):
        for mode, (m, opt) in order(i):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            t1 = time.perf_counter()
            if i >= args.warmup:
                opt_s[mode].append(t1 - t0)
    for i in range(args.warmup + args.iters):
        for mode, (m, opt) in order(i):
            seconds = timed_step(m, opt, x, y, device)
            if i >= args.warmup:
                step_s[mode].append(seconds)
    return {mode: {"step_s": median(step_s[mode]), "opt_step_s": median(opt_s[mode])} for mode in runs}


def run_worker(args, subspace: str | None, coordinates: str = "spread", compare: bool = False,
               interleave: list | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.table13", "--worker", "--device", args.device, "--coordinates", coordinates,
           "--model", args.model, "--batch", str(args.batch), "--image-size", str(args.image_size),
           "--classes", str(args.classes), "--warmup", str(args.warmup), "--iters", str(args.iters),
           "--rounds", str(args.rounds)]
    if subspace is not None:
        cmd += ["--subspace", subspace]
    if compare:
        cmd += ["--compare-coordinates"]
    if interleave is not None:
        cmd += ["--interleave", json.dumps(interleave)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", choices=["resnet50", "small"], default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--classes", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="checkpoints (columns of P)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4], help="rows of the table")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="run every configuration this many times, interleaved, and take the median "
                        "(guards the ratios against drift of a shared machine; default 3 on CPU, 1 on GPU)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke test in seconds: the CPU default with one round of 3 steps, 1 GPU row only")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help="where results go (default benchmarks/results)")
    p.add_argument("--subspace", default=None, help=argparse.SUPPRESS)
    p.add_argument("--coordinates", default="spread", help=argparse.SUPPRESS)
    p.add_argument("--compare-coordinates", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleave", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    # The paper's configuration on a GPU; a small one that finishes in minutes on 2 CPU cores.
    small = dict(model="small", batch=16, image_size=64, classes=100, n=10, warmup=3, iters=10, rounds=3)
    defaults = (dict(model="resnet50", batch=256, image_size=224, classes=1000, n=60, warmup=5, iters=20, rounds=1)
                if gpu else small)
    if args.quick:
        defaults = dict(small, warmup=1, iters=3, rounds=1)
        args.gpus = [1]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.worker:
        work = interleaved_worker if args.interleave else coordinates_worker if args.compare_coordinates else worker
        print(json.dumps(work(args)))
        return
    backend_warning = announce_backends(device)

    visible = torch.cuda.device_count() if gpu else 1
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs, paths = [("sgd", 1, None)], {}
        for k in args.gpus:
            cols = math.ceil(args.n / k)
            for name in ("twa_fp32", "twa_4bit", *(("twa_4bit_paper",) if k == min(args.gpus) else ())):
                jobs.append((name, k, cols))
        bar = tqdm([(r, *job) for r in range(args.rounds) for job in jobs], desc="table13", unit="run")
        for rnd, name, k, cols in bar:
            bar.set_postfix_str(f"round {rnd + 1}: {name} k={k}")
            path = None
            if cols is not None:
                path = os.path.join(tmp, f"{CONFIGS[name]}_{cols}.safetensors")
                if not os.path.exists(path):
                    build_subspace(args, cols, None if CONFIGS[name] == "fp32" else CONFIGS[name], path)
            runs.setdefault((name, k), []).append(run_worker(args, path, COORDINATES.get(name, "spread")))
            paths[(name, k)] = path
        interleaved = None
        if not gpu:  # CPU time: every configuration in one process, steps interleaved
            print("timing every configuration in one process, steps interleaved", flush=True)
            specs = [[f"{name}|{k}", paths[(name, k)], COORDINATES.get(name, "spread")] for name, k, _ in jobs]
            interleaved = run_worker(args, None, interleave=specs)
        first_space = os.path.join(tmp, f"4_{math.ceil(args.n / min(args.gpus))}.safetensors")
        compared = [run_worker(args, first_space, compare=True)
                    for _ in tqdm(range(args.rounds), desc="spread vs paper, one process", unit="round")]
    results = {}
    for key, rs in runs.items():
        results[key] = dict(rs[0], time_s=median([r["time_s"] for r in rs]),
                            round_times_s=[r["time_s"] for r in rs], peak_bytes=max(r["peak_bytes"] for r in rs),
                            opt_step_s=median([r["opt_step_s"] for r in rs]))
        if interleaved is not None:  # the CPU's times: from the one process, side by side with SGD's
            steps = interleaved[f"{key[0]}|{key[1]}"]
            results[key].update(time_s=median(steps), interleaved_times_s=steps, separate_process_time_s=results[key]["time_s"],
                                ratio=ratio_summary(steps, interleaved["sgd|1"]))

    sgd = results[("sgd", 1)]
    rows, records = [], []
    for k in args.gpus:
        measured = "measured" if k <= visible else f"one rank measured (⌈{args.n}/{k}⌉ = {math.ceil(args.n / k)} columns); its all-reduce of D is not"
        for name in ("sgd", "twa_fp32", "twa_4bit", *(("twa_4bit_paper",) if k == min(args.gpus) else ())):
            r = sgd if name == "sgd" else results[(name, k)]
            dm = 100 * (r["peak_bytes"] / sgd["peak_bytes"] - 1)
            paper_t, paper_m = PAPER.get(k, (None, None))
            paper = f"+{paper_t}% / +{paper_m}%" if name == "twa_4bit" and paper_t is not None else ""
            if "ratio" in r:  # CPU: the median of per-round ratios, taken in one process
                q = r["ratio"]
                dt = q["median_pct"]
                shown = ("" if name == "sgd" else f"{dt:+.1f}% [{q['p10_pct']:+.1f}, {q['p90_pct']:+.1f}]"
                         + (" within noise" if q["within_noise"] else ""))
                spread = f"{1e3 * min(r['interleaved_times_s']):.1f}–{1e3 * max(r['interleaved_times_s']):.1f}"
            else:
                dt = 100 * (r["time_s"] / sgd["time_s"] - 1)
                shown = f"{dt:+.1f}%"
                spread = f"{1e3 * min(r['round_times_s']):.1f}–{1e3 * max(r['round_times_s']):.1f}"
            rows.append([k, name, r["backend"], f"{1e3 * r['time_s']:.1f}", spread, shown,
                         f"{r['peak_bytes'] / 2**20:.0f}", f"{dm:+.1f}%", f"{r['p_bytes'] / 2**20:.1f}",
                         paper, "" if name == "sgd" else measured])
            records.append({"gpus": k, "config": name, **r, "time_vs_sgd_pct": dt, "memory_vs_sgd_pct": dm})
    env = environment(device)
    memory_kind = "torch.cuda.max_memory_allocated" if gpu else "peak RSS of the whole process (CPU)"
    title = (f"Table 13 ({'GPU' if gpu else 'CPU — small embedded default, not the paper configuration'}): "
             f"{env['device']}, torch {env['torch']}, commit {str(env['commit'])[:10]}, {env['date']}\n\n"
             f"model {args.model} ({sgd['params']:,} parameters), batch {args.batch}, "
             f"3×{args.image_size}×{args.image_size}, {args.classes} classes, n = {args.n}, SGD momentum 0.9; "
             + (f"time: median over {args.rounds} interleaved round(s) of the median of {args.iters} steps after "
                f"{args.warmup} warm-up" if gpu else
                f"time: every configuration in one process on its own model copy, {args.iters * args.rounds} rounds "
                f"of one step each in a rotating order after {args.warmup} warm-up; 'time vs SGD' is the median of "
                f"the per-round ratios to SGD's step [10th, 90th percentile], 'within noise' where that range "
                f"holds 0")
             + f"; memory: {memory_kind} (each configuration in its own process).\n\n"
             + (f"{backend_warning}\n\n" if backend_warning else ""))
    header = ["GPUs", "config", "backend", "ms/step", "range (ms)", "time vs SGD", "peak MiB", "memory vs SGD",
              "P̃ MiB", "paper TWA (A100): time / memory", "what was measured"]
    pct = {key: [100 * (r["spread"][key] / r["paper"][key] - 1) for r in compared] for key in ("step_s", "opt_step_s")}
    coordinates = {"step_pct": median(pct["step_s"]), "opt_step_pct": median(pct["opt_step_s"]), "rounds": compared,
                   "opt_step_ms": {m: 1e3 * median([r[m]["opt_step_s"] for r in compared]) for m in ("spread", "paper")}}
    md = (title + markdown_table(header, rows)
          + f"\nThe default spread-scaled coordinates against the paper's (4 bits, the first row's P̃), in one process on two "
            f"copies of the model, steps interleaved: whole step {coordinates['step_pct']:+.2f} %, optimizer step "
            f"alone {coordinates['opt_step_pct']:+.2f} % ({coordinates['opt_step_ms']['spread']:.2f} vs "
            f"{coordinates['opt_step_ms']['paper']:.2f} ms; median over {args.rounds} round(s) of the medians of "
            f"{args.iters} steps and {4 * args.iters} optimizer steps).\n")
    print(md)
    path = save("table13", device, {"config": vars(args), "rows": records, "spread_vs_paper": coordinates}, md,
                out_dir=args.out_dir)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
