"""How far the GPU code is from its last GPU test pass.

    python -m benchmarks.gpu_record          # the commit whose GPU tests last passed, and what changed since

``benchmarks/results/gpu_tests_last_passed.json`` names the commit, device and date of the last run in which
the GPU tests passed (``gpu_first_light.sh`` writes ``gpu_tests_last_passed.json`` into its output folder
when they pass; commit it here). This prints how many commits since have touched ``csrc/`` or
``twa_kernels/backends/``, the code those tests cover.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "gpu_tests_last_passed.json"
GPU_CODE = ("csrc", "twa_kernels/backends")


def last_pass(path: Path = RECORD) -> dict:
    return json.loads(path.read_text())


def commits_since(commit: str, paths=GPU_CODE) -> int | None:
    """Commits after ``commit`` that touch ``paths`` (None where git or the commit is not at hand)."""
    try:
        out = subprocess.run(["git", "rev-list", "--count", f"{commit}..HEAD", "--", *paths], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return int(out.stdout.strip())


def main() -> None:
    record = last_pass()
    since = commits_since(record["commit"])
    print(f"GPU tests last passed at commit {record['commit'][:10]} on {record['device']} ({record['date']}): "
          f"{record['result']}; " + ("git is not at hand here" if since is None else
                                     f"{since} commit(s) since have touched {' or '.join(GPU_CODE)}"))


if __name__ == "__main__":
    main()
