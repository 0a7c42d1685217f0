"""A miniature of the paper's quality tables on real data that ships with scikit-learn (load_digits).

    python -m benchmarks.quality               # 3 seeds, a few minutes on 2 CPU cores

(a) head stage, for two models (an MLP and a small CNN, both with BatchNorm): a base SGD run of E epochs
    against every fixed merge of the checkpoints of its first E/2 epochs a user could take instead (the
    last checkpoint, LAWA over the last 2, 4, 8, EMA, SWA) and TWA-t / TWA-v over the same checkpoints
    (TWA-t trains on the training set, TWA-v on the validation set);
(b) soup: K fine-tuning runs from one start (different learning rates, weight decays, data orders):
    best single model (by validation), uniform soup, greedy soup, TWA-t, TWA-v;
(c) bits ablation of TWA-t on (a)'s MLP checkpoints: 1, 2, 4, 8 bits and fp32, with the paper's
    per-layer scale and with the norm-preserving per-column scale.

TWA runs by the benchmarks' recipe (:mod:`benchmarks.recipe`: the best fixed merge as the start, chosen on
the data TWA trains on; ProjectedAdamW with its defaults; the average of the second half's iterates as the
end), the one configuration of every quality benchmark, for a fixed budget.
The split (60% train, 10% validation, 30% test, stratified) is fixed; seeds change initialisation and
data order. Every hyper-parameter is fixed below in advance; choices among models use the validation
set only; the test set is only ever evaluated. Reported: cross-entropy on train / validation / test,
test accuracy and the train − test accuracy gap, mean ± std over seeds; per seed, whether TWA-t's
train loss and TWA-v's validation loss are at or below every in-span baseline's; plots of train loss
against TWA step, of TWA's learned averaging weights α and of the bits ablation.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from tqdm.auto import tqdm

import twa_kernels as twa
from benchmarks.common import announce_backends, environment, markdown_table, pick_device, save
from benchmarks.in_span import (baseline_names, describe_starts, describe_test_targets, in_span_baselines,
                               plot_twa_curves, score_rows, targets, test_targets)
from benchmarks.recipe import DEFAULT_END, DEFAULT_START, TWARun, label

EPOCHS = 20  # base run; checkpoints of the first EPOCHS / 2 epochs feed the averages
BATCH = 32
BASE_LR, MOMENTUM = 0.05, 0.9
TWA_T_EPOCHS, TWA_V_EPOCHS = 2, 10  # budgets on the training set (34 steps an epoch) and the validation set (6)
CURVE_EVERY = 4  # TWA-t's train loss is read every this many steps, for the plot
EMA_GAMMA = 0.5
BASELINES = baseline_names(EMA_GAMMA)
SOUP_CONFIGS = [(lr, wd, order) for lr in (0.01, 0.05) for wd in (0.0, 1e-3) for order in (0, 1)][:6]
SOUP_PRETRAIN, SOUP_FINETUNE = 3, 6
ARCHS = ("MLP", "CNN")
VARIANTS = (("last", "last"), ("last", "average"), ("center", "average"), ("best", "last"), ("best", "cosine"))


def data(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    idx = torch.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.3, stratify=y, random_state=0)
    train, val = train_test_split(rest, test_size=1 / 7, stratify=y[rest], random_state=0)
    return {k: (x[i].to(device), y[i].to(device)) for k, i in (("train", train), ("val", val), ("test", test))}


def make_model(arch="MLP"):
    if arch == "MLP":
        return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                             nn.Linear(64, 10))
    if arch == "CNN":
        return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 16, 10))
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")


def batches(split, seed):
    x, y = split
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(x.device)
    for i in range(0, len(y), BATCH):
        j = perm[i:i + BATCH]
        yield x[j], y[j]


def train_epochs(model, opt, split, epochs, seed, after_step=None):
    model.train()
    for e in range(epochs):
        for xb, yb in batches(split, seed * 1000 + e):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if after_step is not None:
                after_step()


@torch.no_grad()
def evaluate(model, split):
    """(accuracy, mean cross-entropy) in eval mode."""
    model.eval()
    x, y = split
    logits = model(x)
    out = float((logits.argmax(1) == y).float().mean()), float(nn.functional.cross_entropy(logits, y))
    model.train()
    return out


def accuracy(model, split):
    return evaluate(model, split)[0]


def recompute_bn(model, d):
    twa.update_bn([d["train"][0][i:i + 256] for i in range(0, len(d["train"][0]), 256)], model)


def scores(model, d):
    (train_acc, train), (val_acc, val), (test_acc, test) = (evaluate(model, d[k]) for k in ("train", "val", "test"))
    return {"train": train, "val": val, "test": test, "test_acc": test_acc, "val_acc": val_acc,
            "gap": train_acc - test_acc}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_twa(start_state, ckpts, d, split, epochs, seed, arch="MLP", bits=4, scale="layer", curve=None,
            ordered=True, recipe=(DEFAULT_START, DEFAULT_END)):
    """TWA by the benchmarks' recipe (:mod:`benchmarks.recipe`; ``recipe`` = (start, end) for its variants);
    with a list ``curve``, (step, train loss) every CURVE_EVERY steps (the BatchNorm statistics
    recomputed for each reading; they do not enter the training forward). Returns (scores, α, the start
    search's record)."""
    model = make_model(arch).to(d["train"][0].device)
    model.load_state_dict(start_state)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, scale=scale, progress=False)
    steps = epochs * -(-len(d[split][1]) // BATCH)

    def start_loss(m):  # the start is judged on the data TWA trains on, with its own BatchNorm statistics
        recompute_bn(m, d)
        return evaluate(m, d[split])[1]

    run = TWARun(model, space, steps, start_loss, ordered=ordered, start=recipe[0], end=recipe[1])
    step = 0

    def read():
        recompute_bn(model, d)
        curve.append((step, evaluate(model, d["train"])[1]))

    def after_step():
        nonlocal step
        step += 1
        if step % CURVE_EVERY == 0:
            read()

    if curve is not None:
        read()
    train_epochs(model, run, d[split], epochs, seed + 77, after_step if curve is not None else None)
    run.finish()
    if curve is not None:
        read()  # the end point: the average of the iterates
    recompute_bn(model, d)
    return dict(scores(model, d), **run.record()), run.opt.alphas()


def load_average(state, d, arch="MLP"):
    model = make_model(arch).to(d["train"][0].device)
    model.load_state_dict(state)
    recompute_bn(model, d)
    return model


def head_stage(d, seed, epochs=EPOCHS, arch="MLP"):
    torch.manual_seed(seed)
    model = make_model(arch).to(d["train"][0].device)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    ckpts = []
    for e in range(epochs):
        train_epochs(model, opt, d["train"], 1, seed * 100 + e)
        if e < epochs // 2:
            ckpts.append(snapshot(model))
    out = {f"base run, {epochs} epochs": scores(model, d)}
    out.update(in_span_baselines(ckpts, lambda state: scores(load_average(state, d, arch), d), EMA_GAMMA))
    curve = []
    out["TWA-t"], alphas = run_twa(ckpts[-1], ckpts, d, "train", TWA_T_EPOCHS, seed, arch, curve=curve)
    out["TWA-v"], _ = run_twa(ckpts[-1], ckpts, d, "val", TWA_V_EPOCHS, seed, arch)
    for start, end in VARIANTS:  # the recipe's other starts and ends: how its defaults were chosen
        out[f"TWA-t{label(start, end)}"], _ = run_twa(ckpts[-1], ckpts, d, "train", TWA_T_EPOCHS, seed, arch,
                                                      recipe=(start, end))
    return out, ckpts, alphas, curve


def soup(d, seed):
    torch.manual_seed(seed)
    dev = d["train"][0].device
    start = make_model().to(dev)
    train_epochs(start, torch.optim.SGD(start.parameters(), lr=BASE_LR, momentum=MOMENTUM), d["train"],
                 SOUP_PRETRAIN, seed)
    start_state = snapshot(start)
    finetuned = []
    for lr, wd, order in SOUP_CONFIGS:
        m = make_model().to(dev)
        m.load_state_dict(start_state)
        train_epochs(m, torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=wd), d["train"],
                     SOUP_FINETUNE, seed * 10 + order + 1)
        finetuned.append(snapshot(m))
    vals = [accuracy(load_average(sd, d), d["val"]) for sd in finetuned]
    best = max(range(len(finetuned)), key=lambda i: vals[i])
    out = {"best single (by val)": scores(load_average(finetuned[best], d), d),
           "uniform soup": scores(load_average(twa.swa(finetuned), d), d)}
    m = make_model().to(dev)
    _, chosen = twa.greedy_soup(m, finetuned, lambda mm: accuracy(mm, d["val"]), after_load=lambda mm: recompute_bn(mm, d))
    out["greedy soup"] = dict(scores(m, d), kept=len(chosen))
    out["TWA-t"], _ = run_twa(start_state, finetuned, d, "train", TWA_T_EPOCHS, seed, ordered=False)
    out["TWA-v"], _ = run_twa(start_state, finetuned, d, "val", TWA_V_EPOCHS, seed, ordered=False)
    return out


