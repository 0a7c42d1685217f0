"""Quality where the paper's head-stage claim can show: character-level language modelling of real
English technical text on two CPU cores.

    python -m benchmarks.quality_text            # 3 seeds, about 15 minutes on 2 CPU cores
    python -m benchmarks.quality_text --quick    # a smoke test in about a minute (CI runs it)

Data: the reference documentation topics that ship with every CPython (``pydoc_data.topics``, about
465k characters), joined in key order, split by position into train (first 80 %), validation (next
10 %) and test (last 10 %); the vocabulary is every character of the whole text. Model: a small causal
transformer (token and position embeddings, pre-LayerNorm blocks, no BatchNorm). Metric: test bits
per character (bpc), lower is better.

Protocol, every seed (all hyper-parameters fixed below in advance; the test split is only evaluated):

(a) head stage: a base run of 2E epochs with a cosine schedule, saving a checkpoint every 1/C epoch
    during its first E epochs (n = E·C); a separate run whose cosine schedule is compressed into E
    epochs (the fair "half budget" baseline); SWA, EMA and LAWA over the first-E checkpoints; TWA-t
    (training data) and TWA-v (the validation split) from the same checkpoints for a budget of B epochs,
    at 4 bits and in fp32;
(b) bits ablation of TWA-t: 1, 2, 4, 8 bits and fp32, with the paper's per-layer scale and the
    norm-preserving per-column one;
(c) soup: K short fine-tuning runs from the base run's epoch-E point (different seeds, data orders and
    learning rates): best single (by validation), uniform soup, greedy soup (by validation), TWA-v.

The plot puts test bpc against the epochs of training spent: the base run's curve, the half-budget
run at E, and the averages at E (+ B for TWA).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from torch import nn
from tqdm.auto import tqdm

import twa_kernels as twa
from benchmarks.common import announce_backends, environment, markdown_table, pick_device, save
from benchmarks.in_span import (baseline_names, describe_test_targets, in_span_baselines, plot_twa_curves,
                               describe_starts, score_rows, targets, test_targets)
from benchmarks.quality import mean_std
from benchmarks.recipe import DEFAULT_END, DEFAULT_START, TWARun, label

FULL = dict(context=64, width=128, layers=2, heads=4, batch=32, half_epochs=2, per_epoch=6, budget=0.25,
            text_chars=None, seeds=3, soup_runs=4, soup_epochs=0.25, stable_epochs=2, stable_n=10)
QUICK = dict(context=32, width=32, layers=1, heads=2, batch=16, half_epochs=1, per_epoch=4, budget=0.25,
             text_chars=40_000, seeds=1, soup_runs=2, soup_epochs=0.25, stable_epochs=1, stable_n=4)
BASE_LR, WEIGHT_DECAY, WARMUP = 3e-3, 0.01, 0.05  # AdamW; warm-up as a fraction of the run
# TWA runs by the benchmarks' recipe (benchmarks/recipe.py): the one configuration fixed before the run,
# for every regime and seed.
EMA_GAMMA, LAWA_K = 0.7, 4
CURVE_EVERY = 5  # TWA-t's train bpc is read every this many steps, for the plot
# The recipe's other starts and ends, run for TWA-t at 4 bits beside the defaults (benchmarks.recipe)
VARIANTS = (("last", "last"), ("last", "average"), ("center", "average"), ("best", "last"), ("best", "cosine"))
SOUP_LRS = (1e-3, 3e-3)


# ---------------------------------------------------------------------------------------------- data
def corpus_text() -> str:
    """The package's text: CPython's documentation topics, joined in sorted key order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def corpus(limit=None):
    """The text, its vocabulary, and the position split (recorded in the results)."""
    text = corpus_text()
    if limit is not None:
        text = text[:limit]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    a, b = int(0.8 * len(ids)), int(0.9 * len(ids))
    split = {"train": ids[:a], "val": ids[a:b], "test": ids[b:]}
    record = {"source": "pydoc_data.topics, joined in sorted key order", "characters": len(ids),
              "vocabulary": "".join(vocab), "split": {"train": [0, a], "val": [a, b], "test": [b, len(ids)]}}
    return split, len(vocab), record


def windows(ids, context, batch, seed):
    """One epoch: the text cut into windows of ``context + 1`` at a random shift, in a random order."""
    gen = torch.Generator().manual_seed(seed)
    shift = int(torch.randint(0, context, (1,), generator=gen))
    starts = torch.arange(shift, len(ids) - context - 1, context)
    starts = starts[torch.randperm(len(starts), generator=gen)]
    for i in range(0, len(starts) - batch + 1, batch):
        rows = torch.stack([ids[s:s + context + 1] for s in starts[i:i + batch].tolist()])
        yield rows[:, :-1], rows[:, 1:]


