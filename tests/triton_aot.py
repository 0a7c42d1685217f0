"""Compile every Triton kernel variant for real GPUs ahead of time, with no GPU present (Triton ships
ptxas). Run as a script with TRITON_INTERPRET unset: ``python tests/triton_aot.py 90 80``."""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from twa_kernels.backends import triton_kernels as tk  # noqa: E402

TABLES = {"prog_layer_ptr": "*i64", "prog_row_ptr": "*i64", "word_off_ptr": "*i64", "param_off_ptr": "*i64",
          "size_ptr": "*i64"}
DT = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _expand_sig(dt, comp, scalars, consts):
    return {"words_ptr": "*i32", "w_ptr": DT[dt], "comp_ptr": "*bf16" if comp else DT[dt], "u_ptr": "*fp32",
            "s_ptr": "*fp32", **TABLES, **scalars, **{k: "constexpr" for k in consts}}


def variants():
    for bits in (1, 2, 4, 8):
        per_word = 32 // bits
        for dt in (("fp32", "bf16", "fp16") if bits == 4 else ("fp32",)):
            consts = {"BITS": bits, "SLOTS": 8, "N_PAD": 8 * per_word,
                      "BLOCK_R": max(1, 4096 // (8 * per_word)), "ROWS": 8 * max(1, 4096 // (8 * per_word))}
            scalars = {"num_words": "i64", "n": "i32", "n_slots": "i32", "n_windows": "i32"}
            sig = {"words_ptr": "*i32", "grad_ptr": DT[dt], **TABLES, "part_t_ptr": "*fp32",
                   "part_g_ptr": "*fp32", **scalars, **{k: "constexpr" for k in consts}}
            yield f"project {bits}-bit {dt}", tk._slots_project_kernel, sig, consts
            for comp in (False, True):
                c = dict(consts, HAS_COMP=comp)
                if comp or dt == "fp32":
                    sig = _expand_sig(dt, comp, scalars, c)
                    yield f"expand {bits}-bit {dt}{' +kahan' if comp else ''}", tk._slots_expand_kernel, sig, c
    sig = {"part_t_ptr": "*fp32", "part_g_ptr": "*fp32", "layer_prog_ptr": "*i64", "scale_ptr": "*fp32",
           "zero_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "N_PAD": "constexpr", "N_P2": "constexpr"}
    yield "reduce", tk._project_reduce_kernel, sig, {"N_PAD": 64, "N_P2": 64}


def main(archs, dump=None):
    for arch in archs:
        for name, fn, sig, consts in variants():
            kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                                    target=GPUTarget("cuda", int(arch), 32))
            assert len(kernel.asm["cubin"]) > 0, name
            print(f"sm_{arch} {name}: cubin {len(kernel.asm['cubin'])} bytes")
            if dump:  # cubins for cuobjdump/nvdisasm (Triton ships both)
                os.makedirs(dump, exist_ok=True)
                with open(os.path.join(dump, f"sm{arch}_{name.replace(' ', '_')}.cubin"), "wb") as f:
                    f.write(kernel.asm["cubin"])


if __name__ == "__main__":
    dump = os.environ.get("TWA_AOT_DUMP")
    main(sys.argv[1:] or ["90"], dump)
