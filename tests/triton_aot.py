"""Compile every Triton kernel variant for real GPUs ahead of time, with no GPU present (Triton ships
ptxas), exactly as a launch compiles it.

The kernels are compiled through :meth:`triton.JITFunction.warmup` with the engine's own launches
(:meth:`TritonEngine.project_launches` / :meth:`TritonEngine.expand_launches`: the objects
``project()`` and ``expand()`` run), so the signature, the constants and the specialization (which
pointers are 16-byte aligned, which integers divisible by 16) are the launch's own, not a hand-written
copy. A stand-in driver tells Triton which GPU to compile for; nothing is launched.

Run as a script with TRITON_INTERPRET unset: ``python tests/triton_aot.py 90 80``; ``TWA_AOT_DUMP=dir``
also writes the cubins (for ``cuobjdump --dump-sass``).
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

from twa_kernels.backends.rows import triton_kernels as tk  # noqa: E402
from twa_kernels.backends.aot import compile_launch  # noqa: E402
from twa_kernels.testing import random_projection  # noqa: E402

# A layer of 4096 + 7 rows (several programs, a partial tile) and a one-row layer; n = 60 as in the
# paper's Table 13.
SIZES, N = (4096 * 40 + 7, 1), 60


def variants():
    """(name, launch) for every kernel variant the engine launches: each bit width in fp32, 4 bits in
    bf16 and fp16, expand with and without Kahan compensation, and the ordered reduction."""
    for bits in (1, 2, 4, 8):
        eng = tk.TritonEngine(random_projection(SIZES, N, bits), torch.device("cpu"))
        L = len(SIZES)
        t, gsum = torch.empty(L, N), torch.empty(L)
        addresses = torch.zeros(len(SIZES), dtype=torch.int64)
        s = torch.zeros(L)
        for dtype in ((torch.float32, torch.bfloat16, torch.float16) if bits == 4 else (torch.float32,)):
            dt = str(dtype).split(".")[-1]
            project, reduce = eng.project_launches(addresses, dtype, t, gsum)
            yield f"project {bits}-bit {dt}", project
            if bits == 4 and dtype == torch.float32:
                yield "reduce", reduce
            for comp in (False, True):
                if comp or dtype == torch.float32:
                    (launch,) = eng.expand_launches(addresses, dtype, addresses if comp else None, s)
                    yield f"expand {bits}-bit {dt}{' +kahan' if comp else ''}", launch


def plane_variants():
    """The v2 plane kernels at 4 bits: project (fp32), expand (fp32, bf16 + Kahan), the reduction."""
    from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine

    eng = TritonPlaneEngine(random_projection(SIZES, N, 4), torch.device("cpu"))
    L = len(SIZES)
    addresses = torch.zeros(L, dtype=torch.int64)
    c, delta = torch.empty(L, N), torch.zeros(L, N)
    project, reduce = eng.project_launches(addresses, torch.float32, c)
    yield "plane project 4-bit float32", project
    (expand,) = eng.expand_launches(addresses, torch.float32, None, delta)
    yield "plane expand 4-bit float32", expand
    (expand,) = eng.expand_launches(addresses, torch.bfloat16, addresses, delta)
    yield "plane expand 4-bit bfloat16 +kahan", expand
    yield "plane reduce", reduce


def all_variants():
    yield from variants()
    yield from plane_variants()


def tensor_arguments(launch) -> list[int]:
    return [i for i, a in enumerate(launch.args) if isinstance(a, torch.Tensor)]


def check_specialization(arch: int) -> int:
    """Every variant compiles with the launch's specialization: each tensor argument (torch allocates
    them 16-byte aligned, on the CPU as on a GPU) is marked 16-divisible, and the same launch made
    again with fresh tensors finds the compiled kernel under the launch's own cache key."""
    count = 0
    for name, launch in all_variants():
        kernel = compile_launch(launch, arch)
        attrs = {k[0]: v for k, v in kernel.src.attrs.items()}
        for i in tensor_arguments(launch):
            assert ["tt.divisibility", 16] in attrs.get(i, []), (name, i, attrs)
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in launch.args]
        again = launch.kernel.warmup(*fresh, grid=launch.grid, **launch.constants)
        assert again is kernel, f"{name}: a launch with equal arguments would compile again"
        count += 1
    return count


def main(archs, dump=None):
    for arch in archs:
        for name, launch in all_variants():
            kernel = compile_launch(launch, int(arch))
            cubin = kernel.asm["cubin"]
            assert len(cubin) > 0, name
            print(f"sm_{arch} {name}: cubin {len(cubin)} bytes")
            if dump:  # cubins for cuobjdump/nvdisasm (Triton ships both)
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"sm{arch}_{name.replace(' ', '_')}.cubin"), "wb") as f:
                    f.write(cubin)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        for arch in sys.argv[2:] or ["90"]:
            print(f"sm_{arch}: {check_specialization(int(arch))} variants compiled with the launch's specialization")
    else:
        main(sys.argv[1:] or ["90"], os.environ.get("TWA_AOT_DUMP"))
