"""``twa fit``: a learned merge of Hugging Face checkpoints (causal LMs or sequence classifiers).

1. **Data.** ``--val FILE`` is what TWA-v trains on and what the start and the baselines are chosen on;
   ``--eval FILE`` is what every reported loss is measured on. One ``--text`` (or ``--data``) file is dealt
   at random, by window (causal LM) or by example (classification), into val (75 %) and eval (25 %); with
   ``--split train`` into train and eval, TWA-t training on the train part. ``--text-split position`` keeps
   the layout for checkpoints of one run that trained on the text's beginning: the first 1 − holdout
   trains, the rest is halved into val and eval.
2. **Baselines, exact.** Every checkpoint, the uniform soup and the greedy soup (``twa.greedy_selection``,
   on the selection data) are put into the model as their exact float64 merges, rounded to the checkpoints'
   dtype, as ``twa average`` writes them. With ``--base PRETRAINED`` the base joins the span and task
   arithmetic (θ₀ + λ Σ (θ_i − θ₀), λ chosen on the selection data) is one more baseline.
3. **Start.** ``--init best`` (the default) starts at the baseline with the lowest selection loss; this does
   not depend on the order the checkpoints are given in. ``greedy``, ``center`` (the uniform merge of every
   point) and ``last`` (the last checkpoint given) are fixed choices.
4. **TWA.** The subspace of the points is built, streamed; the start is put into the model as its exact
   merge and ``ProjectedAdamW`` with its defaults moves it by P̃Δβ, on random batches of the training part
   (``CHECK_FRACTION`` of it held back), for ``steps`` steps, averaging the iterates of the second half.
   The average is written when its loss on the held-back part is below the start's by more than two standard
   errors of the paired difference; otherwise the start is written: a run never ends behind the merge it
   started from, beyond the noise of that check.
5. **Report.** Every loss on the eval part with its standard error; the summary compares TWA with the last
   checkpoint, the best single model, the greedy soup and the uniform merge, and warns when the difference
   is within the eval's noise. The model is written like the last checkpoint (sharded the same way, configs
   copied) with α per layer as ``twa_alphas.json``.
"""

from __future__ import annotations

import json
import math
import os

import torch
from tqdm.auto import tqdm

from ..baselines import average_tensor, lawa_weights, open_matching
from ..hf_output import check_new_output, hf_weights_file, write_model
from ..optim import ProjectedAdamW
from ..start import greedy_by_loss, soup_candidates, subset_weights
from ..subspace import ALPHAS_FILE, Subspace
from .measure import Phases, timed_step
from .tasks import TASKS, CausalLM, Evaluation, make_task, split_items, split_text, windows_of

SPLITS = ("val", "train")
INITS = ("best", "greedy", "center", "last")
TEXT_SPLITS = ("chunks", "position")
EVAL_FRACTION = 0.25  # of one --text file, dealt at random to the eval part
CHECK_FRACTION = 0.2  # of the data TWA trains on, held back to check its end point against its start
TASK_ARITHMETIC_SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # λ = scale / N: scale 1 is the uniform soup


def _copy_into(model, tensor, keys) -> None:
    """Set every floating-point tensor of ``model``'s state that the checkpoints hold (``keys``) to
    ``tensor(key)``."""
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            if value.is_floating_point() and key in keys:
                value.copy_(tensor(key))


def _round_to(model, dtypes: dict) -> None:
    """Round the weights to the dtype each is stored in, so what is measured is what is written."""
    with torch.no_grad():
        for key, value in model.state_dict(keep_vars=True).items():
            dt = dtypes.get(key)
            if value.is_floating_point() and dt is not None and dt != value.dtype:
                value.copy_(value.to(dt))


def _cap(task, items: list, max_tokens: int) -> list:
    """The first items whose tokens add up to at most ``max_tokens`` (at least one item)."""
    out, total = [], 0
    for item in items:
        size = task.tokens([item])
        if out and total + size > max_tokens:
            break
        out.append(item)
        total += size
    return out


