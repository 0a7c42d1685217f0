"""Streaming construction: n checkpoints of a model far larger in total than memory, built into a
B-bit subspace chunk by chunk.

    python -m benchmarks.streaming --dir /tmp/twa_stream      # 60 × GPT-2-small (124M) = 30 GB on disk
    python -m benchmarks.streaming --model tiny --n 4 --dir DIR --out-dir DIR   # a smoke test in seconds

Writes the checkpoints as .safetensors (a random walk from a random start; the cost does not depend on
their content), then builds the subspace in a fresh process and reports wall time and that
process's peak RSS. The checkpoint files are removed afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from benchmarks.common import announce_backends, environment, pick_device, save


class GPT2Shapes(nn.Module):
    """The parameter tensors of GPT-2 small (124,439,808 parameters); no forward is needed here."""

    def __init__(self, vocab=50257, ctx=1024, d=768, layers=12):
        super().__init__()
        self.wte = nn.Parameter(torch.empty(vocab, d))
        self.wpe = nn.Parameter(torch.empty(ctx, d))
        self.h = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.ln_1 = nn.LayerNorm(d)
            blk.c_attn = nn.Linear(d, 3 * d)
            blk.c_proj = nn.Linear(d, d)
            blk.ln_2 = nn.LayerNorm(d)
            blk.c_fc = nn.Linear(d, 4 * d)
            blk.mlp_proj = nn.Linear(4 * d, d)
            self.h.append(blk)
        self.ln_f = nn.LayerNorm(d)


SHAPES = {"gpt2": {}, "tiny": dict(vocab=1000, ctx=64, d=64, layers=2)}


def write_checkpoints(model, n, directory):
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    current = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in model.state_dict().items()}
    paths = []
    for i in tqdm(range(n), desc="writing checkpoints", unit="ckpt"):
        for v in current.values():
            v.add_(torch.randn(v.shape, generator=gen), alpha=1e-3)
        path = os.path.join(directory, f"ckpt_{i:03d}.safetensors")
        save_file(current, path)
        paths.append(path)
    return paths


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def build_worker(paths, bits, out, model_name="gpt2"):
    """Peak RSS counts the pages of the memory-mapped checkpoint files that were read (clean, and
    given back by the kernel under pressure); peak anonymous memory is what construction allocates."""
    import resource
    import threading

    import twa_kernels as twa

    peak_anon = [0]
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            peak_anon[0] = max(peak_anon[0], _rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = GPT2Shapes(**SHAPES[model_name])
    t0 = time.perf_counter()
    space = twa.Subspace.from_checkpoints(model, paths, bits=bits, progress=True)
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    space.save(out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"build_s": elapsed, "peak_rss_bytes": peak, "peak_anon_bytes": peak_anon[0],
                      "subspace_bytes": space.nbytes, "num_params": space.numel, "n": space.n,
                      "bits": space.bits}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/twa_stream")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--model", choices=sorted(SHAPES), default="gpt2", help="tiny: a smoke test")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reuse", action="store_true", help="use checkpoint files already in --dir")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        build_worker(args.worker[:-1], args.bits, args.worker[-1], args.model)
        return
    announce_backends(torch.device("cpu"))
    model = GPT2Shapes(**SHAPES[args.model])
    numel = sum(p.numel() for p in model.parameters())
    existing = [os.path.join(args.dir, f"ckpt_{i:03d}.safetensors") for i in range(args.n)]
    if args.reuse and all(os.path.exists(x) for x in existing):
        paths = existing
    else:
        paths = write_checkpoints(model, args.n, args.dir)
    on_disk = sum(os.path.getsize(x) for x in paths)
    out = os.path.join(args.dir, "subspace.safetensors")
    try:
        res = subprocess.run([sys.executable, "-m", "benchmarks.streaming", "--bits", str(args.bits),
                              "--model", args.model, "--worker", *paths, out], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        r = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    device = pick_device("cpu")
    env = environment(device)
    md = (f"Streaming construction on {env['device']} ({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM), "
          f"commit {str(env['commit'])[:10]}, {env['date']}: {args.n} checkpoints × {numel:,} parameters "
          f"= {on_disk / 1e9:.1f} GB on disk (fp32 .safetensors) → {args.bits}-bit subspace of "
          f"{r['subspace_bytes'] / 1e9:.2f} GB in {r['build_s']:.0f} s; peak anonymous memory "
          f"{r.get('peak_anon_bytes', 0) / 2**30:.2f} GiB, peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB.\n")
    print(md)
    save("streaming", device, {"checkpoint_bytes": on_disk, **r}, md, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
