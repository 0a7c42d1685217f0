"""The benchmark scripts and the README's quickstart run end to end (tiny sizes; results to tmp)."""

import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600, env=None):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_resnet50_definition_matches_torchvision_size():
    from benchmarks.models import ResNet

    model = ResNet()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert len(list(model.parameters())) == 161


def test_table13_small(tmp_path):
    out = run("-m", "benchmarks.table13", "--model", "small", "--batch", "2", "--image-size", "32",
              "--n", "3", "--warmup", "1", "--iters", "2", "--rounds", "1", "--gpus", "1", "2",
              "--out-dir", str(tmp_path))
    assert "Table 13 (CPU" in out and "one rank measured" in out
    data = json.loads(next(tmp_path.glob("table13_*.json")).read_text())
    configs = {(r["gpus"], r["config"]) for r in data["rows"]}
    assert {(1, "sgd"), (1, "twa_fp32"), (1, "twa_4bit"), (1, "twa_4bit_paper"), (2, "twa_4bit")} <= configs
    assert {r["coordinates"] for r in data["rows"] if r["config"] != "sgd"} == {"spread", "paper"}
    assert "optimizer step alone" in out and math.isfinite(data["spread_vs_paper"]["opt_step_pct"])
    for r in data["rows"]:
        assert r["time_s"] > 0 and r["peak_bytes"] > 0
    assert data["environment"]["commit"] and data["environment"]["device_type"] == "cpu"
    # on a CPU the times come from one process, steps interleaved: a ratio per round, with its spread
    for r in data["rows"]:
        q = r["ratio"]
        assert q["rounds"] == 2 and q["p10_pct"] <= q["median_pct"] <= q["p90_pct"]
        assert q["within_noise"] == (q["p10_pct"] <= 0 <= q["p90_pct"]) and r["time_vs_sgd_pct"] == q["median_pct"]
    sgd = next(r for r in data["rows"] if r["config"] == "sgd")
    assert sgd["ratio"]["median_pct"] == 0.0


def test_roofline_small(tmp_path):
    # Without the Triton interpreter: timing it over 161 layers takes minutes and says nothing (the
    # interpreter runs the kernels in the backend tests).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = run("-m", "benchmarks.roofline", "--quick", "--sizes", "20000", "--ns", "5", "--iters", "1",
              "--out-dir", str(tmp_path), env=env)
    assert "of copy" in out
    data = json.loads(next(tmp_path.glob("roofline_*.json")).read_text())
    backends = {r["backend"] for r in data["rows"]}
    assert "torch" in backends and "dense fp32 (torch matmul)" in backends
    if "cpp" in backends:  # both cpp kernels, timed in the same run, each saying which it is
        kernels = {r["backend"]: r["cpu_kernel"] for r in data["rows"] if r["backend"].startswith("cpp")}
        assert kernels["cpp (portable kernel)"] == "portable" and kernels["cpp"] in ("avx2", "portable")
    assert all(0 < r["frac_copy"] for r in data["rows"])
    assert next(tmp_path.glob("roofline_*.png")).stat().st_size > 0


def test_quality_smoke(tmp_path):
    out = run("-m", "benchmarks.quality", "--seeds", "1", "--epochs", "4", "--out-dir", str(tmp_path))
    assert "TWA-t" in out and "greedy soup" in out
    assert "in-span baseline" in out
    data = json.loads(next(tmp_path.glob("quality_*.json")).read_text())
    for head in (data["head_stage"][0], data["head_stage_cnn"][0]):
        assert {"last checkpoint", "LAWA (k=2)", "SWA", "TWA-t", "TWA-v"} <= set(head)
        for method, res in head.items():
            assert 0.0 <= res["test_acc"] <= 1.0 and 0.0 < res["train"] < math.log(10), method
    # the train-loss curve starts at the recipe's start, the best of the candidate merges on the training
    # data (the last checkpoint among them; 4-bit P̃ spans each only approximately), and ends at TWA-t's
    # reported train loss
    curve = data["twa_t_train_curves"]["MLP"][0]
    assert curve[0][0] == 0 and curve[0][1] <= 1.1 * data["head_stage"][0]["last checkpoint"]["train"]
    assert data["head_stage"][0]["TWA-t"]["start"] and data["head_stage"][0]["TWA-t"]["start_evaluations"] >= 3
    assert curve[-1][1] == pytest.approx(data["head_stage"][0]["TWA-t"]["train"], rel=1e-6)
    assert len(data["targets"]["CNN"]) == 2
    for suffix in ("alphas", "bits", "twa_steps"):
        assert len(list(tmp_path.glob(f"quality_*_{suffix}.png"))) == 1