def read_parts(task, *, text, val, eval_file, split, text_split, holdout, seed) -> dict[str, list]:
    """The items of each part: the one TWA trains on (``split``) and "eval"."""
    if text is not None and (val is not None or eval_file is not None):
        raise ValueError("give either --text/--data (split here) or --val and --eval, not both")
    if text is None:
        if val is None or eval_file is None:
            raise ValueError("give the data: --text FILE (or --data FILE), or --val FILE and --eval FILE")
        if split != "val":
            raise ValueError("--split train learns on a training text: give it with --text (it is split here)")
        return {"val": task.read(val), "eval": task.read(eval_file)}
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"--text-split must be one of {TEXT_SPLITS}, got {text_split!r}")
    if text_split == "position":
        if not isinstance(task, CausalLM):
            raise ValueError("--text-split position is for a causal LM's text")
        parts = split_text(task.ids(text), holdout)
        return {name: windows_of(parts[name], task.context) for name in ({split, "val", "eval"})}
    return split_items(task.read(text), {split: 1.0 - EVAL_FRACTION, "eval": EVAL_FRACTION}, seed)


def clearly_below(new: Evaluation, old: Evaluation) -> bool:
    """Whether ``new``'s loss is below ``old``'s on the same items by more than two standard errors of the
    paired difference (never on a single item, whose difference has no standard error)."""
    gain, se = new.difference(old)
    return bool(math.isfinite(se) and gain + 2 * se < 0)


def hold_back_check(parts: dict, split: str, seed: int) -> dict:
    """Add the "check" part: the data the end point is checked on against the start, which neither TWA nor
    the start's choice sees. TWA-t on a text split by position checks on its val part; otherwise a random
    ``CHECK_FRACTION`` of the training part is held back."""
    if split == "train" and "val" in parts:
        return dict(parts, check=parts.pop("val"))
    dealt = split_items(parts[split], {split: 1.0 - CHECK_FRACTION, "check": CHECK_FRACTION}, seed + 1)
    return dict(parts, **dealt)


class Merges:
    """The points' exact merges (float64, streamed from the sources), put into the model and scored."""

    def __init__(self, model, sources, stored, task, batch):
        self.model, self.sources, self.stored, self.task, self.batch = model, sources, stored, task, batch
        self.evaluations = 0

    def put(self, alpha) -> None:
        used = [(s, w) for s, w in zip(self.sources, alpha) if w]
        _copy_into(self.model, lambda k: average_tensor([s for s, _ in used], [w for _, w in used], k), self.stored)

    def evaluate(self, alpha, items):
        self.put(alpha)
        self.evaluations += 1
        return self.task.evaluate(self.model, items, self.batch)

    @classmethod
    def open(cls, points, task, batch, dtype, trusted):
        """The points' sources, and the model they are merged into: loaded like the last point, in eval mode
        (TWA trains β, not dropout's noise; a merge is judged as it will be used)."""
        sources = open_matching(points, trusted=trusted)
        stored = {k: sources[-1].dtype(k) for k in sources[-1].keys()}
        model = task.load_model(points[-1], dtype)
        model.eval()
        return cls(model, sources, stored, task, batch)


