"""Tuning sweep of the GPU kernels at one shape (default: the headline D = 25.6M, n = 60, 4 bits):
Triton tile configurations and the CUDA backend, each checked against the torch reference on the
same inputs before it is timed, with project and expand also timed apart.

    python -m benchmarks.kernel_variants [--bits 4] [--n 60] [--size 25557032]

The dense fp32 P of the same shape runs in the same call, for the "≥ 4× dense" ratio ("of copy" for
it counts the packed bytes, so compare its time). Prints a table (fastest first) and saves JSON
under benchmarks/results/ (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.common import (announce_backends, copy_bandwidth, environment, markdown_table, median, pick_device,
                               save, time_fn)
from benchmarks.roofline import step_bytes
from twa_kernels.backends import available_backends, make_engine
from twa_kernels.backends.torch_ref import TorchEngine
from twa_kernels.testing import layer_sizes_like_a_cnn, random_projection


def candidates(proj, device, dry_run=False):
    """The variants timed; a dry run (interpreter) takes one small one, since it only checks the script."""
    from twa_kernels.backends.rows.triton_kernels import TritonEngine

    from twa_kernels.backends import REGISTRY
    from twa_kernels.backends.measured import DEFAULT_SUFFIX

    # each GPU backend as backend="auto" would build it: the rows the committed record is made of
    runs = available_backends(device)
    out = [(f"{name}{DEFAULT_SUFFIX}", lambda name=name: make_engine(proj, device, name), name)
           for name, backend in REGISTRY.items() if "cuda" in backend.devices and name != "torch" and name in runs]
    shapes = [(256, 4, 2)] if dry_run else [(4096, 4, 16), (4096, 4, 32), (4096, 4, 64), (8192, 4, 32),
                                            (8192, 8, 32), (2048, 4, 64), (16384, 8, 16)]
    for tile, warps, tiles in shapes:
        def make(tile=tile, warps=warps, tiles=tiles):
            return TritonEngine(proj, device, tile_codes=tile, num_warps=warps, tiles_per_program=tiles)
        out.append((f"triton tile={tile} warps={warps} tiles/program={tiles}", make, None))
    from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine

    # v2 kernels on the plane layout (not yet GPU-measured): warps per tile, tiles per program, column block
    plane = [(1, 2, 8)] if dry_run else [(4, 2, 8), (4, 4, 8), (4, 1, 8), (8, 2, 8), (4, 2, 4), (4, 2, 16)]
    for warps, tiles, jb in plane:
        def make(warps=warps, tiles=tiles, jb=jb):
            return TritonPlaneEngine(proj, device, num_warps=warps, tiles_per_program=tiles, column_block=jb)
        out.append((f"triton_plane warps={warps} tiles/program={tiles} column block={jb}", make, None))
    if "cuda" in runs:
        # the v2 CUDA kernels on the plane layout (not yet GPU-measured): tiles per program
        from twa_kernels.backends.plane.cuda_engine import CudaPlaneEngine

        for tiles in (2, 4, 1):
            out.append((f"cuda_plane tiles/program={tiles}",
                        lambda tiles=tiles: CudaPlaneEngine(proj, device, tiles_per_program=tiles), None))
    return out


def relative_error(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=25_557_032)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--layers", type=int, default=161, help="layers the size is split into (ResNet-50 has 161)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--device", default="auto",
                   help="cuda; cpu only with TRITON_INTERPRET=1, as a dry run of the whole script (no timing "
                        "it gives means anything)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("kernel_variants tunes GPU kernels: it needs a CUDA device (or, for a dry run on the CPU, "
                         "TRITON_INTERPRET=1 and a small --size)")
    if device.type != "cuda" and args.size > 100_000:
        raise SystemExit(f"a dry run in the Triton interpreter takes a small --size (at most 100000, got {args.size})")
    announce_backends(device)
    sizes = layer_sizes_like_a_cnn(args.size, args.layers)
    proj = random_projection(sizes, args.n, args.bits, device=device)
    L = len(sizes)
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(args.size, device=device, generator=gen)
    w0 = torch.randn(args.size, device=device, generator=gen)
    delta = torch.randn(L, args.n, device=device, generator=gen) * 1e-2
    ref = TorchEngine(proj, device)
    c_ref = ref.project(g)
    w_ref = w0.clone()
    ref.expand(w_ref, delta)
    copy_bw = copy_bandwidth(device, nbytes=1 << 30 if device.type == "cuda" else 1 << 24)
    nbytes = step_bytes(args.size, args.n, args.bits)
    no_move = torch.zeros_like(delta)  # timed expands leave w as it is, at the same cost
    rows = []
    # The dense P is another matrix (same cost, not the same values): no error to report for it.
    dry_run = device.type != "cuda"
    warmup, iters = (0, 1) if dry_run else (3, args.iters)
    same_p = [(name, make, backend, True)
              for name, make, backend in [("torch reference", lambda: ref, "torch")] + candidates(proj, device, dry_run)]
    dense = ("dense fp32 P (torch matmul, the paper's TWA w/o quantization)",
             lambda: make_engine(random_projection(sizes, args.n, None, device=device), device), None, False)
    for name, make, backend, comparable in same_p + [dense]:
        eng = make()
        c = eng.project(g)
        w = w0.clone()
        eng.expand(w, delta)
        err_c = relative_error(c, c_ref) if comparable else None
        err_w = relative_error(w - w0, w_ref - w0) if comparable else None
        w = w0.clone()
        t_proj = median(time_fn(lambda: eng.project(g), device, warmup=warmup, iters=iters))
        t_exp = median(time_fn(lambda: eng.expand(w, no_move), device, warmup=warmup, iters=iters))
        t_step = median(time_fn(lambda: (eng.project(g), eng.expand(w, no_move)), device, warmup=warmup,
                                iters=iters))
        rows.append({"variant": name, "backend": backend, "project_s": t_proj, "expand_s": t_exp, "step_s": t_step,
                     "frac_copy": nbytes / t_step / copy_bw, "rel_err_c": err_c, "rel_err_dw": err_w})
        print(rows[-1], flush=True)
        del eng
    payload = {"copy_GBps": copy_bw / 1e9, "bytes": nbytes, "shape": {"D": args.size, "n": args.n, "bits": args.bits},
               "rows": rows, "dry_run": dry_run}
    md = render(environment(device), payload)
    print(md)
    save(f"kernel_variants_n{args.n}_b{args.bits}", device, payload, md, out_dir=args.out_dir)


def _err(x):
    return "–" if x is None else f"{x:.1e}"


def render(env, payload):
    """The markdown table of a run (fastest first), from its JSON alone."""
    rows = sorted(payload["rows"], key=lambda r: r["step_s"])
    shape = payload.get("shape", {"D": 25_557_032, "n": 60, "bits": 4})
    header = ["variant", "step ms", "project ms", "expand ms", "of copy", "rel err c", "rel err Δw"]
    table = [[r["variant"], f"{1e3 * r['step_s']:.3f}", f"{1e3 * r['project_s']:.3f}", f"{1e3 * r['expand_s']:.3f}",
              f"{100 * r['frac_copy']:.0f}%", _err(r["rel_err_c"]), _err(r["rel_err_dw"])] for r in rows]
    return (f"Kernel variants at D = {shape['D']:,}, n = {shape['n']}, {shape['bits']} bits on {env['device']}, "
            f"torch {env['torch']}, triton {env['triton']}, commit {str(env['commit'])[:10]}, {env['date']}; "
            f"copy bandwidth {payload['copy_GBps']:.0f} GB/s (same run); {payload['bytes'] / 1e9:.2f} GB per step "
            "(P̃ twice, g, w in and out); errors are relative to the torch reference on the same inputs\n\n"
            + ("**Dry run in the Triton interpreter on a CPU: the timings mean nothing.**\n\n"
               if payload.get("dry_run") else "") + markdown_table(header, table))


if __name__ == "__main__":
    main()