def test_distributed_smoke(tmp_path):
    out = run("-m", "benchmarks.distributed", "--model", "small", "--n", "4", "--out-dir", str(tmp_path))
    assert "wire vs DDP SGD" in out
    data = json.loads(next(tmp_path.glob("distributed_*.json")).read_text())
    assert len(data["ranks"]) == 2
    for rank in data["ranks"]:
        assert set(rank) == {"ddp_sgd", "replicate", "rows", "columns", "fsdp_sgd", "fsdp_twa"}
        # replicate sends n·L numbers per step where DDP sends D: far less
        assert sum(rank["replicate"]["bytes_per_step"].values()) < sum(rank["ddp_sgd"]["bytes_per_step"].values()) / 10
        # under FSDP2, TWA moves what FSDP moves for SGD plus one all-reduce of n·L numbers
        sgd, twa_ = rank["fsdp_sgd"]["bytes_per_step"], rank["fsdp_twa"]["bytes_per_step"]
        assert {k: v for k, v in twa_.items() if k != "all_reduce"} == sgd
        assert twa_["all_reduce"] == rank["replicate"]["bytes_per_step"]["all_reduce"]


def test_streaming_smoke(tmp_path):
    out = run("-m", "benchmarks.streaming", "--model", "tiny", "--n", "3", "--dir", str(tmp_path / "ckpts"),
              "--out-dir", str(tmp_path / "out"))
    assert "Streaming construction" in out and not (tmp_path / "ckpts").exists()  # checkpoints removed
    data = json.loads(next((tmp_path / "out").glob("streaming_*.json")).read_text())
    assert data["environment"]["backends"]


