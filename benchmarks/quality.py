"""A miniature of the paper's quality tables on real data that ships with scikit-learn (load_digits).

    python -m benchmarks.quality               # 3 seeds, about a minute on 2 CPU cores

(a) head stage: a base SGD run of E epochs against SWA / EMA / LAWA / TWA-t / TWA-v built from the
    checkpoints of its first E/2 epochs (TWA-t trains on the training set, TWA-v on the validation set);
(b) soup: K fine-tuning runs from one start (different learning rates, weight decays, data orders):
    best single model (by validation), uniform soup, greedy soup, TWA-t, TWA-v;
(c) bits ablation of TWA-t on (a)'s checkpoints: 1, 2, 4, 8 bits and fp32, with the paper's per-layer
    scale and with the norm-preserving per-column scale.

The split (60% train, 10% validation, 30% test, stratified) is fixed; seeds change initialisation and
data order. Every hyper-parameter is fixed below in advance; choices among models use the validation
set only; the test set is only ever evaluated. Reported: test accuracy and the train − test gap,
mean ± std over seeds, plus a plot of TWA's learned averaging weights α and of the bits ablation.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn
from tqdm.auto import tqdm

import twa_kernels as twa
from benchmarks.common import announce_backends, environment, markdown_table, pick_device, save

EPOCHS = 20  # base run; checkpoints of the first EPOCHS / 2 epochs feed the averages
BATCH = 32
BASE_LR, MOMENTUM = 0.05, 0.9
TWA_T = dict(epochs=2, lr=0.1, momentum=0.9)  # ProjectedSGD on the training set
TWA_V = dict(epochs=10, lr=0.1, momentum=0.9)  # ProjectedSGD on the validation set
EMA_GAMMA, LAWA_K = 0.5, 5
SOUP_CONFIGS = [(lr, wd, order) for lr in (0.01, 0.05) for wd in (0.0, 1e-3) for order in (0, 1)][:6]
SOUP_PRETRAIN, SOUP_FINETUNE = 3, 6


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


def make_model():
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def batches(split, seed):
    x, y = split
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(x.device)
    for i in range(0, len(y), BATCH):
        j = perm[i:i + BATCH]
        yield x[j], y[j]


def train_epochs(model, opt, split, epochs, seed):
    model.train()
    for e in range(epochs):
        for xb, yb in batches(split, seed * 1000 + e):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()


@torch.no_grad()
def accuracy(model, split):
    model.eval()
    x, y = split
    return float((model(x).argmax(1) == y).float().mean())


def recompute_bn(model, d):
    twa.update_bn([d["train"][0][i:i + 256] for i in range(0, len(d["train"][0]), 256)], model)


def scores(model, d):
    return {"test": accuracy(model, d["test"]), "gap": accuracy(model, d["train"]) - accuracy(model, d["test"]),
            "val": accuracy(model, d["val"])}


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_twa(start_state, ckpts, d, split, cfg, seed, bits=4, scale="layer", want_alphas=False):
    model = make_model().to(d["train"][0].device)
    model.load_state_dict(start_state)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, scale=scale, progress=False)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=cfg["lr"], momentum=cfg["momentum"])
    recompute_bn(model, d)  # the buffers of w̄ are not w̄'s statistics
    train_epochs(model, opt, d[split], cfg["epochs"], seed + 77)
    recompute_bn(model, d)
    out = scores(model, d)
    return (out, opt.alphas()) if want_alphas else out


def load_average(state, d):
    model = make_model().to(d["train"][0].device)
    model.load_state_dict(state)
    recompute_bn(model, d)
    return model


def head_stage(d, seed, epochs=EPOCHS):
    torch.manual_seed(seed)
    model = make_model().to(d["train"][0].device)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    ckpts = []
    for e in range(epochs):
        train_epochs(model, opt, d["train"], 1, seed * 100 + e)
        if e < epochs // 2:
            ckpts.append(snapshot(model))
    out = {f"base run, {epochs} epochs": scores(model, d)}
    half = make_model().to(d["train"][0].device)
    half.load_state_dict(ckpts[-1])
    out[f"base run, {epochs // 2} epochs"] = scores(half, d)
    out["SWA"] = scores(load_average(twa.swa(ckpts), d), d)
    out[f"EMA (γ={EMA_GAMMA})"] = scores(load_average(twa.ema(ckpts, EMA_GAMMA), d), d)
    out[f"LAWA (k={LAWA_K})"] = scores(load_average(twa.lawa(ckpts, LAWA_K), d), d)
    out["TWA-t"], alphas = run_twa(ckpts[-1], ckpts, d, "train", TWA_T, seed, want_alphas=True)
    out["TWA-v"] = run_twa(ckpts[-1], ckpts, d, "val", TWA_V, seed)
    return out, ckpts, alphas


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
    vals = []
    for sd in finetuned:
        vals.append(accuracy(load_average(sd, d), d["val"]))
    best = max(range(len(finetuned)), key=lambda i: vals[i])
    out = {"best single (by val)": scores(load_average(finetuned[best], d), d),
           "uniform soup": scores(load_average(twa.swa(finetuned), d), d)}
    m = make_model().to(dev)
    _, chosen = twa.greedy_soup(m, finetuned, lambda mm: accuracy(mm, d["val"]), after_load=lambda mm: recompute_bn(mm, d))
    out[f"greedy soup ({len(chosen)} of {len(finetuned)})"] = scores(m, d)
    out["TWA-t"] = run_twa(start_state, finetuned, d, "train", TWA_T, seed)
    out["TWA-v"] = run_twa(start_state, finetuned, d, "val", TWA_V, seed)
    return out


def bits_ablation(d, ckpts, seed):
    out = {}
    for scale in ("layer", "column_norm"):
        for bits in (1, 2, 4, 8, None):
            out[(scale, "fp32" if bits is None else bits)] = run_twa(ckpts[-1], ckpts, d, "train", TWA_T, seed,
                                                                     bits=bits, scale=scale)
    return out


def mean_std(values, digits: int = 2) -> str:
    """"mean ± std" over seeds (std 0 for one seed)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def summarize(per_seed):
    return [[k, mean_std([100 * s[k]["test"] for s in per_seed]), mean_std([100 * s[k]["gap"] for s in per_seed])]
            for k in per_seed[0]]


