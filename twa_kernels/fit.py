"""``twa fit``: a learned merge of Hugging Face causal-LM checkpoints, the step no merging CLI offers.

1. The text is tokenized (the last checkpoint's tokenizer, or its UTF-8 bytes with ``--tokenizer bytes``)
   and cut by position: the first ``1 − holdout`` is the training part; the held-out rest is split in
   two halves, the first of which TWA-v trains on (``--split val``, the default) and the second of which
   ("eval") nothing trains on, so every loss reported is on text no merge has seen.
2. The last checkpoint is loaded; its eval loss and that of the uniform merge of all checkpoints (exact,
   float64, streamed) are measured.
3. The subspace of the checkpoints is built, streamed (:meth:`Subspace.from_checkpoints`).
4. :class:`ProjectedAdamW` (its defaults, starting from the last checkpoint) trains β on random windows
   of the chosen part (``--split train``: TWA-t on the training part).
5. The weights are rounded to the checkpoints' dtype, their eval loss is measured, and the model is
   written like the last checkpoint (sharded the same way, configs copied), with α per layer as
   ``twa_alphas.json``.

``report`` (``--report FILE``) records every figure: losses, per-step losses and timings (forward,
backward, Pᵀg, Pβ, the rest of the optimizer step) and peak resident memory per phase (Linux).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .baselines import average_tensor, open_matching
from .hf_output import check_new_output, hf_weights_file, write_model
from .optim import ProjectedAdamW
from .optim.base import APPLY_EVENT, PROJECT_EVENT
from .subspace import ALPHAS_FILE, Subspace

SPLITS = ("val", "train")


# ---------------------------------------------------------------------------------------------- memory
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


# ---------------------------------------------------------------------------------------------- text
def byte_ids(text: str) -> torch.Tensor:
    """The text's UTF-8 bytes as token ids (a byte-level model's tokenization)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def tokenize(text: str, tokenizer: str, last: str) -> torch.Tensor:
    if tokenizer == "bytes":
        return byte_ids(text)
    from transformers import AutoTokenizer

    source = last if tokenizer == "auto" else tokenizer
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ValueError(f"no tokenizer could be loaded from {source} ({err.__class__.__name__}); give one with "
                         "--tokenizer NAME_OR_PATH, or --tokenizer bytes for a byte-level model") from None
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def split_text(ids: torch.Tensor, holdout: float) -> dict[str, torch.Tensor]:
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
    a = int(len(ids) * (1 - holdout))
    b = a + (len(ids) - a) // 2
    return {"train": ids[:a], "val": ids[a:b], "eval": ids[b:]}


def random_windows(ids: torch.Tensor, context: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(ids) - context, (batch,), generator=gen)
    return torch.stack([ids[s:s + context + 1] for s in starts.tolist()])


def causal_loss(model, rows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


def eval_windows(num_tokens: int, context: int, max_tokens: int) -> int:
    """How many consecutive windows of ``context`` predictions the first ``max_tokens`` tokens give."""
    return min(num_tokens - 1, max_tokens) // context


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor, context: int, batch: int, max_tokens: int, device) -> float:
    """Mean next-token loss (nats) over consecutive windows of the first ``max_tokens`` tokens of ``ids``."""
    count = eval_windows(len(ids), context, max_tokens)
    if count < 1:
        raise ValueError(f"the eval text holds {len(ids)} tokens, fewer than one window of {context + 1}")
    rows = torch.stack([ids[i * context: i * context + context + 1] for i in range(count)])
    total = 0.0
    for i in range(0, count, batch):
        chunk = rows[i:i + batch].to(device)
        total += float(causal_loss(model, chunk)) * len(chunk)
    return total / count


# ---------------------------------------------------------------------------------------------- weights
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


def load_model(path: str, dtype: torch.dtype, device):
    import transformers
    from transformers import AutoModelForCausalLM

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(path, **{key: dtype}).to(device)


