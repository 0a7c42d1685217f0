"""Kernel roofline: the projection step alone (c = P̃ᵀg, then w += P̃Δβ) for every backend beside the
torch reference and a dense fp32 P (torch matmul, the paper's "TWA w/o quantization").

    python -m benchmarks.roofline                 # GPU: D ∈ {1M, 25.6M, 124M}, n ∈ {10, 60, 300}, all bits
    python -m benchmarks.roofline --headline      # the single case D = 25.6M, n = 60, 4 bits
    python -m benchmarks.roofline --quick         # a small CPU sweep (the default without a GPU)

Bytes counted per step (the floor of docs/DESIGN.md, section 2): the packed P̃ read twice, g read once,
w read and written once. Effective GB/s is that over the median time; "of copy" divides by the
device's own copy bandwidth measured in the same run. Results go to benchmarks/results/ as JSON,
markdown, and a plot.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tqdm.auto import tqdm

from benchmarks.common import (announce_backends, copy_bandwidth, environment, markdown_table, median, pick_device,
                               save, time_fn)
from twa_kernels.backends import available_backends, make_engine
from twa_kernels.backends.rows.extension_engine import ExtensionEngine
from twa_kernels.testing import layer_sizes_like_a_cnn, random_projection


def step_bytes(numel, n, bits, weight_bytes=4):
    p = numel * n * (4 if bits is None else bits / 8)
    return 2 * p + numel * 4 + 2 * numel * weight_bytes


def measure(engine, numel, n, device, iters):
    g = torch.randn(numel, device=device)
    w = torch.randn(numel, device=device)
    delta = torch.randn(engine.layout.num_layers, n, device=device) * 1e-3

    def step():
        engine.project(g)
        engine.expand(w, delta)

    return median(time_fn(step, device, warmup=2, iters=iters))


def run(cases, device, iters, copy_bw):
    rows = []
    for D, n, bits in tqdm(cases, desc="roofline", unit="case"):
        sizes = layer_sizes_like_a_cnn(D)
        if bits == "fp32":
            backends = [("dense fp32 (torch matmul)",
                         lambda: make_engine(random_projection(sizes, n, None, device=device), device))]
            b = None
        else:
            b = bits
            proj = random_projection(sizes, n, b, device=device)
            names = [x for x in available_backends(device) if x != "torch"] + ["torch"]
            backends = [(name, lambda name=name: make_engine(proj, device, name)) for name in names]
            if "cpp" in names and device.type == "cpu":  # its portable kernel beside the vectorised one
                backends.insert(names.index("cpp") + 1, (
                    "cpp (portable kernel)", lambda: ExtensionEngine(proj, device, vectorized=False)))
        for name, make in backends:
            try:
                engine = make()
            except torch.OutOfMemoryError:
                rows.append({"D": D, "n": n, "bits": bits, "backend": name, "error": "out of memory"})
                continue
            t = measure(engine, D, n, device, iters if name != "torch" or device.type == "cuda" else max(1, iters // 3))
            nbytes = step_bytes(D, n, b)
            row = {"D": D, "n": n, "bits": bits, "backend": name, "time_s": t, "bytes": nbytes,
                   "GBps": nbytes / t / 1e9, "frac_copy": nbytes / t / copy_bw}
            if isinstance(engine, ExtensionEngine) and device.type == "cpu":
                row["cpu_kernel"] = "avx2" if engine.vectorized else "portable"
            rows.append(row)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def speedups(rows):
    """Per (D, n, bits): each backend's time relative to the torch reference and to dense fp32."""
    dense = {(r["D"], r["n"]): r["time_s"] for r in rows if r["bits"] == "fp32" and "time_s" in r}
    ref = {(r["D"], r["n"], r["bits"]): r["time_s"] for r in rows if r["backend"] == "torch" and "time_s" in r}
    for r in rows:
        if "time_s" not in r or r["bits"] == "fp32":
            continue
        r["speedup_vs_torch_ref"] = ref.get((r["D"], r["n"], r["bits"]), float("nan")) / r["time_s"]
        if (r["D"], r["n"]) in dense:
            r["speedup_vs_dense_fp32"] = dense[(r["D"], r["n"])] / r["time_s"]
    return rows


