"""The ``twa`` command (also ``python -m twa_kernels``).

    twa backends [--device cpu|cuda] [--json]      which kernel backends run here, why others do not, and the fix
    twa average {uniform,ema,lawa} CKPT... -o OUT  average checkpoints, streamed (a Hugging Face folder in, one out)
    twa average weighted --weights 0.1,0.9 A B -o OUT   the exact weighted sum (or --decay FAMILY: a decay's merge)
    twa build CKPT... --bits 4 -o space.safetensors   build a subspace; names and shapes from the first checkpoint
    twa info FILE                                  what a subspace or a checkpoint holds
    twa alphas SPACE STATE                         α per layer by parameter name, as JSON
    twa average greedy CKPT... --val FILE -o OUT   the greedy soup of Hugging Face models, chosen on data
    twa fit CKPT... --val FILE --eval FILE -o OUT  a learned merge of Hugging Face checkpoints (TWA)

Every subcommand has ``--help``. Bad input gets one line naming the problem on stderr and exit status 1
(2 for a malformed command line); nothing is written unless the whole command succeeds.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys

import torch
from safetensors import safe_open

from .backends import backend_report, format_backend_report
from .baselines import average_tensor, ema_weights, lawa_weights, open_matching
from .checkpoints import label, open_checkpoint
from .decay import DECAY_FAMILIES, check_merge_weights, decay_merge_weights
from .fit.run import INITS, SPLITS, TEXT_SPLITS
from .fit.tasks import TASKS
from .hf_output import check_new_output, hf_weights_file, write_model
from .optim import twa_state
from .packing import SUPPORTED_BITS
from .quantize import SCALE_MODES
from .subspace import DECOUPLE_MODES, LAYER_MODES, Subspace

BN_STATISTICS = ("*.running_mean", "*.running_var", "*.num_batches_tracked")


class UsageError(Exception):
    """Bad input on the command line: reported as one line, exit status 1."""


# ---------------------------------------------------------------------------------------------- backends
def _backends(args) -> int:
    report = backend_report(args.device)
    if args.json:
        print(json.dumps([r.as_dict() for r in report], indent=1))
    else:
        print(format_backend_report(report))
    return 0


# ---------------------------------------------------------------------------------------------- average
def _weights(args, count: int) -> list[float]:
    if args.method != "weighted" and (args.weights is not None or args.decay is not None):
        raise UsageError(f"--weights and --decay belong to 'twa average weighted', not {args.method!r}")
    if args.method == "uniform":
        return [1.0 / count] * count
    if args.method == "ema":
        return ema_weights(count, args.gamma)
    if args.method == "lawa":
        if args.k < 1:
            raise UsageError(f"--k must be at least 1, got {args.k}")
        return lawa_weights(count, min(args.k, count))
    if (args.weights is None) == (args.decay is None):
        raise UsageError("'twa average weighted' takes exactly one of --weights W1,W2,... and --decay FAMILY")
    if args.decay is not None:
        return decay_merge_weights(count, args.decay, reverse=args.reverse)
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    weights = check_merge_weights(weights, count)
    total = math.fsum(weights)
    if args.normalize:
        return [w / total for w in weights]
    if abs(total - 1.0) > 1e-12:
        print(f"twa average: note: the weights sum to {total:g}; the output is their exact weighted sum, not an "
              f"average (--normalize divides by the sum)", file=sys.stderr)
    return weights


def _step_of(path: str) -> int | None:
    """The training step in a checkpoint's name: its last number (checkpoint-1200, step_000300.pt)."""
    name = os.path.basename(os.path.normpath(path))
    numbers = re.findall(r"\d+", re.sub(r"(\.[A-Za-z][A-Za-z0-9]*)+$", "", name))
    return int(numbers[-1]) if numbers else None