def _check_inputs(checkpoints, base, output, split, init, steps, task) -> None:
    if len(checkpoints) < 2:
        raise ValueError(f"a learned merge needs at least two checkpoints, got {len(checkpoints)}")
    for c in checkpoints + ([base] if base else []):
        if hf_weights_file(c) is None:
            raise ValueError(f"{c} is not a Hugging Face checkpoint folder (no model.safetensors or index)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_new_output(os.fspath(output), folder=True, what="merged model")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def fit(checkpoints, output, *, task="causal-lm", text=None, val=None, eval_file=None, split="val",
        text_split="chunks", base=None, init="best", bits=4, steps=100, lr=None, context=None, batch=4,
        eval_tokens=16384, holdout=0.1, tokenizer="auto", seed=0, dtype=torch.float32, device=None,
        progress=None, trusted=False) -> dict:
    """Learn the merge of ``checkpoints`` (Hugging Face folders) on the data and write it to the new
    folder ``output``; returns the report (see the module doc)."""
    checkpoints = [os.fspath(c) for c in checkpoints]
    base = None if base is None else os.fspath(base)
    _check_inputs(checkpoints, base, output, split, init, steps, task)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    last = checkpoints[-1]
    job = make_task(task, context, tokenizer, last, device)
    parts = read_parts(job, text=text, val=val, eval_file=eval_file, split=split, text_split=text_split,
                       holdout=holdout, seed=seed)
    parts = hold_back_check(parts, split, seed)
    train_items, eval_items = parts[split], _cap(job, parts["eval"], eval_tokens)
    check_items = _cap(job, parts["check"], eval_tokens)
    if len(train_items) < batch:
        raise ValueError(f"the {split} data holds {len(train_items)} {job.unit}s, fewer than one batch of {batch}: give "
                         f"more data, a smaller --batch" + (" or a shorter --context" if job.unit == "window" else ""))
    if not eval_items:
        raise ValueError(f"the eval data holds no {job.unit} of {job.context + 1} tokens: give more data"
                         + (" or a shorter --context" if job.unit == "window" else ""))
    select_items = _cap(job, train_items, eval_tokens)
    points = ([base] if base else []) + checkpoints
    models = list(range(1 if base else 0, len(points)))  # the points that are fine-tunes, not the base
    phases = Phases()
    n = len(points)

    with phases("load"):
        merges = Merges.open(points, job, batch, dtype, trusted)
        model, sources, stored = merges.model, merges.sources, merges.stored
        params = sum(p.numel() for p in model.parameters())
    with phases("select"):
        bar = tqdm(desc="scoring the merges", unit="merge", disable=None if progress is None else not progress)

        def select_loss(alpha) -> float:
            bar.update(1)
            return merges.evaluate(alpha, select_items).mean

        losses, alphas, kept = soup_candidates(n, select_loss, among=models)
        if base:
            scores = {s: select_loss([1.0 - s] + [s / len(models)] * len(models)) for s in TASK_ARITHMETIC_SCALES}
            s = min(scores, key=lambda k: scores[k])
            name = f"task arithmetic (λ = {s / len(models):.3g})"
            losses[name], alphas[name] = scores[s], [1.0 - s] + [s / len(models)] * len(models)
        bar.close()
    singles = {k: v for k, v in losses.items() if k.startswith("model ")}
    best_single = min(singles, key=lambda k: singles[k])
    greedy = next((k for k in losses if k.startswith("greedy soup")), best_single)
    chosen = {"best": min(losses, key=lambda k: losses[k]), "greedy": greedy, "center": None, "last": None}[init]
    start_alpha = alphas[chosen] if chosen else lawa_weights(n, 1) if init == "last" else None
    start_name = chosen or {"center": "the uniform merge of every point", "last": "the last checkpoint"}[init]

    evaluations = {"last": merges.evaluate(lawa_weights(n, 1), eval_items),
                   "best single": merges.evaluate(alphas[best_single], eval_items),
                   "uniform": merges.evaluate(alphas["uniform"], eval_items)}
    if greedy != best_single:
        evaluations["greedy soup"] = merges.evaluate(alphas[greedy], eval_items)
    else:
        evaluations["greedy soup"] = evaluations["best single"]
    arithmetic = next((k for k in losses if k.startswith("task arithmetic")), None)
    if arithmetic:
        evaluations["task arithmetic"] = merges.evaluate(alphas[arithmetic], eval_items)
    with phases("build"):
        space = Subspace.from_checkpoints(model, points, bits=bits, progress=progress, trusted=trusted)
        # The start is the exact merge (as twa average writes it), and TWA moves it by P̃Δβ from there: the
        # 4-bit P̃ would place it only approximately
        start_alpha = [1.0 / n] * n if start_alpha is None else list(start_alpha)
        merges.put(start_alpha)
        opt = ProjectedAdamW(model.parameters(), space, init="keep", average_after=steps // 2,
                             **({} if lr is None else {"lr": lr}))
        opt.anchor(start_alpha)
    evaluations["start"] = job.evaluate(model, eval_items, batch)
    check_start = job.evaluate(model, check_items, batch)
    gen = torch.Generator().manual_seed(seed)
    log = []
    with phases("train"):
        bar = tqdm(range(steps), desc=f"TWA-{'v' if split == 'val' else 't'}", unit="step",
                   disable=None if progress is None else not progress)
        for _ in bar:
            picks = torch.randint(0, len(train_items), (batch,), generator=gen).tolist()
            rows = job.collate([train_items[i] for i in picks])
            log.append(timed_step(lambda: job.loss(model, rows), opt, device))
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
        opt.swap_average()
    _round_to(model, stored)
    evaluations["twa"] = job.evaluate(model, eval_items, batch)
    check_twa = job.evaluate(model, check_items, batch)
    # Never behind the start: TWA's end point is written only where it is below its start on the held-back
    # check data by more than two standard errors of the paired difference (the noise the summary warns of);
    # otherwise the start, itself the best merge on the val data, is
    kept_twa = clearly_below(check_twa, check_start)
    gain, gain_se = check_twa.difference(check_start)
    check = {"start": check_start.mean, "twa": check_twa.mean, "difference": gain, "se": gain_se}
    alphas_out = opt.named_alphas()
    if not kept_twa:
        merges.put(start_alpha)
        evaluations["written"] = evaluations["start"]
        alphas_out = {name: list(map(float, start_alpha)) for name in space.names}
    else:
        evaluations["written"] = evaluations["twa"]
    with phases("write"):
        state = model.state_dict()
        write_model(output, list(stored), lambda k: state[k].detach().to("cpu", stored[k]) if k in state
                    else sources[-1].tensor(k), like=last, desc="writing", progress=progress)
        with open(os.path.join(output, ALPHAS_FILE), "w") as f:
            json.dump(alphas_out, f, indent=1)
    # the merges a user could take instead; on a tie the first named (the greedy soup, when it kept one model,
    # is that model)
    compared = [k for k in ("greedy soup", "best single", "task arithmetic", "uniform", "last") if k in evaluations]
    rival = min(compared, key=lambda k: evaluations[k].mean)
    gain, gain_se = evaluations["written"].difference(evaluations[rival])
    return {"task": job.name, "checkpoints": checkpoints, "base": base, "output": os.fspath(output), "params": params,
            "n": len(checkpoints), "points": n, "bits": bits, "split": split, "init": init, "start": start_name,
            "twa_steps": len(log), "average_after": opt.average_after, "lr": opt.param_groups[0]["lr"],
            "backend": opt.backend, "context": job.context, "batch": batch, "device": str(device),
            "dtype": str(dtype).replace("torch.", ""), "text_split": None if text is None else text_split,
            "items": {k: len(v) for k, v in parts.items()}, "unit": job.unit,
            "tokens": {k: job.tokens(v) for k, v in parts.items()},
            "eval_items": len(eval_items), "eval_tokens": job.tokens(eval_items), "check_items": len(check_items),
            "check_loss": check, "wrote": "twa" if kept_twa else "start",
            "eval_windows": len(eval_items), "select_items": len(select_items),
            "selection_loss": losses, "greedy_members": list(kept),
            "best_single": best_single, "greedy": greedy, "task_arithmetic": arithmetic,
            "selection_evaluations": merges.evaluations,
            "eval": {k: v.as_dict() for k, v in evaluations.items()},
            "eval_loss": {k: v.mean for k, v in evaluations.items()},
            "versus": {"rival": rival, "difference": gain, "se": gain_se,
                       "within_noise": bool(abs(gain) < 2 * gain_se) if math.isfinite(gain_se) else True},
            "subspace_bytes": space.nbytes, "phases": phases.record, "steps": log}


