"""README and docs keep their promises: the README stays short, its results summary is exactly what the
committed result files say, and no link or path in any page points at a file that does not exist."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md")),
         ROOT / "twa_kernels" / "backends" / "README.md"]
TOP = ("twa_kernels/", "benchmarks/", "docs/", "tests/", "csrc/", ".ci/")


def test_the_readme_is_read_in_five_minutes():
    assert len(README.read_text()) <= 15_000


def test_the_results_summary_is_what_the_result_files_say():
    from benchmarks.summary import summary_markdown

    text = README.read_text()
    block = text[text.index("<!-- summary:start -->") + len("<!-- summary:start -->"):text.index("<!-- summary:end -->")]
    assert block.strip() == summary_markdown().strip(), "run: python -m benchmarks.update_readme"


def test_the_strings_ci_and_tests_read_stay():
    text = README.read_text()
    assert re.search(r"## Quickstart\s+```python\n", text)
    assert "<!-- install:start -->" in text and "<!-- install:end -->" in text
    install = text[text.index("<!-- install:start -->"):text.index("<!-- install:end -->")]
    assert len(re.findall(r"^pip install", install, re.M)) >= 2


def targets(page: Path):
    """(what the page names, the path it resolves to) for every relative link and backticked repo path."""
    text = page.read_text()
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1).split("#")[0]
        if target and not re.match(r"[a-z]+:", target):
            yield target, (page.parent / target)
    for m in re.finditer(r"`([^`\s]+)`", text):
        name = m.group(1).rstrip(".,;:")
        if name.startswith(TOP) and not any(c in name for c in "*{}<>$|") and "=" not in name:
            yield name, ROOT / name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_exists(page):
    missing = sorted({name for name, path in targets(page) if not path.exists()})
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


def test_no_page_talks_about_how_the_work_was_organised():
    talk = re.compile(r"the issue|this session|next session|the work was to be done|one command may take|"
                      r"shared the CPU with the test suite|closing note", re.I)
    found = [(str(p.relative_to(ROOT)), m.group(0)) for p in PAGES for m in talk.finditer(p.read_text())]
    assert not found, found