def _window(args, inputs: list[str]) -> list[str]:
    """The checkpoints --steps START:END and --last K select, in step order; all of them, in the
    given order, without either."""
    if args.last is None and args.steps is None:
        return inputs
    steps = [_step_of(p) for p in inputs]
    if None in steps:
        if args.steps is not None:
            raise UsageError(f"--steps reads the step from each checkpoint's name; {inputs[steps.index(None)]!r} "
                             f"has no number in it")
        chosen = inputs
    else:
        if len(set(steps)) != len(steps):
            step = next(s for s in steps if steps.count(s) > 1)
            raise UsageError(f"two checkpoints are named for step {step}: give each step once")
        order = sorted(zip(steps, inputs))
        if args.steps is not None:
            m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", args.steps)
            if m is None:
                raise UsageError(f"--steps takes START:END (either may be left out), got {args.steps!r}")
            lo = int(m.group(1)) if m.group(1) else -1
            hi = int(m.group(2)) if m.group(2) else math.inf
            order = [(s, p) for s, p in order if lo <= s <= hi]
            if not order:
                raise UsageError(f"no checkpoint has a step in {args.steps} (steps: {', '.join(map(str, sorted(steps)))})")
        chosen = [p for _, p in order]
    if args.last is not None:
        if args.last < 1:
            raise UsageError(f"--last must be at least 1, got {args.last}")
        chosen = chosen[-args.last:]
    return chosen


def _fit_module():
    """twa_kernels.fit, with a one-line error where transformers (which it loads models with) is missing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise UsageError("this command loads Hugging Face models and needs transformers: pip install "
                         "'twa-kernels[hf]'")
    from . import fit

    return fit


def _greedy_weights(args, inputs: list[str]) -> list[float]:
    """'twa average greedy': the greedy soup chosen on --val (each model, then each addition, scored)."""
    if args.val is None:
        raise UsageError("'twa average greedy' chooses the models on data: give --val FILE (a text, or JSON lines "
                         "with --task sequence-classification)")
    found = _fit_module().greedy(inputs, args.val, task=args.task, context=args.context, tokenizer=args.tokenizer,
                                 batch=args.batch, eval_tokens=args.eval_tokens, device=args.device,
                                 progress=False if args.quiet else None, trusted=args.trusted)
    names = [os.path.basename(os.path.normpath(p)) for p in inputs]
    print(f"greedy soup on {args.val} ({found['items']} {found['unit']}s): kept {len(found['kept'])} of {len(inputs)}: "
          + ", ".join(names[i] for i in found["kept"]) + f" (loss {found['soup_loss']:.4f}; each model: "
          + ", ".join(f"{nm} {x:.4f}" for nm, x in zip(names, found["losses"])) + ")")
    return found["weights"]


def _average(args) -> int:
    inputs = _window(args, list(args.checkpoints))
    if len(inputs) < 2:
        raise UsageError(f"averaging needs at least two checkpoints, got {len(inputs)}")
    if args.val is not None and args.method != "greedy":
        raise UsageError(f"--val belongs to 'twa average greedy', not {args.method!r}")
    hf = all(hf_weights_file(p) is not None for p in inputs)
    out = os.fspath(args.output)
    check_new_output(out, folder=hf, what="averaged model")
    weights = _greedy_weights(args, inputs) if args.method == "greedy" else _weights(args, len(inputs))
    sources = open_matching(inputs, trusted=args.trusted)
    keys = list(sources[0].keys())
    write_model(out, keys, lambda k: average_tensor(sources, weights, k), like=inputs[-1] if hf else None,
                desc=f"averaging {len(inputs)} checkpoints", progress=False if args.quiet else None)
    used = ", ".join(f"{os.path.basename(os.path.normpath(p))} × {w:.6g}" for p, w in zip(inputs, weights))
    print(f"wrote {out} ({args.method} average of {len(inputs)} checkpoints, {len(keys)} tensors: {used})")
    return 0


# ---------------------------------------------------------------------------------------------- build
def _selected_names(source, include, exclude) -> tuple[list[str], list[tuple[int, ...]]]:
    names = []
    for k in source.keys():
        if not source.dtype(k).is_floating_point:
            continue
        if include and not any(fnmatch.fnmatchcase(k, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(k, p) for p in (*BN_STATISTICS, *exclude)):
            continue
        names.append(k)
    if not names:
        raise UsageError(f"{source.label}: no floating-point tensor is left to build a subspace from "
                         "(check --include / --exclude)")
    return names, [tuple(source.shape(k)) for k in names]


def _build(args) -> int:
    out = os.fspath(args.output)
    if not out.endswith(".safetensors"):
        raise UsageError(f"a subspace is saved as a .safetensors file, not {out}")
    first = open_checkpoint(args.checkpoints[0], trusted=args.trusted, where=label(args.checkpoints[0], 0))
    names, shapes = _selected_names(first, args.include, args.exclude)
    bits = None if args.bits == "fp32" else int(args.bits)
    space = Subspace.from_names(names, shapes, args.checkpoints, bits=bits, decouple=args.decouple,
                                layers=args.layers, scale=args.scale, progress=None if not args.quiet else False,
                                trusted=args.trusted)
    space.save(out)
    print(f"wrote {out}: {space!r}")
    return 0


# ---------------------------------------------------------------------------------------------- info
def _subspace_metadata(path: str) -> dict | None:
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not readable as safetensors: the checkpoint reader says why, naming the file
        return None
    return meta if "twa_subspace" in meta else None


def _info(args) -> int:
    path = os.fspath(args.file)
    meta = _subspace_metadata(path)
    if meta is not None:
        space = Subspace.load(path)
        record = {"kind": "subspace", "file": path, "n": space.n, "bits": space.bits, "layers": space.num_layers,
                  "layers_mode": space.layers_mode, "decouple": space.decouple_mode, "scale": space.scale_mode,
                  "parameters": space.numel, "nbytes": space.nbytes, "fingerprint": space.fingerprint,
                  "frozen_layers": int(space.frozen.sum()), "shard": space.shard,
                  "names": space.names}
    else:
        source = open_checkpoint(path, trusted=args.trusted)
        keys = list(source.keys())
        dtypes: dict[str, int] = {}
        numel = nbytes = 0
        for k in keys:
            dt = source.dtype(k)
            count = 1
            for d in source.shape(k):
                count *= d
            numel += count
            nbytes += count * torch.empty((), dtype=dt).element_size()
            dtypes[str(dt).replace("torch.", "")] = dtypes.get(str(dt).replace("torch.", ""), 0) + 1
        record = {"kind": "checkpoint", "file": path, "tensors": len(keys), "elements": numel, "nbytes": nbytes,
                  "dtypes": dtypes, "names": keys}
    if args.json:
        print(json.dumps(record, indent=1))
        return 0
    shown = {k: v for k, v in record.items() if k != "names"}
    for k, v in shown.items():
        print(f"{k:>14}: {v}")
    names = record["names"]
    print(f"{'names':>14}: {', '.join(names[:8])}" + (f" … ({len(names)} in all)" if len(names) > 8 else ""))
    return 0


# ---------------------------------------------------------------------------------------------- alphas
def _find_twa_state(obj, where: str) -> dict:
    """The "twa" entry of a projected optimizer's state_dict, wherever the file keeps it: the state_dict
    itself, under "optimizer" (a hand-written checkpoint), or in Lightning's "optimizer_states"."""
    candidates = [obj]
    if isinstance(obj, dict):
        candidates += [obj.get("optimizer"), obj.get("optimizer_state_dict"), *(obj.get("optimizer_states") or [])]
    for c in candidates:
        found = twa_state(c)
        if found is not None:
            return found
    raise UsageError(f"{where} holds no projected optimizer state (no 'twa' entry): pass a file saved from "
                     "opt.state_dict(), a Trainer's optimizer.pt, or a Lightning checkpoint")


