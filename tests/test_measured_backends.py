"""backend="auto" on a GPU from a committed measurement: the fastest backend measured correct on the
device's family, and the written order until a record exists."""

import json

import pytest

from twa_kernels.backends import PREFERENCE, measured


@pytest.mark.parametrize("name,family", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"),
                                         ("NVIDIA A100-SXM4-40GB", "A100"), ("NVIDIA L40S", "L40S")])
def test_device_family(name, family):
    assert measured.device_family(name) == family


def kernel_variants_payload():
    row = dict(project_s=0.0, expand_s=0.0, frac_copy=0.5)
    return {"shape": {"D": 25_557_032, "n": 60, "bits": 4}, "rows": [
        dict(row, variant="torch reference", backend="torch", step_s=0.3, rel_err_c=0.0, rel_err_dw=0.0),
        dict(row, variant="triton (as auto builds it)", backend="triton", step_s=1.1e-3, rel_err_c=4e-7, rel_err_dw=4e-7),
        dict(row, variant="triton_plane (as auto builds it)", backend="triton_plane", step_s=0.8e-3,
             rel_err_c=3e-7, rel_err_dw=3e-7),
        dict(row, variant="cuda_plane (as auto builds it)", backend="cuda_plane", step_s=0.5e-3,
             rel_err_c=0.2, rel_err_dw=3e-7),  # fastest, but wrong: never chosen
        dict(row, variant="triton tile=4096", backend=None, step_s=0.1e-3, rel_err_c=1e-7, rel_err_dw=1e-7),
    ]}


def test_auto_takes_the_fastest_backend_measured_correct_on_the_family(tmp_path):
    record = measured.record_from_kernel_variants(kernel_variants_payload(), "NVIDIA H100 80GB HBM3", "abc", "2026")
    assert record["family"] == "H100" and not record["backends"]["cuda_plane"]["correct"]
    assert "triton tile=4096" not in str(record["backends"])  # only the engines auto builds count
    path = tmp_path / "cuda_measured.json"
    path.write_text(json.dumps({"records": [record]}))
    order, got = measured.measured_order("NVIDIA H100 PCIe", path)
    assert order == ["triton_plane", "triton", "torch"] and got["commit"] == "abc"
    assert measured.measured_order("NVIDIA A100-SXM4-40GB", path) is None  # another family: no record


def test_without_a_record_auto_keeps_the_written_order(tmp_path):
    assert measured.load_records(tmp_path / "absent.json") == {}
    assert PREFERENCE["cuda"] == ("triton", "cuda", "torch")
    # a committed record parses and holds a measurement; without one, auto has nothing to read
    assert bool(measured.load_records()) == measured.RECORD_FILE.exists()
