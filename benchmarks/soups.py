"""Soups of fine-tuned models, the paper's second scenario: TWA-v against the best model, greedy soup, the
learned soup and Model Stock, on the same fine-tunes, at several N.

    python -m benchmarks.soups            # 3 seeds, about an hour on 2 CPU cores (the pretrained models are cached)
    python -m benchmarks.soups --quick    # a smoke test in a few minutes (a test runs it)

Task: a character-level causal transformer pretrained on Python source code (the standard library that
ships with this Python) and fine-tuned on English technical prose (``pydoc_data.topics``). The prose is cut
into chunks of ``chunk`` characters, drawn at random (a fixed draw) into train (80 %), validation (10 %)
and test (10 %). Metric: test bits per character (bpc), lower is better.

Per seed (a seed is its own pretraining run and its own search; every other setting is fixed below):

1. pretraining on code (cached under ``$XDG_CACHE_HOME/twa_kernels/soups``);
2. N fine-tunes from it, a random search as model soups did: learning rate, weight decay, steps, label
   smoothing, dropout and data order;
3. for N′ ∈ {N/4, N/2, N} (the first N′ of the search): the best and second-best single model (by
   validation), the uniform soup, greedy soup (models join on ≥, see ``twa.greedy_selection``), the learned
   soup by layer, Model Stock, and TWA-v (4 bits) by the benchmarks' recipe (the start chosen by
   ``twa.best_start`` among the uniform soup, each model and the greedy soup, on the validation split;
   ``ProjectedAdamW`` defaults; the average of the second half's iterates), for ``twa_epochs`` passes over
   the validation split;
4. at N: TWA-t (the same recipe on the training split), TWA-v in fp32 and from the greedy soup's weights,
   and TWA-v at 1, 2 and 8 bits (the paper's 5.3.6);
5. Table 11's setting: the 10 checkpoints of one fine-tuning run with a linear decay, ordered: best
   single, uniform, greedy soup, TWA-t and TWA-v.

Every method records its training steps (forward + backward), its evaluation passes over the validation
split, its wall time, and what it holds in memory beyond one model.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import statistics
import string
import time

import torch
from torch import nn
from tqdm.auto import tqdm

import twa_kernels as twa
from twa_kernels.start import subset_weights
from benchmarks import soup_methods
from benchmarks.common import environment, markdown_table, save
from benchmarks.quality import mean_std
from benchmarks.quality_text import CharTransformer, bits_per_char, corpus_text, windows
from benchmarks.recipe import TWARun

FULL = dict(context=64, width=128, layers=2, heads=4, batch=32, pretrain_steps=1000, code_chars=800_000,
            text_chars=None, chunk=1024, finetunes=16, seeds=3, twa_epochs=5, table11_steps=300)
QUICK = dict(context=32, width=32, layers=1, heads=2, batch=16, pretrain_steps=100, code_chars=40_000,
             text_chars=30_000, chunk=256, finetunes=8, seeds=1, twa_epochs=1, table11_steps=40)
PRETRAIN_LR, WARMUP = 3e-3, 0.05
SEARCH = {"lr": (1e-4, 3e-3), "weight_decay": (1e-4, 0.3), "steps": (0.25, 1.0), "label_smoothing": (0.0, 0.2),
          "dropout": (0.0, 0.1, 0.2)}  # steps: fractions of one epoch of the fine-tuning split
TABLE11_LR, TABLE11_CHECKPOINTS = 1e-3, 10
SPLIT_SEED = 1234
UNKNOWN = "\x00"


# ---------------------------------------------------------------------------------------------- data
def code_text(limit: int) -> str:
    """This Python's standard library modules (top level, sorted by name), joined."""
    import os as os_module

    files = sorted(glob.glob(os.path.join(os.path.dirname(os_module.__file__), "*.py")))
    out, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            out.append(f.read())
        size += len(out[-1])
        if size >= limit:
            break
    return "".join(out)[:limit]


def encode(text: str, index: dict) -> torch.Tensor:
    unknown = index[UNKNOWN]
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.long)


