"""What ``backend="auto"`` takes on a GPU, from measurements: the fastest backend that was measured correct
on that device family, read from a committed record (``cuda_measured.json`` beside this file).

A record comes from ``benchmarks.kernel_variants`` on a lent GPU (``benchmarks.gpu_suite`` writes it as
``cuda_measured_record.json`` into its output folder; committing it here is a person's decision). Each
backend's row is the engine ``make_engine`` builds for it, timed for one projection step (Pᵀg and Pβ) at
the headline shape, and counted correct when its results are within ``RTOL`` of the torch reference.
Until a family has a record, ``auto`` keeps the order written in code, and ``twa backends`` says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RECORD_FILE = Path(__file__).with_name("cuda_measured.json")
# fp32 accumulation over D = 25.6M elements in different orders (blocked sums vs. the reference's matmul):
# measured 4e-7 (Triton) and 2e-6 (CUDA) at 6602335; 1e-5 admits that, not a wrong result (which is O(1)).
RTOL = 1e-5
DEFAULT_SUFFIX = " (as auto builds it)"


def device_family(name: str) -> str:
    """The family a device name belongs to: its model number ("NVIDIA H100 80GB HBM3" → "H100")."""
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return m.group(1) if m else name.strip()


def record_from_kernel_variants(payload: dict, device: str, commit: str | None, date: str | None) -> dict:
    """A record from a ``kernel_variants`` run: for every backend it timed as auto builds it, the
    seconds of one step and whether it was correct."""
    backends = {}
    for row in payload["rows"]:
        name = row.get("backend")
        if not name:
            continue
        errors = [e for e in (row.get("rel_err_c"), row.get("rel_err_dw")) if e is not None]
        backends[name] = {"step_s": row["step_s"], "correct": bool(errors) and max(errors) <= RTOL,
                          "rel_err": max(errors) if errors else None}
    return {"family": device_family(device), "device": device, "commit": commit, "date": date,
            "shape": payload.get("shape"), "backends": backends}


def load_records(path: Path | str | None = None) -> dict[str, dict]:
    """Records by device family; none when the file does not exist (no GPU has been measured)."""
    path = Path(path) if path is not None else RECORD_FILE
    if not path.exists():
        return {}
    records = json.loads(path.read_text())["records"]
    return {r["family"]: r for r in records}


def measured_order(device_name: str, path: Path | str | None = None) -> tuple[list[str], dict] | None:
    """(backends fastest first among those measured correct, the record) for this device's family, or
    None when the family has no record."""
    record = load_records(path).get(device_family(device_name))
    if record is None:
        return None
    correct = [(v["step_s"], k) for k, v in record["backends"].items() if v["correct"]]
    return [k for _, k in sorted(correct)], record
