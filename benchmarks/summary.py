"""README's results summary, computed from the committed result files (so that no figure in it can go
stale: ``tests/test_readme.py`` checks that README holds exactly what this computes).

    python -m benchmarks.update_readme     # writes it into README.md, and the tables into docs/results.md
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SOURCES = {"text": "quality_text_cpu.json", "wsd": "wsd_cpu.json", "soups": "soups_cpu.json",
           "digits": "quality_cpu.json", "table13": "table13_cpu.json", "fit": "fit_soup_cpu.json",
           "kernels": "kernel_variants_n60_b4_H100_80GB_HBM3_first.json"}


def load(name: str) -> dict:
    return json.loads((RESULTS / SOURCES[name]).read_text())


def link(name: str) -> str:
    return f"[{SOURCES[name]}](benchmarks/results/{SOURCES[name]})"


def mean(xs) -> float:
    return statistics.mean(xs)


def versus_best_merge(per_seed, method: str, baselines) -> tuple[float, float, str, int]:
    """(TWA's mean test loss, the best fixed merge's mean — per seed the lowest test loss among
    ``baselines`` —, that merge's most frequent name, seeds where TWA is lower)."""
    best = [min(baselines, key=lambda k: s[k]["test"]) for s in per_seed]
    names = statistics.mode(best)
    below = sum(s[method]["test"] < s[b]["test"] for s, b in zip(per_seed, best))
    return mean(s[method]["test"] for s in per_seed), mean(s[b]["test"] for s, b in zip(per_seed, best)), names, below


def text_rows() -> list[list[str]]:
    data = load("text")
    baselines = ("last checkpoint", "LAWA (k=2)", "LAWA (k=4)", "LAWA (k=8)", "EMA (γ=0.7)", "SWA")
    rows = []
    for regime, label in (("head_stage", "early part of a run (12 checkpoints)"),
                          ("stable_phase", "stable phase at a constant lr (10 checkpoints)")):
        twa, best, name, below = versus_best_merge(data[regime], "TWA-v, 4 bits", baselines)
        seeds = len(data[regime])
        rows.append([f"Char LM, {label}: test bits/char", f"TWA-v **{twa:.3f}**",
                     f"the best fixed merge, mostly {name}: {best:.3f}; TWA lower in {below}/{seeds} seeds",
                     link("text")])
    return rows


def wsd_rows() -> list[list[str]]:
    data = load("wsd")
    rows = []
    t = max(data["points"], key=int)
    per_seed = data["points"][t]
    for k in (20,):
        merges = [n for n in per_seed[0] if n.startswith(("WSM", "EMA")) and "cooldown" not in n
                  and int(n.split(", last ")[1].split(" ")[0]) <= k] + ["raw checkpoint"]
        twa, best, name, below = versus_best_merge(per_seed, f"TWA-v, last {k}", merges)
        cool = mean(s["cooldown 1−sqrt 10%"]["test"] for s in per_seed)
        rows.append([f"Warmup-stable-decay, end of the stable phase (last {k} checkpoints): test bits/char",
                     f"TWA-v **{twa:.3f}**",
                     f"the best fixed merge, mostly {name.replace(' (= LAWA)', '')}: {best:.3f}; TWA lower in "
                     f"{below}/{len(per_seed)} seeds; a real 10 % cooldown (more passes): {cool:.3f}", link("wsd")])
    return rows


def soups_rows() -> list[list[str]]:
    data = load("soups")
    sizes = sorted(data["by_n"], key=int)
    big, small = data["by_n"][sizes[-1]], data["by_n"][sizes[0]]
    n, m = int(sizes[-1]), int(sizes[0])
    twa = mean(s["TWA-v"]["test"] for s in big)
    greedy = mean(s["greedy soup"]["test"] for s in big)
    single = mean(s["best single (by val)"]["test"] for s in big)
    learned = mean(s["learned soup by layer"]["test"] for s in big)
    below = sum(s["TWA-v"]["test"] < s["greedy soup"]["test"] for s in big)
    few = mean(s["TWA-v"]["test"] for s in small)
    few_below = sum(a["TWA-v"]["test"] <= b["greedy soup"]["test"] for a, b in zip(small, big))
    return [[f"Soup of {n} fine-tunes: test bits/char", f"TWA-v **{twa:.3f}**",
             f"greedy soup {greedy:.3f} (TWA lower in {below}/{len(big)} seeds), best single {single:.3f}, "
             f"learned soup {learned:.3f}", link("soups")],
            [f"Soup: {m} fine-tunes against greedy soup over {n}", f"TWA-v with {m}: {few:.3f}",
             f"greedy soup with {n}: {greedy:.3f} (TWA with {n // m}× fewer at or below it in {few_below}/"
             f"{len(big)} seeds)", link("soups")]]


def fit_rows() -> list[list[str]]:
    data = load("fit")
    cells, rivals = [], []
    for setting, label in (("same distribution", "val and eval from one held-out text"),
                           ("shifted", "from different parts of the text")):
        runs = [r[setting] for r in data["runs"]]
        diffs = data["written_minus_best_of_single_and_greedy"][setting]
        written = mean(r["eval"]["written"]["loss"] for r in runs)
        rival = mean(min(r["eval"][k]["loss"] for k in ("best single", "greedy soup")) for r in runs)
        cells.append(f"{label}: **{written:.3f}**")
        rivals.append(f"{rival:.3f} (written model lower in {sum(d < 0 for d in diffs)}/{len(diffs)} seeds)")
    return [["`twa fit` with its defaults, 6 fine-tunes of a small Llama: eval nats/token", " · ".join(cells),
             "the better of best single and greedy soup: " + " · ".join(rivals), link("fit")]]


def digits_rows() -> list[list[str]]:
    data = load("digits")
    baselines = ("last checkpoint", "LAWA (k=2)", "LAWA (k=4)", "LAWA (k=8)", "EMA (γ=0.5)", "SWA")
    cells = []
    for key, arch in (("head_stage", "MLP"), ("head_stage_cnn", "CNN")):
        twa, best, _, below = versus_best_merge(data[key], "TWA-v", baselines)
        acc = mean(100 * s["TWA-v"]["test_acc"] for s in data[key])
        cells.append((arch, twa, best, below, acc))
    return [["Digits (saturated, 1,078 training images): test cross-entropy",
             " · ".join(f"{a} {t:.4f}" for a, t, _, _, _ in cells),
             "best fixed merge " + " · ".join(f"{a} {b:.4f}" for a, _, b, _, _ in cells)
             + ": **TWA higher** (accuracy " + " · ".join(f"{a} {acc:.1f} %" for a, _, _, _, acc in cells) + ")",
             link("digits")]]


def cost_rows() -> list[list[str]]:
    t13 = load("table13")
    row = next(r for r in t13["rows"] if r["config"] == "twa_4bit" and r["gpus"] == 1)
    rows = []
    if "ratio" in row:
        q = row["ratio"]
        rows.append(["Cost on a 2-core CPU (small CNN, n = 10, 4 bits): step time vs SGD",
                     f"{q['median_pct']:+.1f} % [{q['p10_pct']:+.1f}, {q['p90_pct']:+.1f}]"
                     + (" (within noise)" if q["within_noise"] else ""),
                     f"peak memory {row['memory_vs_sgd_pct']:+.1f} %; the paper: +5.3 % / +3.7 % on an A100",
                     link("table13")])
    k = load("kernels")
    fastest = min((r for r in k["rows"] if r["variant"].startswith("triton")), key=lambda r: r["step_s"])
    torch_ref = next(r for r in k["rows"] if r["variant"] == "torch reference")
    rows.append(["Projection step on an H100 (D = 25.6M, n = 60, 4 bits)", f"**{1e3 * fastest['step_s']:.2f} ms**",
                 f"{100 * fastest['frac_copy']:.0f} % of copy bandwidth, {torch_ref['step_s'] / fastest['step_s']:.0f}× "
                 f"the torch reference", link("kernels")])
    return rows


def summary_rows() -> list[list[str]]:
    return text_rows() + wsd_rows() + soups_rows() + fit_rows() + digits_rows() + cost_rows()


def summary_markdown() -> str:
    rows = summary_rows()
    lines = ["| what | TWA | what you would take instead | from |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
