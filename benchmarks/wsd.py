"""Merging where pre-training uses it: in place of the decay phase of a warmup-stable-decay run.

    python -m benchmarks.wsd             # 3 seeds, within an hour on 2 CPU cores
    python -m benchmarks.wsd --quick     # a smoke test in about a minute (CI runs it)

Task: character-level language modelling of pydoc_data.topics (the text of ``benchmarks.quality_text``,
the same split), with a larger causal transformer. Metric: bits per character (bpc) on the validation
and the test split; lower is better. Every hyper-parameter is fixed below in advance.

(a) warmup-stable: AdamW with a linear warm-up, then a constant lr, for S steps, a checkpoint every 1 %
    of the run. At two points of the stable phase (t = S/2 and t = S), from the checkpoints up to t:
    - the raw checkpoint at t;
    - real cooldowns: 1−sqrt to zero over 10 % and 20 % of the t steps taken, continuing the run (its
      AdamW state and its data stream);
    - WSM merges of the last 5, 10 and 20 checkpoints with the weights of every decay family
      (``twa.decay_merge_weights``; the linear one is LAWA, the uniform mean), and EMA (γ = 0.9) of the
      last 20;
    - TWA-t (training data) and TWA-v (validation data) over the same windows: ProjectedAdamW with
      every default, for ¼ of the 10 % cooldown's steps;
    - hybrids (merge, then a short cooldown): 2.5 % and 5 % of t of 1−sqrt cooldown, with the run's
      AdamW state, from the best TWA-t point and from the best fixed merge (each chosen by validation);
    - schedule-free AdamW (``schedulefree``, the same lr, warm-up and weight decay), its own run of
      the same steps, read at t in its evaluation mode.
(b) the paper's protocol on the same model: a step-lr run of S steps (constant for the first half, ×0.1
    at 50 %, ×0.01 at 75 %), 10 checkpoints from its first half; a half-budget run of S/2 steps of the
    same shape; TWA-t and TWA-v from the centre of those checkpoints with ``twa.step_decay`` (×0.1 at 50 %
    and 80 % of a budget of 5 % of S).

Every method reports the extra forward+backward passes it spent beyond the run it starts from, and its
wall time on this machine; mean ± std over seeds. Targets (reported as they come out): TWA-v's
validation bpc ≤ the best fixed merge of the same window, and TWA-v near the 10 % cooldown at ¼ of
its passes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import time

import torch
from tqdm.auto import tqdm

import twa_kernels as twa
from benchmarks.common import environment, markdown_table, save
from benchmarks.in_span import describe_test_targets, test_targets
from benchmarks.quality import mean_std
from benchmarks.quality_text import Run, bits_per_char, loss_of, text_benchmark, windows
from benchmarks.recipe import DEFAULT_END, DEFAULT_START, TWARun
from benchmarks.recipe import label as recipe_label

FULL = dict(context=64, width=192, layers=3, heads=4, batch=32, steps=1000, seeds=3, text_chars=None)
QUICK = dict(context=32, width=32, layers=1, heads=2, batch=16, steps=200, seeds=1, text_chars=40_000)
LR, WEIGHT_DECAY, WARMUP = 2e-3, 0.01, 0.05  # AdamW; warm-up as a fraction of the run
CHECKPOINTS = 100  # one every 1 % of the run
WINDOWS = (5, 10, 20)
EMA_GAMMA = 0.9
COOLDOWNS = (0.10, 0.20)  # of the steps taken so far, from the raw checkpoint
HYBRID_COOLDOWNS = (0.025, 0.05)
TWA_BUDGET = 0.25 * COOLDOWNS[0]  # TWA's steps: a quarter of the 10 % cooldown's
VARIANTS = (("last", "last"), ("last", "average"), ("center", "average"))
STEP_TWA_BUDGET, STEP_CHECKPOINTS = 0.05, 10  # (b): TWA's budget as a fraction of S; checkpoints of the first half


def one_minus_sqrt(k: int, steps: int) -> float:
    return 1.0 - math.sqrt(min(k, steps) / steps)


class Seed(Run):
    """One seed's runs (the text benchmark's, with its model): the data stream by global step, evaluation."""

    def __init__(self, split, vocab, cfg, seed):
        super().__init__(split, vocab, cfg, seed)
        self._epochs = {}

    def stream(self, split="train", start=0, salt=0):
        """The batches of ``split`` from global step ``start`` on: epoch after epoch of fresh orders, the
        same batch for the same step whichever run asks (a cooldown continues the run's stream)."""
        epoch, i = divmod(start, len(self._epoch(split, salt, 0)))
        while True:
            yield from self._epoch(split, salt, epoch)[i:]
            epoch, i = epoch + 1, 0

    def _epoch(self, split, salt, epoch):
        key = (split, salt, epoch)
        if key not in self._epochs:
            if len(self._epochs) > 8:
                self._epochs.clear()
            seed = (self.seed * 7919 + salt) * 1000 + epoch
            self._epochs[key] = list(windows(self.split[split], self.cfg["context"], self.cfg["batch"], seed))
        return self._epochs[key]

    def evaluate(self, model) -> dict:
        c = self.cfg["context"]
        return {"val": bits_per_char(model, self.split["val"], c), "test": bits_per_char(model, self.split["test"], c)}


def params(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def train(model, opt, batches, steps, lr_at, on_step=None):
    """``steps`` AdamW steps with lr ``LR · lr_at(k)`` at step k = 0, 1, …"""
    model.train()
    for k in range(steps):
        xb, yb = next(batches)
        for group in opt.param_groups:
            group["lr"] = LR * lr_at(k)
        opt.zero_grad()
        loss_of(model, xb, yb).backward()
        opt.step()
        if on_step is not None:
            on_step(k + 1, model)


def warmup_constant(steps):
    warm = max(1, int(WARMUP * steps))
    return lambda k: min(1.0, (k + 1) / warm)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def stable_run(run: Seed):
    """(a)'s run: checkpoints every 1 %; the model and AdamW state at each evaluation point."""
    S = run.cfg["steps"]
    every = S // CHECKPOINTS
    points = (S // 2, S)
    model, ckpts, at = run.model(), {}, {}
    opt = adamw(model)

    def on_step(k, m):
        if k % every == 0:
            ckpts[k] = params(m)
        if k in points:
            at[k] = (params(m), copy.deepcopy(opt.state_dict()))

    with Timer() as t:
        train(model, opt, run.stream(), S, warmup_constant(S), on_step)
    return ckpts, at, every, t.seconds


def cooldown(run: Seed, state, opt_state, start, steps):
    """``steps`` of 1−sqrt decay to zero from ``state`` with the run's AdamW state, continuing its stream."""
    model = run.model(state)
    opt = adamw(model)
    opt.load_state_dict(opt_state)
    train(model, opt, run.stream(start=start), steps, lambda k: one_minus_sqrt(k, steps))
    return model


def twa_run(run: Seed, window, split, steps, start, recipe=(DEFAULT_START, DEFAULT_END), paper=False):
    """TWA over ``window`` for ``steps`` on ``split``: by the benchmarks' recipe (``recipe`` = (start, end)
    for its variants), or with ``paper=True`` the paper's protocol (from the centre, step decay)."""
    model = run.model(window[-1])
    space = twa.Subspace.from_checkpoints(model, window, bits=4, progress=False)
    if paper:
        opt = twa.ProjectedAdamW(model.parameters(), space, init="center")
        sched = twa.step_decay(opt, steps)
    else:
        opt = TWARun(model, space, steps, run.start_loss(split), start=recipe[0], end=recipe[1])
        sched = None
    batches = run.stream(split, start=start if split == "train" else 0, salt=0 if split == "train" else 1)
    model.train()
    for _ in range(steps):
        xb, yb = next(batches)
        opt.zero_grad()
        loss_of(model, xb, yb).backward()
        opt.step()
        if sched is not None:
            sched.step()
    if not paper:
        opt.finish()
    return model


def at_point(run: Seed, ckpts, state, opt_state, t, every) -> dict:
    """Every method at step t of the stable run: {name: {val, test, train, passes, seconds}}."""
    out = {}

    def record(name, model, passes, seconds):
        out[name] = dict(run.evaluate(model), passes=passes, seconds=seconds)

    record("raw checkpoint", run.model(state), 0, 0.0)
    for frac in COOLDOWNS:
        steps = round(frac * t)
        with Timer() as tm:
            model = cooldown(run, state, opt_state, t, steps)
        record(f"cooldown 1−sqrt {frac:.0%}", model, steps, tm.seconds)
    merges = {}
    for k in WINDOWS:
        window = [ckpts[s] for s in range(t - (k - 1) * every, t + 1, every)]
        for family in twa.DECAY_FAMILIES:
            with Timer() as tm:
                merged = twa.weighted_mean(window, twa.decay_merge_weights(k, family))
            name = f"WSM {family}, last {k}" + (" (= LAWA)" if family == "linear" else "")
            record(name, run.model(merged), 0, tm.seconds)
            merges[name] = merged
        if k == max(WINDOWS):
            with Timer() as tm:
                merged = twa.ema(window, EMA_GAMMA)
            record(f"EMA (γ={EMA_GAMMA}), last {k}", run.model(merged), 0, tm.seconds)
            merges[f"EMA (γ={EMA_GAMMA}), last {k}"] = merged
    twa_steps = max(1, round(TWA_BUDGET * t))
    twa_points = {}
    for k in WINDOWS:
        window = [ckpts[s] for s in range(t - (k - 1) * every, t + 1, every)]
        for variant, split in (("TWA-t", "train"), ("TWA-v", "val")):
            with Timer() as tm:
                model = twa_run(run, window, split, twa_steps, t)
            record(f"{variant}, last {k}", model, twa_steps, tm.seconds)
            if variant == "TWA-t":
                twa_points[f"{variant}, last {k}"] = params(model)
        for recipe in VARIANTS:  # the recipe's other starts and ends, for TWA-t: how its defaults were chosen
            with Timer() as tm:
                model = twa_run(run, window, "train", twa_steps, t, recipe=recipe)
            record(f"TWA-t{recipe_label(*recipe)}, last {k}", model, twa_steps, tm.seconds)
    # the hybrids start from points chosen on the validation split, never the test split
    best_twa = min(twa_points, key=lambda n: out[n]["val"])
    best_merge = min(merges, key=lambda n: out[n]["val"])
    for frac in HYBRID_COOLDOWNS:
        steps = round(frac * t)
        # named by role (which point was best differs by seed); the point itself is recorded in "from"
        for label, name, start_state in (("best TWA-t", best_twa, twa_points[best_twa]),
                                         ("best fixed merge", best_merge, merges[best_merge])):
            with Timer() as tm:
                model = cooldown(run, start_state, opt_state, t, steps)
            base = out[name]
            record(f"{label} + cooldown {frac:.1%}", model, base["passes"] + steps, base["seconds"] + tm.seconds)
            out[f"{label} + cooldown {frac:.1%}"]["from"] = name
    return out


def schedule_free(run: Seed, points):
    """Schedule-free AdamW for S steps, read in its evaluation mode at each point."""
    import schedulefree

    S = run.cfg["steps"]
    model = run.model()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                         warmup_steps=max(1, int(WARMUP * S)))
    out = {}
    batches = run.stream()
    t0 = time.perf_counter()
    model.train()
    opt.train()
    for k in range(1, S + 1):
        xb, yb = next(batches)
        opt.zero_grad()
        loss_of(model, xb, yb).backward()
        opt.step()
        if k in points:
            opt.eval()
            out[k] = dict(run.evaluate(model), passes=0, seconds=time.perf_counter() - t0)
            opt.train()
            model.train()
    return out


def step_protocol(run: Seed) -> dict:
    """(b): the paper's head-stage claim on this model."""
    S = run.cfg["steps"]

    def step_lr(steps):
        warm = warmup_constant(steps)
        return lambda k: warm(k) * (1.0 if k < steps // 2 else 0.1 if k < 3 * steps // 4 else 0.01)

    every = (S // 2) // STEP_CHECKPOINTS
    model, ckpts = run.model(), []

    def on_step(k, m):
        if k % every == 0 and len(ckpts) < STEP_CHECKPOINTS:
            ckpts.append(params(m))

    out = {}
    with Timer() as tm:
        train(model, adamw(model), run.stream(), S, step_lr(S), on_step)
    out[f"full step-lr run, {S} steps"] = dict(run.evaluate(model), passes=S, seconds=tm.seconds)
    half = run.model()
    with Timer() as tm:
        train(half, adamw(half), run.stream(), S // 2, step_lr(S // 2))
    out[f"half-budget step-lr run, {S // 2} steps"] = dict(run.evaluate(half), passes=S // 2, seconds=tm.seconds)
    first_half = every * STEP_CHECKPOINTS
    out[f"last checkpoint (step {first_half})"] = dict(run.evaluate(run.model(ckpts[-1])), passes=first_half, seconds=0.0)
    out["SWA of the first half"] = dict(run.evaluate(run.model(twa.swa(ckpts))), passes=first_half, seconds=0.0)
    steps = max(1, round(STEP_TWA_BUDGET * S))
    for variant, split in (("TWA-t", "train"), ("TWA-v", "val")):
        with Timer() as tm:
            m = twa_run(run, ckpts, split, steps, first_half, paper=True)
        out[f"{variant} from the centre, step decay"] = dict(run.evaluate(m), passes=first_half + steps, seconds=tm.seconds)
    return out


# ---------------------------------------------------------------------------------------------- report
def table(per_seed):
    rows = [[k, mean_std([s[k]["val"] for s in per_seed], 3), mean_std([s[k]["test"] for s in per_seed], 3),
             f"{statistics.mean(s[k]['passes'] for s in per_seed):.0f}",
             f"{statistics.mean(s[k]['seconds'] for s in per_seed):.1f}"] for k in per_seed[0]]
    return markdown_table(["method", "validation bpc", "test bpc", "extra passes", "wall s"], rows)


def verdicts(per_seed, t) -> list[str]:
    """Per seed and window: TWA-v against the best fixed merge of the same window (validation), and the
    best TWA-v against the 10 % cooldown (test)."""
    lines = []
    cool = f"cooldown 1−sqrt {COOLDOWNS[0]:.0%}"
    for seed, s in enumerate(per_seed):
        for k in WINDOWS:
            fixed = [n for n in s if n.startswith(("WSM", "EMA")) and "cooldown" not in n
                     and n.split(", last ")[1].split(" ")[0] == str(k)]
            best = min(fixed, key=lambda n: s[n]["val"])
            got = s[f"TWA-v, last {k}"]["val"]
            lines.append(f"t = {t}, seed {seed}, last {k}: TWA-v val {got:.3f} vs best fixed merge ({best}) "
                         f"{s[best]['val']:.3f}: {'met' if got <= s[best]['val'] else 'NOT met'}")
        name = min((f"TWA-v, last {k}" for k in WINDOWS), key=lambda n: s[n]["val"])
        lines.append(f"t = {t}, seed {seed}: {name} (best TWA-v by val) test {s[name]['test']:.3f} with "
                     f"{s[name]['passes']} passes vs the {cool} {s[cool]['test']:.3f} with {s[cool]['passes']} "
                     f"(difference {s[name]['test'] - s[cool]['test']:+.3f})")
    return lines


def window_merges(names, k) -> list[str]:
    """The fixed merges of the last ``k`` checkpoints: every WSM and EMA merge of a window of at most k
    (a window of 5 lies inside the last 10), and the raw checkpoint."""
    def size(n):
        return int(n.split(", last ")[1].split(" ")[0])
    return ["raw checkpoint"] + [n for n in names if n.startswith(("WSM", "EMA")) and "cooldown" not in n
                                 and size(n) <= k]


def never_behind(per_seed, t) -> dict:
    """Per window: TWA-t's and TWA-v's test bpc against the best fixed merge of the same checkpoints."""
    return {str(k): test_targets(per_seed, window_merges(per_seed[0], k), (f"TWA-t, last {k}", f"TWA-v, last {k}"),
                                 "bpc") for k in WINDOWS}


def plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(6.5 * len(points), 4.5), squeeze=False)
    for ax, (t, per_seed) in zip(axes[0], points.items()):
        groups = {"raw": "k", "cooldown": "tab:red", "WSM": "tab:blue", "EMA": "tab:cyan", "TWA-t": "tab:green",
                  "TWA-v": "tab:olive", "+ cooldown": "tab:purple", "schedule-free": "tab:orange"}
        for name in per_seed[0]:
            group = next((g for g in ("+ cooldown", "schedule-free", "cooldown", "WSM", "EMA", "TWA-t", "TWA-v", "raw")
                          if g in name), "raw")
            x = statistics.mean(s[name]["passes"] for s in per_seed)
            ys = [s[name]["test"] for s in per_seed]
            ax.errorbar([x], [statistics.mean(ys)], yerr=[statistics.stdev(ys) if len(ys) > 1 else 0.0],
                        marker="o", color=groups[group], capsize=2, markersize=4)
        for g, color in groups.items():
            ax.plot([], [], "o", color=color, label=g)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("extra forward+backward passes beyond the stable run")
        ax.set_ylabel("test bits per character")
        ax.set_title(f"at step t = {t} of the stable phase (mean ± std over seeds)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args, cfg, device, split, vocab, data_record = text_benchmark(argv, __doc__, FULL, QUICK)
    S = cfg["steps"]
    points = (S // 2, S)
    results = {t: [] for t in points}
    protocol, run_seconds = [], []
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "wsd_partial.json")
    for seed in tqdm(range(cfg["seeds"]), desc="wsd", unit="seed"):
        run = Seed(split, vocab, cfg, seed)
        ckpts, at, every, seconds = stable_run(run)
        run_seconds.append(seconds)
        sf = schedule_free(run, points)
        for t in points:
            res = at_point(run, ckpts, *at[t], t, every)
            res["schedule-free AdamW (its own run of t steps)"] = sf[t]
            results[t].append(res)
        protocol.append(step_protocol(run))
        # what finished survives a later failure (removed once the results are saved)
        with open(partial, "w") as f:
            json.dump({"config": cfg, "seeds_done": seed + 1, "points": {str(t): results[t] for t in points},
                       "step_protocol": protocol, "stable_run_seconds": run_seconds}, f)
    env = environment(device)
    params_count = sum(p.numel() for p in Seed(split, vocab, cfg, 0).model().parameters())
    lines = {t: verdicts(results[t], t) for t in points}
    behind = {t: never_behind(results[t], t) for t in points}
    md = (f"Warmup-stable-decay on pydoc_data.topics ({data_record['characters']:,} characters; {cfg['seeds']} seed(s); "
          f"{'quick smoke test, not a measurement; ' if args.quick else ''}{env['device']}; torch {env['torch']}; "
          f"commit {str(env['commit'])[:10]}; {env['date']})\n\n"
          f"Model: causal transformer, {params_count:,} parameters (width {cfg['width']}, {cfg['layers']} layers, context "
          f"{cfg['context']}). Stable run: AdamW lr {LR}, warm-up {WARMUP:.0%}, then constant, {S} steps "
          f"({statistics.mean(run_seconds):.0f} s), a checkpoint every {S // CHECKPOINTS} steps. TWA by the "
          f"benchmarks' recipe (start: the best fixed merge of the window by twa.best_start on the data TWA trains "
          f"on; ProjectedAdamW with its defaults, 4 bits; end: the average of the second half's iterates), "
          f"{TWA_BUDGET:.1%} of t steps; rows '(start X, end Y)' are its variants, '(start last, end last)' the "
          f"earlier default. Extra passes: forward+backward steps beyond "
          f"the stable run up to t.\n\n"
          + "".join(f"(a) at t = {t}\n\n" + table(results[t]) + "\n" for t in points)
          + "Targets:\n\n" + "\n".join(f"- {line}" for t in points for line in lines[t]) + "\n\n"
          + "Never behind a free merge (test bpc ≤ the best fixed merge of the window's checkpoints + 2σ of the "
            "seed noise):\n\n"
          + "".join(f"t = {t}, last {k}:\n\n" + describe_test_targets(behind[t][str(k)]) + "\n\n"
                    for t in points for k in WINDOWS)
          + f"(b) the paper's protocol: step lr, {STEP_CHECKPOINTS} checkpoints of the first half, TWA from the "
            f"centre with step decay for {STEP_TWA_BUDGET:.0%} of S (passes: all steps spent)\n\n"
          + table(protocol) + "\n")
    print(md)
    path = save("wsd" + ("_quick" if args.quick else ""), device,
                {"config": cfg, "data": data_record, "parameters": params_count,
                 "points": {str(t): results[t] for t in points}, "step_protocol": protocol,
                 "targets": {str(t): lines[t] for t in points},
                 "test_targets": {str(t): behind[t] for t in points}, "stable_run_seconds": run_seconds}, md,
                out_dir=args.out_dir)
    plot(results, path[:-5] + ".png")
    os.remove(partial)
    print(f"saved {path}, {path[:-5]}.png")


if __name__ == "__main__":
    main()