def fit_causal_lm(checkpoints, text_path, output, **kwargs) -> dict:
    """:func:`fit` for causal-LM checkpoints and one text file (the earlier entry point)."""
    return fit(checkpoints, output, task="causal-lm", text=text_path, **kwargs)


def summary(report: dict) -> str:
    e = report["eval"]
    mode = "TWA-v" if report["split"] == "val" else "TWA-t"
    acc = "accuracy" in e["twa"]

    def show(key, label):
        s = f"{label} {e[key]['loss']:.4f}"
        return s + (f" ({100 * e[key]['accuracy']:.1f} %)" if acc else "")

    parts = [show("last", "last"), show("best single", f"best single ({report['best_single']})"),
             show("greedy soup", report["greedy"] if report["greedy"].startswith("greedy") else "greedy soup (1 kept)"),
             show("uniform", "uniform")]
    if "task arithmetic" in e:
        parts.append(show("task arithmetic", report["task_arithmetic"]))
    v = report["versus"]
    verdict = "better" if v["difference"] < 0 else "worse" if v["difference"] > 0 else "no different"
    noise = " (within the eval's noise: give more eval data to tell them apart)" if v["within_noise"] else ""
    c = report["check_loss"]
    held = f"{c['difference']:+.4f} ± {c['se']:.4f} on {report['check_items']} held-back {report['unit']}s"
    wrote = (f"wrote TWA's end point (below its start by more than two standard errors: {held})"
             if report["wrote"] == "twa" else
             f"wrote the start, {report['start']} (TWA's end point was not below it by two standard errors: {held})")
    return (f"eval loss on {report['eval_items']} held-out {report['unit']}s ({report['eval_tokens']:,} tokens): "
            + " · ".join(parts) + f" · TWA {e['start']['loss']:.4f} → {show('twa', '').strip()} ± {e['twa']['se']:.4f} "
            f"({mode} from {report['start']}, {report['twa_steps']} steps, {report['bits']}-bit, n={report['n']}, "
            f"kernels: {report['backend']}); {wrote}: {verdict} than the {v['rival']} by {abs(v['difference']):.4f} ± "
            f"{v['se']:.4f} nats{noise}; in {report['output']}")


