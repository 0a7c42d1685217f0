"""SASS instructions per code of every GPU kernel's hot loop, read offline: no GPU needed.

Each Triton kernel is compiled for sm_90 exactly as a launch compiles it (:mod:`twa_kernels.backends.aot`),
each CUDA kernel with nvcc; ``cuobjdump`` (Triton ships one) disassembles it. The hot loop is the loop
(a backward branch and its target) with the most FFMAs, the innermost one on a tie; its instructions
are divided by the codes one thread handles per iteration, which the kernel's geometry gives (for the
plane kernels, which do exactly one FFMA per code, that equals the loop's FFMA count, and the script
checks it). Issue rate bounds the step: at k instructions per code the headline step (3.07 G codes)
needs about 0.092·k ms of pure issue on an H100.

    python -m benchmarks.sass_counts [--n 60] [--out-dir DIR]       # TRITON_INTERPRET must be unset

Writes ``sass_counts.json`` and ``.md`` under benchmarks/results/ (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import environment, markdown_table
from twa_kernels.backends.aot import compile_launch, triton_tool
from twa_kernels.testing import random_projection

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ARCH = 90
# Several programs per layer, a partial tile, a one-row layer.
SIZES = (4096 * 40 + 7, 1)
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH = re.compile(r"\bBRA\b[^;]*?0x([0-9a-f]+)")


@dataclass
class LoopCount:
    backend: str
    kernel: str
    bits: int
    instructions: int  # in the hot loop's body
    ffma: int
    codes: int  # per thread per iteration
    registers: int | None

    @property
    def per_code(self) -> float:
        return self.instructions / self.codes


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """{function name: [(address, instruction)]} of a cuobjdump -sass listing."""
    out, name = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = INSTRUCTION.search(line)
        if m and name is not None:
            out[name].append((int(m.group(1), 16), m.group(2).strip()))
    return out


def hot_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions of the innermost loop with the most FFMAs (a loop is a backward branch and its
    target; innermost: it holds no other loop)."""
    loops = set()
    for addr, ins in code:
        m = BRANCH.search(ins)
        if m and int(m.group(1), 16) <= addr:
            loops.add((int(m.group(1), 16), addr))
    innermost = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    best, best_key = [], None
    for a, b in sorted(innermost):
        body = [i for addr, i in code if a <= addr <= b and not i.startswith("NOP")]
        key = (sum(opcode(i).startswith("FFMA") for i in body), -len(body))
        if best_key is None or key > best_key:  # on a tie, the leaner copy (project's later column blocks)
            best, best_key = body, key
    return best


def opcode(ins: str) -> str:
    parts = ins.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def write_cubin(cubin: bytes, workdir: str) -> str:
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return path