def test_gpu_first_light_dry_run(tmp_path):
    pytest.importorskip("triton")  # here, not at import: a missing triton skips this test alone
    # The one command a lent GPU runs, in its small CPU form: every step runs and records itself, and the
    # kernel-variants step checks every variant (shipped and plane Triton kernels) against the reference.
    # (Its table13 step also stands for the main job's --quick run.)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TWA_COMMIT"] = "abc123"
    out = subprocess.run(["bash", "benchmarks/gpu_first_light.sh", str(tmp_path), "--dry-run"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env=dict(env, PYTHON=sys.executable))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["gpu tests", "kernel variants", "table13", "roofline"]
    assert all(s["status"] == "passed" for s in summary["steps"]) and summary["dry_run"]
    # the timing plan it prints sums to at most the 8 minutes one command may take on an H100
    total = int(re.search(r"\*\*total\*\* \| \*\*(\d+)\*\*", summary["plan"]).group(1))
    assert total <= 480 and "Timing plan" in out.stdout and "measured" in summary["plan"]
    record = json.loads((tmp_path / summary["record"]).read_text())["records"][0]
    assert record["dry_run"] and {"torch", "triton", "triton_plane"} <= set(record["backends"])
    assert all(b["correct"] for b in record["backends"].values())
    data = json.loads(next(tmp_path.glob("kernel_variants_*.json")).read_text())
    assert data["dry_run"] and data["environment"]["commit"] == "abc123"
    triton_rows = [r for r in data["rows"] if r["variant"].startswith("triton")]
    assert {r["variant"].split()[0] for r in triton_rows} == {"triton", "triton_plane"}
    assert all(r["rel_err_c"] < 1e-5 and r["rel_err_dw"] < 1e-5 for r in triton_rows)
    assert (tmp_path / "gpu_suite.md").read_text().count("| passed |") == 4
    assert {r["backend"] for r in data["rows"]} >= {"torch", "triton", "triton_plane", None}
    # its table13 step is the main job's quick form: it records which backend ran, and says so first
    table13 = json.loads((tmp_path / "table13_cpu.json").read_text())
    assert [r["gpus"] for r in table13["rows"]] == [1, 1, 1, 1]
    chosen = [r["name"] for r in table13["environment"]["backends"] if r["chosen"]]
    assert len(chosen) == 1 and next(r for r in table13["rows"] if r["config"] == "twa_4bit")["backend"] == chosen[0]
    assert (tmp_path / "table13.log").read_text().startswith("cpu: backend ")
    # the passing GPU tests are recorded by commit, for the distance of the GPU code from its last GPU run
    passed = json.loads((tmp_path / "gpu_tests_last_passed.json").read_text())
    assert passed["commit"] == "abc123" and passed["dry_run"] and passed["result"].strip()


def test_the_last_gpu_pass_is_recorded_and_its_distance_computed():
    from benchmarks.gpu_record import commits_since, last_pass

    record = last_pass()
    assert len(record["commit"]) == 40 and record["device"].startswith("NVIDIA") and not record["dry_run"]
    since = commits_since(record["commit"])
    assert since is None or since >= 0


def test_readme_quickstart_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"## Quickstart\s+```python\n(.*?)```", text, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "averaging weights of layer 0" in out.stdout
    # it starts at a fixed merge, ends lower, and saves an ordinary model
    start, end = (float(x) for x in re.search(r": ([\d.]+) -> TWA: ([\d.]+)", out.stdout).groups())
    assert end < start
    assert set(torch.load(tmp_path / "merged.pt", weights_only=True)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_readme_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "python -m benchmarks.table13" in text
    assert "TRITON_INTERPRET=1 python -m pytest -q -n auto tests" in text
    assert "TRITON_INTERPRET=1 python -m pytest -q -n auto tests" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("total", [161, 643, 644, 20_000, 1_000_000, 25_557_032])
def test_synthetic_layer_sizes(total):
    from twa_kernels.testing import layer_sizes_like_a_cnn

    sizes = layer_sizes_like_a_cnn(total)
    assert len(sizes) == 161 and sum(sizes) == total and min(sizes) >= 1
    with pytest.raises(ValueError, match="cannot split"):
        layer_sizes_like_a_cnn(100)


def test_kernel_variants_table_renders_from_its_json():
    # The committed GPU tuning run: the README table is a pure function of its JSON.
    from benchmarks.kernel_variants import render

    for path in (ROOT / "benchmarks" / "results").glob("kernel_variants_*.json"):
        data = json.loads(path.read_text())
        assert render(data["environment"], data) == path.with_suffix(".md").read_text()
        fastest = min((r for r in data["rows"] if r["rel_err_c"] is not None), key=lambda r: r["step_s"])
        assert fastest["rel_err_c"] < 1e-5 and fastest["rel_err_dw"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_kernel_variants_needs_a_gpu_or_a_small_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_variants"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode != 0 and "needs a CUDA device" in out.stderr
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_variants", "--device", "cpu"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=dict(env, TRITON_INTERPRET="1"))
    assert out.returncode != 0 and "small --size" in out.stderr


def test_quality_text_quick(tmp_path):
    out = run("-m", "benchmarks.quality_text", "--quick", "--out-dir", str(tmp_path))
    assert "test bpc" in out and "on this task" in out
    data = json.loads((tmp_path / "quality_text_quick_cpu.json").read_text())
    assert data["data"]["split"]["train"][0] == 0 and data["data"]["split"]["test"][1] == data["data"]["characters"]
    head = data["head_stage"][0]
    # every method was trained and evaluated: finite bits per character, far below a uniform guess
    uniform = __import__("math").log2(len(data["data"]["vocabulary"]))
    scores = {k: r for k, r in head.items() if k != "starts"}
    assert all(0 < r["test"] < uniform for r in scores.values())
    # the recipe's start was chosen among the in-span merges, and its variants ran beside it
    from twa_kernels.start import run_candidates

    n = data["config"]["half_epochs"] * data["config"]["per_epoch"]
    assert head["starts"]["TWA-t"]["start"] in run_candidates(n)
    assert head["starts"]["TWA-t"]["start_evaluations"] == len(run_candidates(n))
    assert {"TWA-t, 4 bits (start last, end last)", "TWA-t, 4 bits (start best, end cosine)"} <= set(head)
    assert set(data["test_targets"]["stable_phase"]["summary"]) == {"TWA-t, 4 bits", "TWA-v, 4 bits"}
    assert (tmp_path / "quality_text_quick_cpu_curve.png").stat().st_size > 0


def test_wsd_quick(tmp_path):
    out = run("-m", "benchmarks.wsd", "--quick", "--out-dir", str(tmp_path))
    assert "cooldown 1−sqrt 10%" in out and "best fixed merge" in out
    data = json.loads((tmp_path / "wsd_quick_cpu.json").read_text())
    uniform = math.log2(len(data["data"]["vocabulary"]))
    for t, per_seed in data["points"].items():
        res = per_seed[0]
        assert all(0 < r["test"] < uniform and 0 < r["val"] < uniform for r in res.values()), t
        # the extra passes are what each method spent beyond the run up to t
        t = int(t)
        assert res["raw checkpoint"]["passes"] == 0 and res["cooldown 1−sqrt 10%"]["passes"] == round(0.1 * t)
        assert res["TWA-v, last 5"]["passes"] == round(0.025 * t)
        assert {f"WSM {f}, last {k}" + (" (= LAWA)" if f == "linear" else "") for f in ("linear", "cosine", "inverse-sqrt", "1-sqrt")
                for k in (5, 10, 20)} <= set(res)
    assert "TWA-v from the centre, step decay" in data["step_protocol"][0]
    assert (tmp_path / "wsd_quick_cpu.png").stat().st_size > 0


def test_scale_quick(tmp_path):
    # every phase of the 1B scale run on a tiny Llama: AdamW checkpoints as sharded bf16 HF folders,
    # twa average, twa fit (streamed build, TWA-v, the written folder loads), FSDP2 world 2 over gloo
    out = run("-m", "benchmarks.scale", "--quick", "--out-dir", str(tmp_path), timeout=600)
    data = json.loads((tmp_path / "scale_quick_cpu.json").read_text())
    from benchmarks.scale_plan import parameter_count

    assert data["params"] == parameter_count(data["model"])
    assert data["twa_steps"] == data["run"]["twa_steps"] and data["fit"]["output_loads"]
    assert all(v > 0 for v in data["peak_rss_bytes"].values())
    assert len(data["fsdp"]["ranks"]) == 2 and "fsdp_failed" not in data
    assert data["fit"]["eval_loss"]["twa"] < data["fit"]["eval_loss"]["start"]  # the learned merge moved downhill
    for name in ("scale_quick_cpu.md", "scale_quick_cpu.png", "scale_quick_plan.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "eval loss" in out


def test_soups_quick(tmp_path):
    # the soups benchmark end to end at tiny size: pretraining cached, every method at N/4, N/2, N, the
    # bits and fp32 TWA-v at N, Table 11's ordered setting, the plot
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = run("-m", "benchmarks.soups", "--quick", "--out-dir", str(tmp_path), env=env)
    assert "Test bpc by N" in out and "greedy soup" in out
    data = json.loads((tmp_path / "soups_quick_cpu.json").read_text())
    n = data["config"]["finetunes"]
    assert list(data["by_n"]) == [str(n // 4), str(n // 2), str(n)] and len(data["search"][0]) == n
    uniform = math.log2(len(string.printable) + 1)
    everywhere = {"best single (by val)", "second-best single (by val)", "uniform soup", "greedy soup", "Model Stock",
                  "learned soup by layer", "TWA-v"}
    for size, per_seed in data["by_n"].items():
        res = per_seed[0]
        assert everywhere <= set(res) and all(0 < r["test"] < uniform for r in res.values()), size
        assert res["TWA-v"]["start"] and res["greedy soup"]["kept"]
    full = data["by_n"][str(n)][0]
    assert {"TWA-t", "TWA-v, fp32", "TWA-v from the greedy soup", "TWA-v, 1 bit", "TWA-v, 8 bits"} <= set(full)
    # the learned soup holds every model; TWA-v one 4-bit P̃ and a centre
    assert full["learned soup by layer"]["state_bytes"] > full["TWA-v"]["state_bytes"]
    assert set(data["table11"][0]) >= {"best single (by val)", "uniform soup", "greedy soup", "TWA-t", "TWA-v"}
    assert list((tmp_path / "cache" / "twa_kernels" / "soups").glob("pretrained_*.safetensors"))
    assert (tmp_path / "soups_quick_cpu.png").stat().st_size > 0
