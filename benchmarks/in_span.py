"""What every quality benchmark compares TWA with: the fixed merges a user could take instead from the
same checkpoints. Each lies in TWA's subspace, so TWA-t (which minimises the training loss there)
should end at or below each one's training loss, and TWA-v at or below each one's validation loss.
"""

from __future__ import annotations

import statistics
from typing import Callable

import twa_kernels as twa

LAWA_KS = (2, 4, 8)


def baseline_names(ema_gamma: float) -> tuple[str, ...]:
    return ("last checkpoint", *(f"LAWA (k={k})" for k in LAWA_KS), f"EMA (γ={ema_gamma})", "SWA")


def in_span_baselines(ckpts, score: Callable[[dict], dict], ema_gamma: float) -> dict:
    """``score(state_dict)`` for the last checkpoint, LAWA over the last 2, 4, 8, EMA and SWA."""
    merges = [ckpts[-1], *(twa.lawa(ckpts, k) for k in LAWA_KS), twa.ema(ckpts, ema_gamma), twa.swa(ckpts)]
    return {name: score(state) for name, state in zip(baseline_names(ema_gamma), merges)}


def targets(per_seed, baselines, pairs, unit: str) -> list[str]:
    """Per seed and ``(method, metric)`` pair: the method's loss against the best in-span baseline's
    (lower is better), and whether the target is met."""
    lines = []
    for seed, s in enumerate(per_seed):
        for method, metric in pairs:
            best = min(baselines, key=lambda k: s[k][metric])
            got = s[method][metric]
            lines.append(f"seed {seed}: {method} {metric} {unit} {got:.4g} vs best in-span baseline ({best}) "
                         f"{s[best][metric]:.4g}: {'met' if got <= s[best][metric] else 'NOT met'}")
    return lines


def test_targets(per_seed, baselines, methods, unit: str) -> dict:
    """The never-behind-a-free-merge target on the **test** split: per seed, each method's test loss against
    the best fixed merge's (the lowest test loss among ``baselines``: an oracle no user has, so the hardest
    comparison), met when the difference is at most 2σ, σ the standard deviation over seeds of that best
    merge's test loss (the seed noise). Returns {"lines": [...], "summary": {method: {...}}}."""
    best_tests = [min(s[k]["test"] for k in baselines) for s in per_seed]
    sigma = statistics.stdev(best_tests) if len(best_tests) > 1 else 0.0
    lines, summary = [], {}
    for method in methods:
        diffs = []
        for seed, s in enumerate(per_seed):
            best = min(baselines, key=lambda k: s[k]["test"])
            diff = s[method]["test"] - s[best]["test"]
            diffs.append(diff)
            lines.append(f"seed {seed}: {method} test {unit} {s[method]['test']:.4g} vs best fixed merge ({best}) "
                         f"{s[best]['test']:.4g}: {diff:+.4f} ({'met' if diff <= 2 * sigma else 'NOT met'}, "
                         f"2σ = {2 * sigma:.4f})")
        summary[method] = {"mean_difference": statistics.mean(diffs),
                           "std_difference": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                           "two_sigma": 2 * sigma, "met_every_seed": all(d <= 2 * sigma for d in diffs),
                           "below_in_mean": statistics.mean(diffs) < 0}
    return {"lines": lines, "summary": summary}


def describe_test_targets(goals: dict) -> str:
    """Markdown lines of :func:`test_targets`' result."""
    out = [f"- {line}" for line in goals["lines"]]
    for method, s in goals["summary"].items():
        out.append(f"- {method}: mean difference {s['mean_difference']:+.4f} ± {s['std_difference']:.4f} "
                   f"({'below' if s['below_in_mean'] else 'above'} the best fixed merge in the mean; "
                   f"{'within' if s['met_every_seed'] else 'NOT within'} 2σ in every seed)")
    return "\n".join(out)


def describe_starts(per_seed) -> str:
    """Which fixed merge best_start chose for each TWA run, per seed (from each result's "starts")."""
    lines = []
    for seed, s in enumerate(per_seed):
        chosen = ", ".join(f"{name}: {rec['start']}" for name, rec in s.get("starts", {}).items()
                           if isinstance(rec, dict) and "start" in rec)
        lines.append(f"- seed {seed}: {chosen}")
    return "\n".join(lines)


def score_rows(per_seed) -> list[str]:
    """The keys of a per-seed result that hold scores (not records such as the starts chosen)."""
    return [k for k, v in per_seed[0].items() if isinstance(v, dict) and "test" in v]


def plot_twa_curves(regimes, baselines, path, ylabel: str, label: str = "TWA-t (defaults), 4 bits"):
    """Train loss against TWA-t step (mean over seeds) with the in-span baselines as horizontal lines;
    ``regimes``: (title, per-seed results, per-seed [(step, train loss)] curves) for each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4), squeeze=False)
    for ax, (title, per_seed, curves) in zip(axes[0], regimes):
        xs = [x for x, _ in curves[0]]
        ax.plot(xs, [statistics.mean(c[i][1] for c in curves) for i in range(len(xs))], "o-", color="black",
                markersize=3, label=label)
        for k, color in zip(baselines, plt.cm.tab10.colors):
            ax.axhline(statistics.mean(s[k]["train"] for s in per_seed), color=color, linestyle="--", label=k)
        ax.set_xlabel("TWA step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
