"""Put the latest benchmark tables (benchmarks/results/*.md, each headed with its device, commit and
date) into docs/results.md between the results markers, with the command that reproduces each, and
README's results summary (computed from the result JSON files, see :mod:`benchmarks.summary`) between
the summary markers.

    python -m benchmarks.update_readme
"""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SECTIONS = [  # (file prefix, title, command)
    ("table13", "Table 13: cost of TWA beside SGD", "python -m benchmarks.table13"),
    ("roofline_headline", "Projection step at ResNet-50 size (D = 25.6M, n = 60, 4 bits)",
     "python -m benchmarks.roofline --headline"),
    ("roofline", "Projection-step roofline sweep", "python -m benchmarks.roofline"),
    ("kernel_variants", "GPU kernel variants at ResNet-50 size (H100)", "python -m benchmarks.kernel_variants"),
    ("distributed", "Distributed modes: communication and memory at ResNet-50 size", "python -m benchmarks.distributed"),
    ("quality_text", "Quality on text: head-stage TWA on a character-level language model",
     "python -m benchmarks.quality_text"),
    ("wsd", "Warmup-stable-decay: merging and TWA in place of the cooldown", "python -m benchmarks.wsd"),
    ("soups", "Soups of fine-tunes", "python -m benchmarks.soups"),
    ("fit_soup", "twa fit on a soup of Hugging Face fine-tunes", "python -m benchmarks.fit_soup"),
    ("quality", "Quality on scikit-learn digits", "python -m benchmarks.quality"),
    ("streaming", "Streaming construction", "python -m benchmarks.streaming"),
]


def main():
    parts = []
    files = sorted(os.listdir(RESULTS))
    for prefix, title, command in SECTIONS:
        pattern = re.compile(rf"^{prefix}_(?!headline)[^_]*(_[a-z0-9]+)?\.md$" if prefix == "roofline"
                             else rf"^{prefix}_.*\.md$")
        longer = [q for q, _, _ in SECTIONS if q != prefix and q.startswith(prefix + "_")]  # quality_text vs quality
        for name in (f for f in files if pattern.match(f) and not any(f.startswith(q + "_") for q in longer)):
            with open(os.path.join(RESULTS, name)) as f:
                body = f.read().strip()
            pngs = [p for p in files if p.startswith(name[:-3]) and p.endswith(".png")]
            images = "".join(f"\n\n![{p}](../benchmarks/results/{p})" for p in pngs)
            parts.append(f"### {title}\n\n`{command}` → "
                         f"[benchmarks/results/{name[:-3]}.json](../benchmarks/results/{name[:-3]}.json)\n\n{body}{images}\n")
    replace_between(os.path.join(ROOT, "docs", "results.md"), "<!-- results:start -->", "<!-- results:end -->",
                    "\n" + "\n".join(parts))
    from benchmarks.summary import summary_markdown

    replace_between(os.path.join(ROOT, "README.md"), "<!-- summary:start -->", "<!-- summary:end -->",
                    "\n" + summary_markdown())
    print(f"docs/results.md: {len(parts)} result tables; README.md: the results summary")


def replace_between(path: str, start: str, end: str, body: str) -> None:
    with open(path) as f:
        text = f.read()
    new = text[: text.index(start) + len(start)] + body + text[text.index(end):]
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    main()