def datasets(cfg):
    """The code corpus, the prose split by random chunks, the vocabulary (printable ASCII and one symbol for
    everything else), and the record of both."""
    vocab = [UNKNOWN] + sorted(set(string.printable))
    index = {c: i for i, c in enumerate(vocab)}
    code = code_text(cfg["code_chars"])
    prose = corpus_text()
    if cfg["text_chars"] is not None:
        prose = prose[: cfg["text_chars"]]
    ids = encode(prose, index)
    chunks = list(torch.split(ids, cfg["chunk"]))
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    a, b = int(0.8 * len(order)), int(0.9 * len(order))
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    split = {k: torch.cat([chunks[i] for i in sorted(v)]) for k, v in parts.items()}
    record = {"code": f"{len(code):,} characters of this Python's standard library (top-level modules, by name)",
              "prose": f"pydoc_data.topics, {len(prose):,} characters, chunks of {cfg['chunk']}, random split "
                       f"(seed {SPLIT_SEED})", "sizes": {k: len(v) for k, v in split.items()},
              "chunks": {k: len(v) for k, v in parts.items()}}
    return encode(code, index), split, len(vocab), record


# ---------------------------------------------------------------------------------------------- training
def make_model(cfg, vocab, dropout=0.0):
    return CharTransformer(vocab, cfg["context"], cfg["width"], cfg["layers"], cfg["heads"], dropout=dropout)


def stream(ids, cfg, seed):
    """Batches of ``ids``, epoch after epoch of fresh orders."""
    epoch = 0
    while True:
        yield from windows(ids, cfg["context"], cfg["batch"], seed * 1000 + epoch)
        epoch += 1