def steps_per_epoch(ids, context, batch):
    return (len(range(0, len(ids) - context - 1, context)) - 1) // batch


# ---------------------------------------------------------------------------------------------- model
class CharTransformer(nn.Module):
    def __init__(self, vocab, context, width, layers, heads, dropout=0.0):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.tokens(x) + self.positions(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def loss_of(model, x, y):
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def bits_per_char(model, ids, context, batch=64):
    """Mean cross-entropy in bits over non-overlapping windows of the split."""
    model.eval()
    starts = list(range(0, len(ids) - context - 1, context))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        rows = torch.stack([ids[s:s + context + 1] for s in starts[i:i + batch]])
        x, y = rows[:, :-1], rows[:, 1:]
        total += float(loss_of(model, x, y)) * y.numel()
        count += y.numel()
    model.train()
    return total / count / math.log(2)


# ---------------------------------------------------------------------------------------------- runs
class Run:
    """What one seed's runs share: the data, the configuration, the epoch length."""

    def __init__(self, split, vocab, cfg, seed):
        self.split, self.vocab, self.cfg, self.seed = split, vocab, cfg, seed
        self.epoch_steps = steps_per_epoch(split["train"], cfg["context"], cfg["batch"])

    def model(self, state=None):
        torch.manual_seed(self.seed)
        m = CharTransformer(self.vocab, self.cfg["context"], self.cfg["width"], self.cfg["layers"], self.cfg["heads"])
        if state is not None:
            m.load_state_dict(state)
        return m

    def batches(self, split, steps, seed):
        """``steps`` batches of ``split``, epoch after epoch of fresh orders."""
        done, epoch = 0, 0
        while done < steps:
            for xb, yb in windows(self.split[split], self.cfg["context"], self.cfg["batch"], seed * 1000 + epoch):
                if done == steps:
                    return
                yield xb, yb
                done += 1
            epoch += 1

    def train_bpc(self, model):
        """bpc on a fixed slice of the training split as long as the test split: TWA-t's objective."""
        return bits_per_char(model, self.split["train"][: len(self.split["test"])], self.cfg["context"])

    def scores(self, model):
        c = self.cfg["context"]
        test, train = bits_per_char(model, self.split["test"], c), self.train_bpc(model)
        return {"test": test, "val": bits_per_char(model, self.split["val"], c), "train": train, "gap": test - train}

    def train(self, epochs, lr=BASE_LR, start=None, seed=None, every=None, evaluate=False):
        """AdamW with warm-up and a cosine schedule over ``epochs``; with ``every`` (steps), a snapshot
        of the trainable parameters each ``every`` steps of the first half of the run."""
        model = self.model(start)
        steps = round(epochs * self.epoch_steps)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        warm = max(1, int(WARMUP * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
        snapshots, curve = [], []
        for k, (xb, yb) in enumerate(self.batches("train", steps, self.seed if seed is None else seed), start=1):
            opt.zero_grad()
            loss_of(model, xb, yb).backward()
            opt.step()
            sched.step()
            if every and k % every == 0 and k <= steps // 2:
                snapshots.append({n: p.detach().clone() for n, p in model.state_dict().items()})
            if evaluate and k % (self.epoch_steps // 2) == 0:
                curve.append((k / self.epoch_steps, bits_per_char(model, self.split["test"], self.cfg["context"])))
        return model, snapshots, curve

    def start_loss(self, split):
        """What the start search judges candidates by: bpc on the validation split (TWA-v's data), or on a
        fixed slice of the training split as long as it (TWA-t's)."""
        ids = self.split["val"] if split == "val" else self.split["train"][-len(self.split["val"]):]
        return lambda model: bits_per_char(model, ids, self.cfg["context"])

    def twa(self, ckpts, split, bits=4, scale="layer", epochs=None, start=None, curve=None, ordered=True,
            recipe=(DEFAULT_START, DEFAULT_END)):
        """TWA by the benchmarks' recipe (:mod:`benchmarks.recipe`; ``recipe`` = (start, end) for its
        variants) over ``ckpts`` for ``epochs`` (default: the budget B) of steps on ``split``; with a list
        ``curve``, (step, train bpc) every CURVE_EVERY steps go into it."""
        model = self.model(start or ckpts[-1])
        space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, scale=scale, progress=False)
        steps = max(1, round((self.cfg["budget"] if epochs is None else epochs) * self.epoch_steps))
        run = TWARun(model, space, steps, self.start_loss(split), ordered=ordered, start=recipe[0], end=recipe[1])
        if curve is not None:
            curve.append((0, self.train_bpc(model)))
        for k, (xb, yb) in enumerate(self.batches(split, steps, self.seed + 77), start=1):
            run.zero_grad()
            loss_of(model, xb, yb).backward()
            run.step()
            if curve is not None and (k % CURVE_EVERY == 0 or k == steps):
                curve.append((k, self.train_bpc(model)))
        run.finish()
        if curve is not None:
            curve.append((steps, self.train_bpc(model)))  # the end point: the average of the iterates
        return model, run.opt, run.record()

    def train_constant(self, epochs, window_epochs, count):
        """A warm-up then constant-lr AdamW run (the stable phase of warmup-stable-decay) of ``epochs``;
        ``count`` snapshots evenly over its last ``window_epochs``."""
        model = self.model()
        steps = round(epochs * self.epoch_steps)
        opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, weight_decay=WEIGHT_DECAY)
        warm = max(1, int(WARMUP * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
        every = max(1, round(window_epochs * self.epoch_steps / count))
        first = steps - every * count
        snapshots = []
        for k, (xb, yb) in enumerate(self.batches("train", steps, self.seed), start=1):
            opt.zero_grad()
            loss_of(model, xb, yb).backward()
            opt.step()
            sched.step()
            if k > first and (k - first) % every == 0:
                snapshots.append({n: p.detach().clone() for n, p in model.state_dict().items()})
        return snapshots

    def averaged(self, state):
        return self.model(state)


def recipe_variants(run: Run, ckpts, out: dict, starts: dict) -> None:
    """TWA-t, 4 bits, with each other start and end of the recipe: how its defaults were chosen."""
    for start, end in VARIANTS:
        model, _, record = run.twa(ckpts, "train", recipe=(start, end))
        out[f"TWA-t, 4 bits{label(start, end)}"] = run.scores(model)
        if record:
            starts[f"TWA-t{label(start, end)}"] = record


def head_stage(run: Run):
    cfg = run.cfg
    E, every = cfg["half_epochs"], run.epoch_steps // cfg["per_epoch"]
    base, ckpts, curve = run.train(2 * E, every=every, evaluate=True)
    half, _, _ = run.train(E)
    out = {f"base run, {2 * E} epochs": run.scores(base), f"half-budget run, {E} epochs": run.scores(half),
           **in_span_baselines(ckpts, lambda state: run.scores(run.averaged(state)), EMA_GAMMA)}
    twa_curve, starts = [], {}
    model, opt, starts["TWA-t"] = run.twa(ckpts, "train", curve=twa_curve)
    out["TWA-t, 4 bits"] = run.scores(model)
    alphas = opt.alphas()
    out["TWA-t, fp32"] = run.scores(run.twa(ckpts, "train", bits=None)[0])
    model, _, starts["TWA-v"] = run.twa(ckpts, "val")
    out["TWA-v, 4 bits"] = run.scores(model)
    out["TWA-v, fp32"] = run.scores(run.twa(ckpts, "val", bits=None)[0])
    recipe_variants(run, ckpts, out, starts)
    out["starts"] = starts
    return out, ckpts, curve, alphas, twa_curve


def stable_phase(run: Run):
    """Checkpoints of a constant-lr phase (the other end from the head stage: closely spaced, small
    spread): the last 0.5 epoch of a 2-epoch warm-up + constant run, n = 10."""
    ckpts = run.train_constant(run.cfg["stable_epochs"], 0.5, run.cfg["stable_n"])
    out = in_span_baselines(ckpts, lambda state: run.scores(run.averaged(state)), EMA_GAMMA)
    twa_curve, starts = [], {}
    model, _, starts["TWA-t"] = run.twa(ckpts, "train", curve=twa_curve)
    out["TWA-t, 4 bits"] = run.scores(model)
    model, _, starts["TWA-v"] = run.twa(ckpts, "val")
    out["TWA-v, 4 bits"] = run.scores(model)
    recipe_variants(run, ckpts, out, starts)
    out["starts"] = starts
    return out, twa_curve


def bits_ablation(run: Run, ckpts):
    return {f"{scale}/{'fp32' if bits is None else bits}": run.scores(run.twa(ckpts, "train", bits=bits, scale=scale)[0])
            for scale in ("layer", "column_norm") for bits in (1, 2, 4, 8, None)}


def soup(run: Run, start):
    cfg = run.cfg
    finetuned = []
    for i in range(cfg["soup_runs"]):
        model, _, _ = run.train(cfg["soup_epochs"], lr=SOUP_LRS[i % len(SOUP_LRS)], start=start,
                                seed=run.seed * 10 + i + 1)
        finetuned.append({n: p.detach().clone() for n, p in model.state_dict().items()})
    vals = [run.scores(run.averaged(sd))["val"] for sd in finetuned]
    best = min(range(len(finetuned)), key=lambda i: vals[i])
    out = {"best single (by val)": run.scores(run.averaged(finetuned[best])),
           "uniform soup": run.scores(run.averaged(twa.swa(finetuned)))}
    m = run.model()
    _, chosen = twa.greedy_soup(m, finetuned, lambda mm: -bits_per_char(mm, run.split["val"], cfg["context"]))
    out["greedy soup"] = dict(run.scores(m), kept=len(chosen))
    model, _, record = run.twa(finetuned, "val", start=start, ordered=False)
    out["TWA-v"] = dict(run.scores(model), **record)
    return out


# ---------------------------------------------------------------------------------------------- report
def table(per_seed):
    rows = []
    for k in score_rows(per_seed):
        rows.append([k, mean_std([s[k]["train"] for s in per_seed], 3), mean_std([s[k]["test"] for s in per_seed], 3),
                     mean_std([s[k]["val"] for s in per_seed], 3), mean_std([s[k]["gap"] for s in per_seed], 3)])
    return markdown_table(["method", "train bpc", "test bpc", "validation bpc", "test − train bpc"], rows)


BASELINES = baseline_names(EMA_GAMMA)
TARGET_PAIRS = (("TWA-t, 4 bits", "train"), ("TWA-v, 4 bits", "val"))
TEST_METHODS = ("TWA-t, 4 bits", "TWA-v, 4 bits")


def plot(curves, head, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E, B = cfg["half_epochs"], cfg["budget"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [x for x, _ in curves[0]]
    ys = [statistics.mean(c[i][1] for c in curves) for i in range(len(xs))]
    ax.plot(xs, ys, "-", color="gray", label=f"base run ({2 * E}-epoch cosine), test bpc")
    points = {f"half-budget run, {E} epochs": (E, "s"), "SWA": (E, "^"), f"EMA (γ={EMA_GAMMA})": (E, "v"),
              f"LAWA (k={LAWA_K})": (E, "<"), "TWA-t, 4 bits": (E + B, "o"), "TWA-v, 4 bits": (E + B, "D"),
              f"base run, {2 * E} epochs": (2 * E, "*")}
    for name, (x, marker) in points.items():
        vals = [h[name]["test"] for h in head]
        ax.errorbar([x], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0.0],
                    marker=marker, linestyle="none", capsize=3, label=name)
    ax.set_xlabel("epochs of training spent")
    ax.set_ylabel("test bits per character")
    ax.set_title("Head-stage TWA on pydoc text (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(head, cfg) -> str:
    E, B = cfg["half_epochs"], cfg["budget"]
    full = [h[f"base run, {2 * E} epochs"]["test"] for h in head]
    # which TWA speaks for the method is chosen on the validation split, never on the test split
    best = min(("TWA-t, 4 bits", "TWA-v, 4 bits"), key=lambda k: statistics.mean(h[k]["val"] for h in head))
    got = [h[best]["test"] for h in head]
    spread = max(statistics.stdev(full) if len(full) > 1 else 0.0, statistics.stdev(got) if len(got) > 1 else 0.0)
    diff = statistics.mean(got) - statistics.mean(full)
    if diff <= spread:
        how = "matched" if diff >= -spread else "beat"
    else:
        how = "did not match"
    return (f"{best} at {E} + {B} epochs {how} the {2 * E}-epoch run on this task: {statistics.mean(got):.3f} vs "
            f"{statistics.mean(full):.3f} test bpc (difference {diff:+.3f}; seed spread {spread:.3f}).")


def text_benchmark(argv, doc: str, full: dict, quick: dict):
    """The command line of a benchmark on this text (``--quick``, ``--seeds``, ``--out-dir``), its
    configuration, the device it announces, and the corpus: (args, cfg, device, split, vocab, record)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model on a slice of the text: a smoke test")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--out-dir", default=None, help="where results go (default benchmarks/results)")
    args = p.parse_args(argv)
    cfg = dict(quick if args.quick else full)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    device = pick_device("cpu")
    announce_backends(device)
    return (args, cfg, device, *corpus(cfg["text_chars"]))


def main(argv=None):
    args, cfg, device, split, vocab, data_record = text_benchmark(argv, __doc__, FULL, QUICK)
    head, ablation, soups, curves, alphas0 = [], [], [], [], None
    stable, head_twa, stable_twa = [], [], []
    for seed in tqdm(range(cfg["seeds"]), desc="quality_text", unit="seed"):
        run = Run(split, vocab, cfg, seed)
        h, ckpts, curve, alphas, twa_curve = head_stage(run)
        head.append(h)
        curves.append(curve)
        head_twa.append(twa_curve)
        st, st_curve = stable_phase(run)
        stable.append(st)
        stable_twa.append(st_curve)
        alphas0 = alphas if alphas0 is None else alphas0
        ablation.append(bits_ablation(run, ckpts))
        soups.append(soup(run, ckpts[-1]))
    env = environment(device)
    E = cfg["half_epochs"]
    goals = {regime: targets(per_seed, BASELINES, TARGET_PAIRS, "bpc")
             for regime, per_seed in (("head_stage", head), ("stable_phase", stable))}
    test_goals = {regime: test_targets(per_seed, BASELINES, TEST_METHODS, "bpc")
                  for regime, per_seed in (("head_stage", head), ("stable_phase", stable))}
    md = (f"Character-level language modelling of pydoc_data.topics ({data_record['characters']:,} characters, "
          f"{vocab} symbols; {cfg['seeds']} seed(s); {'quick smoke test, not a measurement; ' if args.quick else ''}"
          f"{env['device']}; torch {env['torch']}; commit {str(env['commit'])[:10]}; {env['date']})\n\n"
          f"Model: causal transformer, width {cfg['width']}, {cfg['layers']} layer(s), context {cfg['context']}; "
          f"AdamW lr {BASE_LR}, cosine. Checkpoints every 1/{cfg['per_epoch']} epoch of the first {E} epoch(s) "
          f"(n = {E * cfg['per_epoch']}); TWA budget {cfg['budget']} epoch by the benchmarks' recipe (start: the best "
          f"fixed merge by twa.best_start on the data TWA trains on; ProjectedAdamW with its defaults, 4 bits unless "
          f"said; end: the average of the second half's iterates). Rows '(start X, end Y)' are the recipe's "
          f"variants; '(start last, end last)' is the earlier default. "
          f"Train bpc on a fixed slice of the training split as long as the test split.\n\n"
          f"(a) head stage\n\n" + table(head)
          + f"\n(a') stable phase: n = {cfg['stable_n']} checkpoints over the last 0.5 epoch of a "
          f"{cfg['stable_epochs']}-epoch warm-up + constant-lr run, the same TWA\n\n" + table(stable)
          + "\nTargets (TWA-t train ≤ every in-span baseline's, TWA-v validation ≤ theirs), head stage:\n\n"
          + "\n".join(f"- {line}" for line in goals["head_stage"]) + "\n\nstable phase:\n\n"
          + "\n".join(f"- {line}" for line in goals["stable_phase"]) + "\n"
          + "\nNever behind a free merge (test bpc ≤ the best fixed merge's + 2σ of the seed noise), head stage:\n\n"
          + describe_test_targets(test_goals["head_stage"]) + "\n\nstable phase:\n\n"
          + describe_test_targets(test_goals["stable_phase"]) + "\n"
          + "\nStarts chosen by twa.best_start, head stage:\n\n" + describe_starts(head)
          + "\n\nstable phase:\n\n" + describe_starts(stable) + "\n"
          + "\n(b) bits ablation of TWA-t\n\n" + table(ablation)
          + f"\n(c) soup of {cfg['soup_runs']} fine-tuning runs of {cfg['soup_epochs']} epoch from the epoch-{E} point\n\n"
          + table(soups) + "\n" + verdict(head, cfg) + "\n")
    print(md)
    path = save("quality_text" + ("_quick" if args.quick else ""), device,
                {"config": cfg, "data": data_record, "head_stage": head, "stable_phase": stable,
                 "bits_ablation": ablation, "soup": soups, "base_curves": curves,
                 "twa_t_train_curves": {"head_stage": head_twa, "stable_phase": stable_twa},
                 "targets": goals, "test_targets": test_goals,
                 "alphas_seed0": alphas0.tolist(), "verdict": verdict(head, cfg)},
                md, out_dir=args.out_dir)
    plot(curves, head, cfg, path[:-5] + "_curve.png")
    plot_twa_curves([("head stage: checkpoints of a cosine run's first half", head, head_twa),
                     ("stable phase: checkpoints of a constant-lr run", stable, stable_twa)],
                    BASELINES, path[:-5] + "_twa_steps.png", "train bits per character")
    print(f"saved {path}, {path[:-5]}_curve.png, {path[:-5]}_twa_steps.png")


if __name__ == "__main__":
    main()