def plot(rows, copy_bw, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    keys = sorted({(r["backend"], r["n"]) for r in rows if "GBps" in r and r["bits"] != "fp32"})
    order = {1: 0, 2: 1, 4: 2, 8: 3}
    biggest = max(r["D"] for r in rows)
    for backend, n in keys:
        pts = sorted((order[r["bits"]], r["GBps"]) for r in rows
                     if r.get("backend") == backend and r["n"] == n and r["D"] == biggest and "GBps" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend}, n={n}")
    for r in rows:
        if r["bits"] == "fp32" and r["D"] == biggest and "GBps" in r:
            ax.axhline(r["GBps"], ls=":", color="gray")
            ax.text(3.05, r["GBps"], f"dense fp32 P, n={r['n']}", fontsize=7, va="bottom", color="gray")
    ax.axhline(copy_bw / 1e9, color="black", ls="--", label="copy bandwidth (same run)")
    ax.set_xticks(range(4), ["1", "2", "4", "8"])
    ax.set_xlabel("bits per coefficient")
    ax.set_ylabel("effective GB/s (P̃ twice + g + w in/out)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--headline", action="store_true", help="only D = 25.6M, n = 60, 4 bits (+ dense fp32)")
    p.add_argument("--quick", action="store_true", help="small sizes (the default on a CPU)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override D values")
    p.add_argument("--ns", type=int, nargs="+", default=None, help="override n values")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="where results go (default benchmarks/results)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    announce_backends(device)
    if args.headline:
        Ds, ns, bits = [25_557_032], [60], [4, "fp32"]
    elif args.quick or not gpu:
        Ds, ns, bits = [1_000_000], [10, 60], [1, 2, 4, 8, "fp32"]
    else:
        Ds, ns, bits = [1_000_000, 25_557_032, 124_000_000], [10, 60, 300], [1, 2, 4, 8, "fp32"]
    Ds, ns = args.sizes or Ds, args.ns or ns
    iters = args.iters or (20 if gpu else 5)
    copy_bw = copy_bandwidth(device, nbytes=(1 << 30) if gpu else (256 << 20))
    cases = list(itertools.product(Ds, ns, bits))
    rows = speedups(run(cases, device, iters, copy_bw))
    env = environment(device)
    header = ["D", "n", "bits", "backend", "ms/step", "GB/s", "of copy", "vs torch ref", "vs dense fp32"]
    table = [[f"{r['D']:,}", r["n"], r["bits"], r["backend"] + (" (avx2 kernel)" if r.get("cpu_kernel") == "avx2" else ""),
              f"{1e3 * r['time_s']:.2f}" if "time_s" in r else r.get("error"),
              f"{r['GBps']:.1f}" if "GBps" in r else "", f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else "",
              f"{r['speedup_vs_torch_ref']:.1f}x" if "speedup_vs_torch_ref" in r else "",
              f"{r['speedup_vs_dense_fp32']:.1f}x" if "speedup_vs_dense_fp32" in r else ""] for r in rows]
    title = (f"Projection step roofline on {env['device']} ({'GPU' if gpu else 'CPU'}), torch {env['torch']}, "
             f"commit {str(env['commit'])[:10]}, {env['date']}; copy bandwidth {copy_bw / 1e9:.1f} GB/s "
             f"(read + write, same run)")
    md = title + "\n\n" + markdown_table(header, table)
    print(md)
    name = "roofline_headline" if args.headline else "roofline"
    path = save(name, device, {"copy_GBps": copy_bw / 1e9, "rows": rows}, md, out_dir=args.out_dir)
    if len({b for b in bits if b != "fp32"}) > 1:  # a plot over bit widths needs more than one
        plot(rows, copy_bw, path.replace(".json", ".png"), title[:110])
        print(f"saved {path.replace('.json', '.png')}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