# ---------------------------------------------------------------------------------------------- timing
def _projection_seconds(prof) -> dict:
    """Seconds spent in the optimizer's Pᵀg and Pβ during a profiled step."""
    out = {}
    for evt in prof.key_averages():
        if evt.key in (PROJECT_EVENT, APPLY_EVENT):
            device_us = getattr(evt, "device_time_total", 0) or 0
            out[evt.key] = (device_us or evt.cpu_time_total) / 1e6
    return {"project_s": out.get(PROJECT_EVENT, 0.0), "apply_s": out.get(APPLY_EVENT, 0.0)}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, rows, device) -> dict:
    """One TWA step, timed phase by phase (the optimizer step under the profiler, for Pᵀg and Pβ)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    loss = causal_loss(model, rows)
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        opt.step()
        _sync(device)
    t3 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    split = _projection_seconds(prof)
    return {"loss": float(loss.detach()), "forward_s": t1 - t0, "backward_s": t2 - t1, **split,
            "rule_s": max(0.0, (t3 - t2) - split["project_s"] - split["apply_s"]), "step_s": t3 - t0}


# ---------------------------------------------------------------------------------------------- the fit
def fit_causal_lm(checkpoints, text_path, output, *, split="val", bits=4, steps=100, lr=None, context=256,
                  batch=4, eval_tokens=16384, holdout=0.1, tokenizer="auto", seed=0, dtype=torch.float32,
                  device=None, progress=None, trusted=False) -> dict:
    """Learn the merge of ``checkpoints`` (Hugging Face causal-LM folders, oldest first) on the text in
    ``text_path`` and write it to the new folder ``output``; returns the report (see the module doc)."""
    checkpoints = [os.fspath(c) for c in checkpoints]
    if len(checkpoints) < 2:
        raise ValueError(f"a learned merge needs at least two checkpoints, got {len(checkpoints)}")
    for c in checkpoints:
        if hf_weights_file(c) is None:
            raise ValueError(f"{c} is not a Hugging Face checkpoint folder (no model.safetensors or index)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_new_output(os.fspath(output), folder=True, what="merged model")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    last = checkpoints[-1]
    with open(text_path, encoding="utf-8") as f:
        parts = split_text(tokenize(f.read(), tokenizer, last), holdout)
    for name in (split, "eval"):
        if len(parts[name]) < context + 2:
            raise ValueError(f"the text's {name} part holds {len(parts[name])} tokens, fewer than one window of "
                             f"{context + 1}: give more text, a shorter --context or a larger --holdout")
    sources = open_matching(checkpoints, trusted=trusted)
    stored = {k: sources[-1].dtype(k) for k in sources[-1].keys()}
    phases = Phases()
    scores = {}
    evaluate = lambda: eval_loss(model, parts["eval"], context, batch, eval_tokens, device)  # noqa: E731

    with phases("load"):
        model = load_model(last, dtype, device)
        model.eval()  # TWA trains β, not dropout's noise; a merge is judged as it will be used
        params = sum(p.numel() for p in model.parameters())
        scores["last"] = evaluate()
        uniform = [1.0 / len(checkpoints)] * len(checkpoints)
        _copy_into(model, lambda k: average_tensor(sources, uniform, k), stored)
        scores["uniform"] = evaluate()
    with phases("build"):
        space = Subspace.from_checkpoints(model, checkpoints, bits=bits, progress=progress, trusted=trusted)
        opt = ProjectedAdamW(model.parameters(), space, **({} if lr is None else {"lr": lr}))
    scores["start"] = evaluate()
    gen = torch.Generator().manual_seed(seed)
    log = []
    with phases("train"):
        bar = tqdm(range(steps), desc=f"TWA-{'v' if split == 'val' else 't'}", unit="step",
                   disable=None if progress is None else not progress)
        for _ in bar:
            rows = random_windows(parts[split], context, batch, gen).to(device)
            log.append(train_step(model, opt, rows, device))
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
    _round_to(model, stored)
    scores["twa"] = evaluate()
    with phases("write"):
        state = model.state_dict()
        write_model(output, list(stored), lambda k: state[k].detach().to("cpu", stored[k]) if k in state
                    else sources[-1].tensor(k), like=last, desc="writing", progress=progress)
        alphas = opt.named_alphas()
        with open(os.path.join(output, ALPHAS_FILE), "w") as f:
            json.dump(alphas, f, indent=1)
    return {"checkpoints": checkpoints, "output": os.fspath(output), "params": params, "n": len(checkpoints),
            "bits": bits, "split": split, "twa_steps": len(log), "lr": opt.param_groups[0]["lr"],
            "backend": opt.backend,
            "context": context, "batch": batch, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "tokens": {k: len(v) for k, v in parts.items()},
            "eval_windows": eval_windows(len(parts["eval"]), context, eval_tokens),
            "eval_loss": scores, "subspace_bytes": space.nbytes, "phases": phases.record, "steps": log}


def summary(report: dict) -> str:
    s = report["eval_loss"]
    best = min(("last", "uniform"), key=lambda k: s[k])
    gain = s[best] - s["twa"]
    mode = "TWA-v" if report["split"] == "val" else "TWA-t"
    return (f"eval loss on {report['eval_windows']} held-out windows: last {s['last']:.4f} · uniform "
            f"{s['uniform']:.4f} · TWA {s['start']:.4f} → {s['twa']:.4f} ({mode}, {report['twa_steps']} steps, "
            f"{report['bits']}-bit, n={report['n']}, kernels: {report['backend']}; "
            f"{'better' if gain > 0 else 'worse'} than the {best} by "
            f"{abs(gain):.4f} nats = {abs(gain) / math.log(2):.4f} bits/token); wrote {report['output']}")