def plots(alphas, ablation_rows, names, path_prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(alphas.numpy(), aspect="auto", cmap="coolwarm", vmin=-float(alphas.abs().max()),
                   vmax=float(alphas.abs().max()))
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("checkpoint (epoch)")
    ax.set_title("TWA-t learned averaging weights α per layer (seed 0; uniform SWA = 1/n)", fontsize=9)
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
    head, soups, ablations = [], [], []
    alphas0 = None
    for seed in tqdm(range(args.seeds), desc="quality", unit="seed"):
        h, ckpts, alphas = head_stage(d, seed, args.epochs)
        head.append(h)
        alphas0 = alphas if alphas0 is None else alphas0
        soups.append(soup(d, seed))
        ablations.append(bits_ablation(d, ckpts, seed))
    env = environment(device)
    abl_rows, abl_summary = [], {}
    for key in ablations[0]:
        test = [100 * a[key]["test"] for a in ablations]
        m, s = statistics.mean(test), statistics.stdev(test) if len(test) > 1 else 0.0
        abl_summary[key] = (m, s)
        abl_rows.append([key[0], key[1], f"{m:.2f} ± {s:.2f}"])
    header = ["method", "test accuracy (%)", "train − test gap (pts)"]
    md = (f"Quality on scikit-learn digits ({args.seeds} seeds; {env['device']}; torch {env['torch']}; "
          f"commit {str(env['commit'])[:10]}; {env['date']})\n\n"
          f"(a) head stage: base run {args.epochs} epochs; averages over the checkpoints of epochs 1–{args.epochs // 2}\n\n"
          + markdown_table(header, summarize(head))
          + f"\n(b) soup of {len(SOUP_CONFIGS)} fine-tuning runs from one start\n\n"
          + markdown_table(header, summarize(soups))
          + "\n(c) bits ablation of TWA-t on (a)'s checkpoints\n\n"
          + markdown_table(["scale", "bits", "test accuracy (%)"], abl_rows))
    print(md)
    path = save("quality", device, {"head_stage": head, "soup": soups,
                                    "bits_ablation": [{f"{k[0]}/{k[1]}": v for k, v in a.items()} for a in ablations]}, md,
                out_dir=args.out_dir)
    names = [nm for nm, _ in make_model().named_parameters()]
    plots(alphas0, abl_summary, names, path[:-5])
    print(f"saved {path}, {path[:-5]}_alphas.png, {path[:-5]}_bits.png")


if __name__ == "__main__":
    main()