def _alphas(args) -> int:
    space = Subspace.load(os.fspath(args.subspace))
    path = os.fspath(args.state)
    if os.path.isdir(path):  # a Trainer checkpoint folder
        path = os.path.join(path, "optimizer.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no optimizer state file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
        raise UsageError(f"{path}: not a readable optimizer state ({str(err).splitlines()[0]})") from None
    state = _find_twa_state(obj, path)
    if state.get("fingerprint") != space.fingerprint:
        raise UsageError(f"{path} was trained in another subspace (fingerprint {state.get('fingerprint')}, "
                         f"{args.subspace} has {space.fingerprint})")
    beta = state["beta"]
    if tuple(beta.shape) != (space.num_layers, space.n):
        raise UsageError(f"{path}: β has shape {tuple(beta.shape)}, expected {(space.num_layers, space.n)} "
                         "(a column-sharded state holds only its rank's columns)")
    print(json.dumps({"fingerprint": space.fingerprint, "step": float(state["step"]),
                      "alphas": space.named_alphas(beta)}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- fit
def _fit(args) -> int:
    fit = _fit_module()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    report = fit.fit(args.checkpoints, args.output, task=args.task, text=args.text, val=args.val,
                     eval_file=args.eval, split=args.split, text_split=args.text_split, base=args.base, init=args.init,
                     bits=int(args.bits), steps=args.steps, lr=args.lr, context=args.context, batch=args.batch,
                     eval_tokens=args.eval_tokens, holdout=args.holdout, tokenizer=args.tokenizer, seed=args.seed,
                     dtype=dtype, device=args.device, progress=False if args.quiet else None, trusted=args.trusted)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"twa fit: {fit.summary(report)}")
    if report["versus"]["within_noise"]:
        print(f"twa fit: note: TWA and the {report['versus']['rival']} differ by less than two standard errors of the "
              f"eval ({report['eval_items']} {report['unit']}s): more eval data would tell them apart", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twa", description="Trainable Weight Averaging tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="which kernel backends run here, and why the others do not",
                       description="Report every kernel backend for a device: whether it runs, how (built at "
                                   "install or compiled on first use), or why not and the command that fixes it.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible, else cpu)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_backends)

    def reading(p):
        p.add_argument("--trusted", action="store_true",
                       help="load pickled checkpoints that need code execution (only for files you trust)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("average", help="average checkpoints (uniform, EMA, LAWA, weighted), streamed",
                       description="Average checkpoints tensor by tensor in float64 (any format the reader takes). "
                                   "Files in: a .safetensors file out. Hugging Face checkpoint folders in: a folder "
                                   "out, sharded like the last input, with its config copied, so from_pretrained "
                                   "loads it. Integer tensors come from the last checkpoint. 'weighted' writes the "
                                   "exact weighted sum of explicit --weights (never renormalized unless --normalize), "
                                   "or the merge that stands for a learning-rate decay of the checkpoints of a "
                                   "constant-lr run (--decay; WSM's identity: linear decay is the uniform merge).")
    p.add_argument("method", choices=["uniform", "ema", "lawa", "weighted", "greedy"])
    p.add_argument("checkpoints", nargs="+", help="checkpoint files or folders, oldest first")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file, or a new folder")
    p.add_argument("--gamma", type=float, default=0.9, help="EMA decay (m ← γ m + (1 − γ) w), default 0.9")
    p.add_argument("--k", type=int, default=5, help="LAWA: average the last k checkpoints, default 5")
    p.add_argument("--weights", default=None, metavar="W1,W2,...",
                   help="weighted: one weight per checkpoint (of the window), in order")
    p.add_argument("--decay", default=None, choices=list(DECAY_FAMILIES),
                   help="weighted: the merge weights of this decay over the window")
    p.add_argument("--reverse", action="store_true", help="weighted --decay: the weights in reverse order")
    p.add_argument("--normalize", action="store_true", help="weighted --weights: divide the weights by their sum")
    p.add_argument("--last", type=int, default=None, metavar="K",
                   help="only the last K checkpoints (by the step in their names when every name has one)")
    p.add_argument("--steps", default=None, metavar="START:END",
                   help="only the checkpoints whose name's step lies in [START, END], in step order")
    p.add_argument("--val", default=None, metavar="FILE",
                   help="greedy: the data each model and each addition is scored on (a text, or JSON lines)")
    p.add_argument("--task", default="causal-lm", choices=list(TASKS), help="greedy: the models' kind")
    p.add_argument("--context", type=int, default=None, help="greedy: tokens per window or example")
    p.add_argument("--tokenizer", default="auto", help="greedy: auto, bytes, or a name or path")
    p.add_argument("--batch", type=int, default=4, help="greedy: windows or examples per forward pass")
    p.add_argument("--eval-tokens", type=int, default=16384, help="greedy: tokens of --val scored (default 16384)")
    p.add_argument("--device", default=None, help="greedy: cpu or cuda (default: cuda when visible)")
    reading(p)
    p.set_defaults(run=_average)

    p = sub.add_parser("build", help="build a TWA subspace from checkpoints (no model needed)",
                       description="Build the subspace the checkpoints span. Names and shapes come from the first "
                                   "checkpoint: every floating-point tensor except BatchNorm statistics, narrowed "
                                   "by --include / --exclude (shell patterns).")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("-o", "--output", required=True, help="the subspace, a .safetensors file")
    p.add_argument("--bits", default="4", choices=[*map(str, SUPPORTED_BITS), "fp32"])
    p.add_argument("--scale", default="layer", choices=list(SCALE_MODES))
    p.add_argument("--decouple", default="center", choices=list(DECOUPLE_MODES))
    p.add_argument("--layers", default="param", choices=list(LAYER_MODES))
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="keep only matching names")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="leave matching names out")
    reading(p)
    p.set_defaults(run=_build)

    p = sub.add_parser("info", help="what a subspace or checkpoint file holds",
                       description="Layers, n, bits, bytes and fingerprint of a subspace; tensors, elements, "
                                   "dtypes and bytes of a checkpoint.")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--trusted", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=_info)

    p = sub.add_parser("alphas", help="α per layer by parameter name, as JSON",
                       description="The averaging weights α (one per checkpoint, per parameter) of a trained β: "
                                   "from a subspace file and an optimizer state (a file of opt.state_dict(), a "
                                   "Trainer checkpoint folder or its optimizer.pt, or a Lightning checkpoint).")
    p.add_argument("subspace")
    p.add_argument("state")
    p.set_defaults(run=_alphas)

    p = sub.add_parser("fit", help="a learned merge of Hugging Face checkpoints (TWA): fine-tunes or one run's",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="""Learn how to average Hugging Face checkpoints on data, and write the merge.

Give the data as --val FILE (what TWA-v learns on, and what the start and the greedy soup are chosen on) and
--eval FILE (what every reported loss is measured on), or as one --text FILE, dealt at random into 75 % val
and 25 % eval. The start is the best of the exact merges on the val data (each model, the uniform and the
greedy soup; with --base, task arithmetic too), whatever order the checkpoints come in. ProjectedAdamW with
its defaults then trains for --steps steps, and the average of the second half's iterates is written, like
the last checkpoint (sharded the same way, configs copied), with α per layer as twa_alphas.json. The summary
gives the last checkpoint, the best single model, the greedy soup, the uniform merge and TWA on the eval
data, with standard errors.

Checkpoints of one run trained on the text's beginning: --text-split position keeps the layout where the
first 1 − --holdout trains (TWA-t with --split train) and the rest is halved into val and eval.""")
    p.add_argument("checkpoints", nargs="+", help="Hugging Face checkpoint folders (fine-tunes in any order, or a "
                                                  "run's checkpoints oldest first)")
    p.add_argument("-o", "--output", required=True, help="a new folder for the merged model")
    p.add_argument("--text", "--data", dest="text", default=None, metavar="FILE",
                   help="one data file, split here: a UTF-8 text (causal-lm) or JSON lines (sequence-classification)")
    p.add_argument("--val", default=None, metavar="FILE", help="the data TWA-v learns on and choices are made on")
    p.add_argument("--eval", default=None, metavar="FILE", help="the data every reported loss is measured on")
    p.add_argument("--task", default="causal-lm", choices=list(TASKS),
                   help="causal-lm (AutoModelForCausalLM, a text) or sequence-classification "
                        "(AutoModelForSequenceClassification, JSON lines with 'text' and 'label')")
    p.add_argument("--init", default="best", choices=list(INITS),
                   help="the start: best (default: the best merge on the val data), greedy (the greedy soup), "
                        "center (the uniform merge of every point) or last (the last checkpoint given)")
    p.add_argument("--base", default=None, metavar="PRETRAINED",
                   help="the pretrained model the fine-tunes started from: it joins the span, so task arithmetic "
                        "and layer-wise task-vector merges lie in what TWA searches, and task arithmetic is reported")
    p.add_argument("--split", default="val", choices=list(SPLITS),
                   help="val (TWA-v, default) or train (TWA-t, on the training part of --text)")
    p.add_argument("--text-split", default="chunks", choices=list(TEXT_SPLITS),
                   help="how one --text is split: chunks (at random, default) or position (a run's training text)")
    p.add_argument("--bits", default="4", choices=[*map(str, SUPPORTED_BITS)])
    p.add_argument("--steps", type=int, default=100, help="TWA steps (default 100)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: ProjectedAdamW's)")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per window or example (default 256 for causal-lm, 512 for classification, within "
                        "the model's max_position_embeddings; more than that is refused)")
    p.add_argument("--batch", type=int, default=4, help="windows or examples per step (default 4)")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="tokens scored per evaluation, of the eval data and of the val data for the choices "
                        "(default 16384)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="--text-split position: the fraction of the text held out (default 0.1)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto (the last checkpoint's), bytes (UTF-8 bytes as ids), or a name or path")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="training dtype")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible)")
    p.add_argument("--seed", type=int, default=0, help="the random split and the batches")
    p.add_argument("--report", default=None, metavar="FILE", help="write every figure as JSON")
    reading(p)
    p.set_defaults(run=_fit)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ValueError, OSError) as err:
        print(f"twa {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