def epoch_steps(ids, cfg) -> int:
    return max(1, (len(ids) // cfg["context"] - 1) // cfg["batch"])


def train(model, ids, cfg, steps, lr, seed, weight_decay=0.01, label_smoothing=0.0, schedule="cosine",
          on_step=None):
    """AdamW with a warm-up and a cosine (or linear) decay to zero over ``steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(WARMUP * steps))

    def factor(k):
        frac = min(k, steps) / steps
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
        return min(1.0, (k + 1) / warm) * decay

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    batches = stream(ids, cfg, seed)
    for k in range(1, steps + 1):
        xb, yb = next(batches)
        opt.zero_grad()
        logits = model(xb)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                    label_smoothing=label_smoothing).backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(k, model)
    model.eval()
    return model


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "twa_kernels", "soups")


def pretrained(code, cfg, vocab, seed) -> dict:
    """The seed's model pretrained on code, from the cache when this configuration ran before."""
    key = json.dumps({k: cfg[k] for k in ("context", "width", "layers", "heads", "batch", "pretrain_steps",
                                          "code_chars")} | {"seed": seed, "vocab": vocab, "lr": PRETRAIN_LR},
                     sort_keys=True)
    path = os.path.join(cache_dir(), f"pretrained_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors")
    if os.path.exists(path):
        from safetensors.torch import load_file

        return load_file(path)
    torch.manual_seed(seed)
    model = train(make_model(cfg, vocab), code, cfg, cfg["pretrain_steps"], PRETRAIN_LR, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(cache_dir(), exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return state


def search(cfg, seed) -> list[dict]:
    """The random hyper-parameter search: one setting per fine-tune (fixed by the seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(cfg["finetunes"]):
        lo, hi = SEARCH["lr"]
        wlo, whi = SEARCH["weight_decay"]
        out.append({"lr": math.exp(rng.uniform(math.log(lo), math.log(hi))),
                    "weight_decay": math.exp(rng.uniform(math.log(wlo), math.log(whi))),
                    "epochs": rng.uniform(*SEARCH["steps"]), "label_smoothing": rng.uniform(*SEARCH["label_smoothing"]),
                    "dropout": rng.choice(SEARCH["dropout"]), "data_seed": seed * 100 + i + 1})
    return out


# ---------------------------------------------------------------------------------------------- methods
class Seed:
    """One seed: its pretrained model, fine-tunes, and the evaluation every method shares."""

    def __init__(self, code, split, vocab, cfg, seed):
        self.split, self.vocab, self.cfg, self.seed = split, vocab, cfg, seed
        self.base = pretrained(code, cfg, vocab, seed)
        self.val_epoch = epoch_steps(split["val"], cfg)
        self.val_evals = 0

    def model(self, state=None):
        m = make_model(self.cfg, self.vocab)
        m.load_state_dict(self.base if state is None else state)
        m.eval()
        return m

    def val_bpc(self, model) -> float:
        self.val_evals += 1
        return bits_per_char(model, self.split["val"], self.cfg["context"])

    def scores(self, state_or_model) -> dict:
        m = state_or_model if isinstance(state_or_model, nn.Module) else self.model(state_or_model)
        c = self.cfg["context"]
        return {"val": bits_per_char(m, self.split["val"], c), "test": bits_per_char(m, self.split["test"], c)}

    def finetune(self, setting) -> dict:
        steps = max(1, round(setting["epochs"] * epoch_steps(self.split["train"], self.cfg)))
        model = make_model(self.cfg, self.vocab, dropout=setting["dropout"])
        model.load_state_dict(self.base)
        train(model, self.split["train"], self.cfg, steps, setting["lr"], setting["data_seed"],
              setting["weight_decay"], setting["label_smoothing"])
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def twa(self, states, split, bits=4, init=None, ordered=False) -> tuple[nn.Module, dict]:
        """TWA by the benchmarks' recipe on ``split`` for ``twa_epochs`` passes over the validation split's
        length; ``init``: a fixed start (α) instead of the recipe's search."""
        model = self.model(states[-1])
        space = twa.Subspace.from_checkpoints(model, states, bits=bits, progress=False)
        steps = self.cfg["twa_epochs"] * self.val_epoch
        ids = self.split[split] if split == "val" else self.split["train"]
        judge = self.split["val"] if split == "val" else self.split["train"][-len(self.split["val"]):]
        run = TWARun(model, space, steps, lambda m: bits_per_char(m, judge, self.cfg["context"]), ordered=ordered,
                     init=init)
        model.train()
        batches = stream(ids, self.cfg, self.seed + 77)
        for _ in range(steps):
            xb, yb = next(batches)
            run.zero_grad()
            logits = model(xb)
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1)).backward()
            run.step()
        run.finish()
        model.eval()
        record = dict(run.record(), train_steps=steps, state_bytes=space.nbytes + 4 * space.numel)
        return model, record


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def greedy_members(run: Seed, states, val_scores) -> list[int]:
    """The models greedy soup keeps (:func:`twa_kernels.greedy_selection`), each soup scored by validation bpc."""
    kept, _ = twa.greedy_selection([-v for v in val_scores],
                                   lambda idx: -run.val_bpc(run.model(soup_methods.uniform([states[i] for i in idx]))))
    return kept


def soups_at(run: Seed, states, val_scores, full: bool) -> dict:
    """Every method over ``states`` (fine-tunes in search order) with their validation bpc ``val_scores``."""
    n = len(states)
    out = {}

    def record(name, model_or_state, seconds, **cost):
        out[name] = dict(run.scores(model_or_state), seconds=seconds, **cost)

    ranked = sorted(range(n), key=lambda i: val_scores[i])
    record("best single (by val)", states[ranked[0]], 0.0, evals=n, train_steps=0, state_bytes=0)
    record("second-best single (by val)", states[ranked[1]], 0.0, evals=n, train_steps=0, state_bytes=0)
    soup, seconds = timed(lambda: soup_methods.uniform(states))
    record("uniform soup", soup, seconds, evals=0, train_steps=0, state_bytes=0)
    evals0 = run.val_evals
    kept, seconds = timed(lambda: greedy_members(run, states, val_scores))
    record("greedy soup", soup_methods.uniform([states[i] for i in kept]), seconds,
           evals=n + run.val_evals - evals0, train_steps=0, state_bytes=0, kept=sorted(kept))
    merged, seconds = timed(lambda: soup_methods.model_stock(run.base, states))
    record("Model Stock", merged, seconds, evals=0, train_steps=0, state_bytes=0)
    steps = run.cfg["twa_epochs"] * run.val_epoch
    batches = (b for _, b in zip(range(steps), stream(run.split["val"], run.cfg, run.seed + 77)))
    template = run.model()
    (learned, rec), seconds = timed(lambda: soup_methods.learned_soup_by_layer(
        template, states, batches, lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                               y.reshape(-1)), template.head))
    record("learned soup by layer", learned, seconds, evals=0, **rec)
    (model, rec), seconds = timed(lambda: run.twa(states, "val"))
    record("TWA-v", model, seconds, evals=rec.pop("start_evaluations", 0), **rec)
    if full:
        greedy_alpha = subset_weights(n, kept)
        for name, kwargs in (("TWA-t", dict(split="train")), ("TWA-v, fp32", dict(split="val", bits=None)),
                             ("TWA-v from the greedy soup", dict(split="val", init=greedy_alpha)),
                             *((f"TWA-v, {b} bit{'s' if b > 1 else ''}", dict(split="val", bits=b)) for b in (1, 2, 8))):
            (model, rec), seconds = timed(lambda: run.twa(states, **kwargs))
            record(name, model, seconds, evals=rec.pop("start_evaluations", 0), **rec)
    return out


def table11(run: Seed) -> dict:
    """The 10 checkpoints of one fine-tuning run with a linear decay (ordered)."""
    steps = run.cfg["table11_steps"]
    every = steps // TABLE11_CHECKPOINTS
    ckpts = []
    model = make_model(run.cfg, run.vocab)
    model.load_state_dict(run.base)
    train(model, run.split["train"], run.cfg, steps, TABLE11_LR, run.seed + 500, schedule="linear",
          on_step=lambda k, m: ckpts.append({n: v.detach().clone() for n, v in m.state_dict().items()})
          if k % every == 0 and len(ckpts) < TABLE11_CHECKPOINTS else None)
    vals = [run.val_bpc(run.model(s)) for s in ckpts]
    out = {"best single (by val)": run.scores(ckpts[min(range(len(ckpts)), key=lambda i: vals[i])]),
           "last checkpoint": run.scores(ckpts[-1]), "uniform soup": run.scores(soup_methods.uniform(ckpts))}
    kept = greedy_members(run, ckpts, vals)
    out["greedy soup"] = dict(run.scores(soup_methods.uniform([ckpts[i] for i in kept])), kept=sorted(kept))
    for name, split in (("TWA-t", "train"), ("TWA-v", "val")):
        model, rec = run.twa(ckpts, split, ordered=True)
        out[name] = dict(run.scores(model), start=rec.get("start"))
    return out


# ---------------------------------------------------------------------------------------------- report
METHODS_AT_EVERY_N = ("best single (by val)", "second-best single (by val)", "uniform soup", "greedy soup", "Model Stock",
                      "learned soup by layer", "TWA-v")


def table(per_seed, columns=("val", "test")) -> str:
    rows = []
    for k in per_seed[0]:
        row = [k, *(mean_std([s[k][c] for s in per_seed], 3) for c in columns)]
        if "seconds" in per_seed[0][k]:
            row += [f"{statistics.mean(s[k]['seconds'] for s in per_seed):.1f}",
                    f"{statistics.mean(s[k].get('train_steps', 0) for s in per_seed):.0f}",
                    f"{statistics.mean(s[k].get('evals', 0) for s in per_seed):.0f}",
                    f"{statistics.mean(s[k].get('state_bytes', 0) for s in per_seed) / 2**20:.1f}"]
        rows.append(row)
    header = ["method", "validation bpc", "test bpc"]
    if "seconds" in per_seed[0][next(iter(per_seed[0]))]:
        header += ["wall s", "train steps", "val evaluations", "held beyond one model (MiB)"]
    return markdown_table(header, rows)


def by_n_table(results, sizes) -> str:
    rows = [[m, *(mean_std([s[m]["test"] for s in results[n]], 3) for n in sizes)] for m in METHODS_AT_EVERY_N]
    return markdown_table(["method (test bpc)", *(f"N = {n}" for n in sizes)], rows)


def targets(results, sizes) -> list[str]:
    """TWA-v against greedy soup (test) at every N ≥ 8, per seed; and fewer models against greedy soup over all."""
    lines = []
    big = max(sizes)
    for n in sizes:
        for seed, s in enumerate(results[n]):
            d = s["TWA-v"]["test"] - s["greedy soup"]["test"]
            goal = " (target: ≤ 0)" if n >= 8 else ""
            lines.append(f"N = {n}, seed {seed}: TWA-v {s['TWA-v']['test']:.4f} vs greedy soup {s['greedy soup']['test']:.4f} "
                         f"({len(s['greedy soup']['kept'])} kept): {d:+.4f}{goal}"
                         + (f" {'met' if d <= 0 else 'NOT met'}" if n >= 8 else ""))
    for n in sizes[:-1]:
        diffs = [a["TWA-v"]["test"] - b["greedy soup"]["test"] for a, b in zip(results[n], results[big])]
        lines.append(f"TWA-v with N = {n} minus greedy soup with N = {big} ({big // n}× fewer models): "
                     + ", ".join(f"{d:+.4f}" for d in diffs) + f" (mean {statistics.mean(diffs):+.4f})")
    return lines


def memory_projection(parameters: int, n: int) -> str:
    rows = []
    for label, count in ((f"this model ({parameters:,} weights), N = {n}", parameters), ("100M weights, N = 72", 10**8),
                         ("1B weights, N = 72", 10**9)):
        k = n if count == parameters else 72
        held = soup_methods.projected_state_bytes(count, k)
        rows.append([label, *(f"{v / 2**30:.2f}" for v in held.values())])
    return markdown_table(["model and N", "learned soup by layer: N fp32 models (GiB)", "TWA: 4-bit P̃ + centre (GiB)"],
                          rows)


def plot(results, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in METHODS_AT_EVERY_N:
        ys = [[s[m]["test"] for s in results[n]] for n in sizes]
        ax.errorbar(sizes, [statistics.mean(y) for y in ys], yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                    marker="o", capsize=3, label=m, linestyle="-" if m.startswith("TWA") else "--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("number of fine-tunes N")
    ax.set_ylabel("test bits per character")
    ax.set_title("Soups of fine-tunes (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    from benchmarks.quality_text import text_benchmark

    args, cfg, device, _, _, _ = text_benchmark(argv, __doc__, FULL, QUICK)
    code, split, vocab, data_record = datasets(cfg)
    N = cfg["finetunes"]
    sizes = (N // 4, N // 2, N)
    results = {n: [] for n in sizes}
    t11, searches, singles, seconds = [], [], [], []
    for seed in tqdm(range(cfg["seeds"]), desc="soups", unit="seed"):
        t0 = time.perf_counter()
        run = Seed(code, split, vocab, cfg, seed)
        settings = search(cfg, seed)
        states = [run.finetune(s) for s in tqdm(settings, desc="fine-tunes", unit="model", leave=False)]
        vals = [run.val_bpc(run.model(s)) for s in states]
        singles.append([run.scores(s) for s in states])
        searches.append(settings)
        for n in sizes:
            results[n].append(soups_at(run, states[:n], vals[:n], full=n == N))
        t11.append(table11(run))
        seconds.append(time.perf_counter() - t0)
    env = environment(device)
    parameters = sum(p.numel() for p in make_model(cfg, vocab).parameters())
    goals = targets(results, sizes)
    md = (f"Soups of fine-tunes: a char transformer ({parameters:,} weights; width {cfg['width']}, {cfg['layers']} "
          f"layers, context {cfg['context']}) pretrained on Python code ({cfg['pretrain_steps']} steps), fine-tuned "
          f"{N} ways on English prose ({cfg['seeds']} seed(s); {'quick smoke test, not a measurement; ' if args.quick else ''}"
          f"{env['device']}; torch {env['torch']}; commit {str(env['commit'])[:10]}; {env['date']}; "
          f"{statistics.mean(seconds) / 60:.1f} min per seed)\n\n"
          f"Data: {data_record['prose']}; sizes {data_record['sizes']}. Search: lr log-uniform {SEARCH['lr']}, weight "
          f"decay log-uniform {SEARCH['weight_decay']}, {SEARCH['steps'][0]}–{SEARCH['steps'][1]} epochs, label "
          f"smoothing {SEARCH['label_smoothing']}, dropout from {SEARCH['dropout']}, data order. TWA: the benchmarks' "
          f"recipe, {cfg['twa_epochs']} passes over the validation split; the learned soup the same passes, "
          f"AdamW lr {soup_methods.LEARNED_SOUP_LR}.\n\n"
          f"Test bpc by N (the first N fine-tunes of the search)\n\n" + by_n_table(results, sizes)
          + "\nTargets (TWA-v ≤ greedy soup on test at N ≥ 8; fewer models against greedy soup over all):\n\n"
          + "\n".join(f"- {line}" for line in goals) + "\n\n"
          + "".join(f"At N = {n}\n\n" + table(results[n]) + "\n" for n in sizes)
          + "\nMemory that a learned merge holds beyond one model, projected\n\n" + memory_projection(parameters, N)
          + f"\nTable 11's setting: {TABLE11_CHECKPOINTS} checkpoints of one fine-tuning run ({cfg['table11_steps']} "
            f"steps, lr {TABLE11_LR}, linear decay), ordered\n\n" + table(t11) + "\n")
    print(md)
    path = save("soups" + ("_quick" if args.quick else ""), device,
                {"config": cfg, "data": data_record, "parameters": parameters, "search": searches, "singles": singles,
                 "by_n": {str(n): results[n] for n in sizes}, "table11": t11, "targets": goals,
                 "seconds_per_seed": seconds}, md, out_dir=args.out_dir)
    plot(results, sizes, path[:-5] + ".png")
    print(f"saved {path}, {path[:-5]}.png")


if __name__ == "__main__":
    main()