def disassemble(path: str) -> str:
    return subprocess.run([triton_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                          check=True).stdout


def registers(path: str) -> dict[str, int]:
    out = subprocess.run([triton_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                         check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+)", out)}


def count(backend, kernel, bits, cubin, codes, workdir, name=None, check_ffma=False) -> LoopCount:
    path = write_cubin(cubin, workdir)
    funcs = functions(disassemble(path))
    fname = name or next(iter(funcs))
    body = hot_loop(funcs[fname])
    ffma = sum(opcode(i).startswith("FFMA") for i in body)
    if check_ffma and ffma != codes:
        raise AssertionError(f"{backend} {kernel} {bits}-bit: {ffma} FFMAs in the hot loop, the geometry says "
                             f"{codes} codes per iteration")
    return LoopCount(backend, kernel, bits, len(body), ffma, codes, registers(path).get(fname))


def triton_counts(n: int, workdir: str, widths=(1, 2, 4, 8)) -> list[LoopCount]:
    from twa_kernels.backends.rows.triton_kernels import TritonEngine
    from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine

    out = []
    L = len(SIZES)
    addresses = torch.zeros(L, dtype=torch.int64)
    for bits in widths:
        proj = random_projection(SIZES, n, bits)
        eng = TritonEngine(proj, torch.device("cpu"), tile_codes=4096, tiles_per_program=32)
        threads = 32 * eng.num_warps
        per_iter = eng.block_rows * eng.slots * (32 // bits) // threads
        project, _ = eng.project_launches(addresses, torch.float32, torch.empty(L, n), torch.empty(L))
        (expand,) = eng.expand_launches(addresses, torch.float32, None, torch.zeros(L))
        out.append(count("triton", "project", bits, compile_launch(project, ARCH).asm["cubin"], per_iter, workdir))
        out.append(count("triton", "expand", bits, compile_launch(expand, ARCH).asm["cubin"], per_iter, workdir))
        plane = TritonPlaneEngine(proj, torch.device("cpu"), tiles_per_program=2)
        vec, per_word = plane.plane.vec, plane.plane.per_word
        project, _ = plane.project_launches(addresses, torch.float32, torch.empty(L, n))
        (expand,) = plane.expand_launches(addresses, torch.float32, None, torch.zeros(L, n))
        out.append(count("triton_plane", "project", bits, compile_launch(project, ARCH).asm["cubin"],
                         plane.column_block * vec * per_word, workdir, check_ffma=True))
        out.append(count("triton_plane", "expand", bits, compile_launch(expand, ARCH).asm["cubin"],
                         plane.unroll * vec * per_word, workdir, check_ffma=True))
    return out


def cuda_counts(workdir: str, widths=(1, 2, 4, 8)) -> list[LoopCount]:
    """The CUDA kernels of csrc/ compiled by nvcc for sm_90 (skipped where nvcc is not installed)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    out = []
    for source in sorted((ROOT / "csrc").glob("*/twa_cuda*.cu")):
        cubin_path = os.path.join(workdir, source.stem + ".cubin")
        subprocess.run([nvcc, "-O3", f"-arch=sm_{ARCH}", "-cubin", "-I", str(ROOT / "csrc"), str(source), "-o",
                        cubin_path], check=True, capture_output=True)
        funcs = functions(disassemble(cubin_path))
        regs = registers(cubin_path)
        for fname, code in funcs.items():
            # the fp32 instance: the template arguments are <BITS, float>, mangled "ILi<BITS>Ef"
            m = re.search(r"(project_partials|expand_rows|plane_project|plane_expand)ILi(\d)Ef", fname)
            if not m or int(m.group(2)) not in widths:
                continue
            body = hot_loop(code)
            ffma = sum(opcode(i).startswith("FFMA") for i in body)
            kernel = "project" if "project" in m.group(1) else "expand"
            backend = "cuda_plane" if "plane" in m.group(1) else "cuda"
            # One FFMA per code in every CUDA kernel's inner loop: the FFMAs count its codes.
            out.append(LoopCount(backend, kernel, int(m.group(2)), len(body), ffma, max(1, ffma), regs.get(fname)))
    return out


def render(env, rows, n) -> str:
    table = [[r["backend"], r["kernel"], r["bits"], r["instructions"], r["codes"], f"{r['per_code']:.2f}",
              r["registers"] if r["registers"] is not None else "–"] for r in rows]
    return (f"SASS instructions per code in each kernel's hot loop, sm_{ARCH}, n = {n}, fp32 gradients and weights; "
            f"compiled offline (no GPU) with triton {env['triton']}, torch {env['torch']}, commit "
            f"{str(env['commit'])[:10]}, {env['date']}. Per code = the hot loop's instructions / the codes one thread "
            "handles per iteration. Target: ≤ 4 at 4 bits for both products. **Not a GPU measurement.**\n\n"
            + markdown_table(["backend", "kernel", "bits", "loop instructions", "codes / iteration", "per code",
                              "registers"], table))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_counts compiles for a GPU: unset TRITON_INTERPRET")
    with tempfile.TemporaryDirectory() as workdir:
        counts = triton_counts(args.n, workdir, args.bits) + cuda_counts(workdir, args.bits)
    rows = [dict(asdict(c), per_code=c.per_code) for c in counts]
    env = environment(torch.device("cpu"))
    env["device"] = f"none (offline compile for sm_{ARCH})"
    md = render(env, rows, args.n)
    print(md)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sass_counts.json").write_text(json.dumps({"env": env, "arch": ARCH, "n": args.n, "rows": rows}, indent=1))
    (out / "sass_counts.md").write_text(md + "\n")
    return rows


if __name__ == "__main__":
    main()