def bits_ablation(d, ckpts, seed):
    return {(scale, "fp32" if bits is None else bits): run_twa(ckpts[-1], ckpts, d, "train", TWA_T_EPOCHS, seed,
                                                              bits=bits, scale=scale)[0]
            for scale in ("layer", "column_norm") for bits in (1, 2, 4, 8, None)}


def mean_std(values, digits: int = 2) -> str:
    """"mean ± std" over seeds (std 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(per_seed):
    rows = [[k, *(mean_std([s[k][m] for s in per_seed], 4) for m in ("train", "val", "test")),
             mean_std([100 * s[k]["test_acc"] for s in per_seed]), mean_std([100 * s[k]["gap"] for s in per_seed])]
            for k in score_rows(per_seed)]
    return markdown_table(["method", "train loss", "validation loss", "test loss", "test accuracy (%)",
                           "train − test accuracy (pts)"], rows)


def plots(alphas, ablation_rows, names, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(alphas.numpy(), aspect="auto", cmap="coolwarm", vmin=-float(alphas.abs().max()),
                   vmax=float(alphas.abs().max()))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("checkpoint (epoch)")
    ax.set_title("TWA-t learned averaging weights α per layer (MLP, seed 0; uniform SWA = 1/n)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path_prefix + "_alphas.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for scale in ("layer", "column_norm"):
        pts = [(b, m, s) for (sc, b), (m, s) in ablation_rows.items() if sc == scale]
        ax.errorbar(range(len(pts)), [m for _, m, _ in pts], yerr=[s for _, _, s in pts], marker="o", capsize=3,
                    label={"layer": "per-layer scale (Eq. 16)", "column_norm": "per-column, norm-preserving"}[scale])
        ax.set_xticks(range(len(pts)), [str(b) for b, _, _ in pts])
    ax.set_xlabel("bits")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("TWA-t bits ablation on digits (mean ± std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_prefix + "_bits.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=EPOCHS, help="base run length (a smoke test shortens it)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default=None, help="where results go (default benchmarks/results)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    announce_backends(device)
    d = data(device)
    head = {arch: [] for arch in ARCHS}
    curves = {arch: [] for arch in ARCHS}
    soups, ablations, alphas0 = [], [], None
    for seed in tqdm(range(args.seeds), desc="quality", unit="seed"):
        for arch in ARCHS:
            h, ckpts, alphas, curve = head_stage(d, seed, args.epochs, arch)
            head[arch].append(h)
            curves[arch].append(curve)
            if arch == "MLP":
                alphas0 = alphas if alphas0 is None else alphas0
                ablations.append(bits_ablation(d, ckpts, seed))
        soups.append(soup(d, seed))
    env = environment(device)
    abl_rows, abl_summary = [], {}
    for key in ablations[0]:
        test = [100 * a[key]["test_acc"] for a in ablations]
        m, s = statistics.mean(test), statistics.stdev(test) if len(test) > 1 else 0.0
        abl_summary[key] = (m, s)
        abl_rows.append([key[0], key[1], mean_std([a[key]["train"] for a in ablations], 4), f"{m:.2f} ± {s:.2f}"])
    pairs = (("TWA-t", "train"), ("TWA-v", "val"))
    goals = {arch: targets(head[arch], BASELINES, pairs, "loss") for arch in ARCHS}
    test_goals = {arch: test_targets(head[arch], BASELINES, ("TWA-t", "TWA-v"), "loss") for arch in ARCHS}
    soup_baselines = ("best single (by val)", "uniform soup", "greedy soup")
    test_goals["soup"] = test_targets(soups, soup_baselines, ("TWA-t", "TWA-v"), "loss")
    md = (f"Quality on scikit-learn digits ({args.seeds} seeds; {env['device']}; torch {env['torch']}; "
          f"commit {str(env['commit'])[:10]}; {env['date']})\n\n"
          f"TWA by the benchmarks' recipe (start: the best fixed merge by twa.best_start on the data TWA trains on; "
          f"ProjectedAdamW with its defaults; end: the average of the second half's iterates); rows '(start X, end "
          f"Y)' are its variants, '(start last, end last)' the earlier default. TWA-t {TWA_T_EPOCHS} epochs on the training set, TWA-v {TWA_V_EPOCHS} epochs on the validation set, "
          f"4 bits. Losses are mean cross-entropy with BatchNorm statistics recomputed on the training set.\n\n"
          + "".join(f"(a) head stage, {arch}: base run {args.epochs} epochs of SGD; averages over the checkpoints of "
                    f"epochs 1–{args.epochs // 2} (the last checkpoint is the base run at epoch {args.epochs // 2})\n\n"
                    + table(head[arch]) + "\nTargets (TWA-t train loss ≤ every in-span baseline's, TWA-v validation "
                    "loss ≤ theirs):\n\n" + "\n".join(f"- {line}" for line in goals[arch])
                    + "\n\nNever behind a free merge (test loss ≤ the best fixed merge's + 2σ of the seed noise):\n\n"
                    + describe_test_targets(test_goals[arch]) + "\n\nStarts chosen by twa.best_start:\n\n"
                    + describe_starts([{"starts": {k: v for k, v in s.items() if k.startswith("TWA")}} for s in head[arch]])
                    + "\n\n" for arch in ARCHS)
          + f"(b) soup of {len(SOUP_CONFIGS)} fine-tuning runs from one start (MLP)\n\n" + table(soups)
          + "\nNever behind a free merge (test loss ≤ the best of best single, uniform and greedy soup + 2σ):\n\n"
          + describe_test_targets(test_goals["soup"]) + "\n"
          + "\n(c) bits ablation of TWA-t on (a)'s MLP checkpoints\n\n"
          + markdown_table(["scale", "bits", "train loss", "test accuracy (%)"], abl_rows))
    print(md)
    path = save("quality", device, {"head_stage": head["MLP"], "head_stage_cnn": head["CNN"], "soup": soups,
                                    "twa_t_train_curves": curves, "targets": goals,
                                    "test_targets": test_goals,
                                    "bits_ablation": [{f"{k[0]}/{k[1]}": v for k, v in a.items()} for a in ablations]},
                md, out_dir=args.out_dir)
    names = [nm for nm, _ in make_model().named_parameters()]
    plots(alphas0, abl_summary, names, path[:-5])
    plot_twa_curves([(f"digits {arch}: checkpoints of epochs 1–{args.epochs // 2}", head[arch], curves[arch])
                     for arch in ARCHS], BASELINES, path[:-5] + "_twa_steps.png", "train cross-entropy")
    print(f"saved {path}, {path[:-5]}_alphas.png, {path[:-5]}_bits.png, {path[:-5]}_twa_steps.png")


if __name__ == "__main__":
    main()