def greedy(checkpoints, val, *, task="causal-lm", context=None, tokenizer="auto", batch=4, eval_tokens=16384,
           dtype=torch.float32, device=None, progress=None, trusted=False) -> dict:
    """Greedy soup of Hugging Face ``checkpoints`` chosen on the file ``val`` (:func:`twa_kernels.greedy_selection`,
    the rule of :func:`twa_kernels.baselines.greedy_soup`): {"kept": indices, "weights": α, "losses": each
    model's, "soup_loss": the soup's, "items": how many items of ``val`` were scored}."""
    checkpoints = [os.fspath(c) for c in checkpoints]
    for c in checkpoints:
        if hf_weights_file(c) is None:
            raise ValueError(f"{c} is not a Hugging Face checkpoint folder (no model.safetensors or index): the "
                             "greedy soup scores each model on --val, so it needs folders from_pretrained loads")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    job = make_task(task, context, tokenizer, checkpoints[-1], device)
    items = _cap(job, job.read(val), eval_tokens)
    if not items:
        raise ValueError(f"{val} holds no {job.unit} to score the models on" + (
            f" (a window is {job.context + 1} tokens: give more text or a shorter --context)" if job.unit == "window"
            else ""))
    merges = Merges.open(checkpoints, job, batch, dtype, trusted)
    n = len(checkpoints)
    bar = tqdm(desc="greedy soup", unit="merge", disable=None if progress is None else not progress)

    def loss_at(alpha):
        bar.update(1)
        return merges.evaluate(alpha, items).mean

    losses, kept, soup_loss = greedy_by_loss(n, loss_at)
    bar.close()
    return {"kept": list(kept), "weights": subset_weights(n, kept), "losses": losses, "soup_loss": soup_loss,
            "items": len(items), "unit": job.unit}
