"""``twa fit`` on a tiny Llama config (no downloads): a Hugging Face folder that from_pretrained loads, sharded
like the input, whose reported loss is the written model's own, and errors that leave everything untouched."""

import hashlib
import json
import os

import pytest
import torch

import twa_kernels as twa

pytest.importorskip("transformers")

from benchmarks.quality_text import corpus_text  # noqa: E402
from benchmarks.scale import QUICK_MODEL, llama_config, save_bf16_folder  # noqa: E402
from twa_kernels.cli import main  # noqa: E402
from twa_kernels.fit import byte_ids, eval_loss, load_model, split_text  # noqa: E402

CONTEXT, STEPS = 16, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three checkpoints of a tiny byte-level Llama, each a few AdamW steps on from the last, sharded."""
    from transformers import LlamaForCausalLM

    from twa_kernels.fit import causal_loss, random_windows

    root = tmp_path_factory.mktemp("fit")
    text = corpus_text()[:60000]
    (root / "text.txt").write_text(text, encoding="utf-8")
    ids = byte_ids(text)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(QUICK_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    folders = []
    for i in range(3):
        for _ in range(3):
            causal_loss(model, random_windows(ids, CONTEXT, 4, gen)).backward()
            opt.step()
            opt.zero_grad()
        folder = root / f"checkpoint-{i}"
        save_bf16_folder(model, str(folder), "100KB")
        folders.append(str(folder))
    return root, folders


def digest(folder) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update(name.encode() + (open(os.path.join(folder, name), "rb").read()))
    return h.hexdigest()


def fit(root, folders, out, *extra):
    return main(["fit", *folders, "--text", str(root / "text.txt"), "-o", str(out), "--tokenizer", "bytes",
                 "--text-split", "position",
                 "--steps", str(STEPS), "--context", str(CONTEXT), "--batch", "2", "--eval-tokens", "512",
                 "--device", "cpu", "--quiet", *extra])


def test_fit_writes_a_loadable_folder_whose_loss_is_the_one_reported(run, tmp_path, capsys):
    root, folders = run
    before = [digest(f) for f in folders]
    out, report = tmp_path / "merged", tmp_path / "report.json"
    assert fit(root, folders, out, "--report", str(report)) == 0
    line = capsys.readouterr().out
    assert line.startswith("twa fit: eval loss on") and "last" in line and "uniform" in line
    assert [digest(f) for f in folders] == before  # the inputs are only read
    rep = json.loads(report.read_text())
    assert rep["twa_steps"] == STEPS and len(rep["steps"]) == STEPS and rep["n"] == 3
    assert rep["backend"] == twa.backends.resolve_backend("auto", "cpu") and f"kernels: {rep['backend']}" in line
    assert rep["params"] == sum(p.numel() for p in load_model(folders[-1], torch.float32, "cpu").parameters())
    for step in rep["steps"]:
        for key in ("forward_s", "backward_s", "project_s", "apply_s", "rule_s"):
            assert step[key] >= 0.0
        assert step["project_s"] > 0.0 and step["apply_s"] > 0.0  # the profiler saw both projections
    for phase in ("load", "build", "train", "write"):
        assert rep["phases"][phase]["wall_s"] > 0.0
    # sharded like the last input, configs copied, the same dtype
    src_index = json.loads((root / folders[-1] / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    assert (out / "config.json").exists() and (out / "twa_alphas.json").exists()
    alphas = json.loads((out / "twa_alphas.json").read_text())
    model = load_model(str(out), torch.float32, "cpu")
    names = {n for n, _ in model.named_parameters()}
    assert set(alphas) == names and all(len(a) == 3 for a in alphas.values())
    from safetensors import safe_open

    shard = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[0]
    with safe_open(str(out / shard), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    # The reported TWA loss is that of the written (bf16-rounded) weights, on the held-out eval part.
    parts = split_text(byte_ids((root / "text.txt").read_text(encoding="utf-8")), 0.1)
    again = eval_loss(model.eval(), parts["eval"], CONTEXT, 2, 512, "cpu")
    assert again == pytest.approx(rep["eval_loss"]["twa"], rel=1e-5)
    last = eval_loss(load_model(folders[-1], torch.float32, "cpu").eval(), parts["eval"], CONTEXT, 2, 512, "cpu")
    assert last == pytest.approx(rep["eval_loss"]["last"], rel=1e-5)


def test_fit_train_split(run, tmp_path):
    root, folders = run
    report = tmp_path / "r.json"
    assert fit(root, folders, tmp_path / "m", "--split", "train", "--report", str(report)) == 0
    assert json.loads(report.read_text())["split"] == "train"


@pytest.mark.parametrize("case", ["exists", "one", "not_hf", "no_tokenizer", "short_text"])
def test_fit_bad_input_is_refused_before_any_work(run, tmp_path, capsys, case):
    root, folders = run
    out = tmp_path / "out"
    args = ["fit", *folders, "--text", str(root / "text.txt"), "-o", str(out), "--tokenizer", "bytes", "--quiet"]
    expect = {"exists": "exists", "one": "at least two", "not_hf": "not a Hugging Face checkpoint folder",
              "no_tokenizer": "--tokenizer bytes", "short_text": "fewer than one batch"}[case]
    if case == "exists":
        out.mkdir()
    elif case == "one":
        args[1:1 + len(folders)] = folders[:1]
    elif case == "not_hf":
        args[1] = str(tmp_path)
    elif case == "no_tokenizer":
        args.remove("--tokenizer"), args.remove("bytes")
    elif case == "short_text":
        (tmp_path / "t.txt").write_text("too short")
        args[args.index("--text") + 1] = str(tmp_path / "t.txt")
    assert main(args) == 1
    assert expect in capsys.readouterr().err
    assert case == "exists" or not out.exists()
