"""The ``twa`` command end to end, through a subprocess as a user runs it: average, build, info, alphas,
and bad input (one line naming the problem, exit status 1, nothing written)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import twa_kernels as twa
from reference import batches, make_checkpoints, make_model
from test_checkpoints import write_sharded_safetensors

ROOT = Path(__file__).resolve().parents[1]


def twa_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "twa_kernels", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def files(tmp_path):
    model = make_model(dtype=torch.float32)
    ckpts = [{k: v.float().contiguous() for k, v in sd.items()} for sd in make_checkpoints(model, 4)]
    paths = []
    for i, sd in enumerate(ckpts):
        path = tmp_path / f"ck{i}.safetensors"
        save_file(sd, path)
        paths.append(path)
    return model, ckpts, paths


@pytest.mark.parametrize("method,extra,expected", [
    ("uniform", (), lambda c: twa.swa(c)),
    ("ema", ("--gamma", "0.7"), lambda c: twa.ema(c, 0.7)),
    ("lawa", ("--k", "2"), lambda c: twa.lawa(c, 2)),
])
def test_average_files(files, tmp_path, method, extra, expected):
    _, ckpts, paths = files
    out = tmp_path / "avg.safetensors"
    r = twa_cli("average", method, *paths, "-o", out, *extra, "--quiet")
    assert r.returncode == 0, r.stderr
    got, want = load_file(out), expected(ckpts)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_average_weighted_is_the_exact_weighted_sum_never_renormalized(files, tmp_path):
    _, ckpts, paths = files
    out = tmp_path / "w.safetensors"
    r = twa_cli("average", "weighted", "--weights", "0.1,0.2,0.3,0.2", *paths, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "sum to 0.8" in r.stderr and "not an average" in r.stderr  # said, not silently rescaled
    got = load_file(out)
    # computed here, not by the package (which shares its arithmetic with twa.weighted_mean): Σ w_i x_i in
    # float64, rounded once to the entry's dtype; a renormalised sum would be 1/0.8 = 1.25× this
    for k, first in ckpts[0].items():
        want = sum(w * c[k].double() for w, c in zip((0.1, 0.2, 0.3, 0.2), ckpts)).to(first.dtype)
        assert torch.equal(got[k], want), k
    r = twa_cli("average", "weighted", "--weights", "1,2,3,2", "--normalize", *paths, "-o", tmp_path / "n.safetensors",
                "--quiet")
    assert r.returncode == 0, r.stderr
    normalized = load_file(tmp_path / "n.safetensors")
    for k, first in ckpts[0].items():
        want = sum(w * c[k].double() for w, c in zip((1 / 8, 2 / 8, 3 / 8, 2 / 8), ckpts)).to(first.dtype)
        assert torch.equal(normalized[k], want), k


@pytest.mark.parametrize("family", list(twa.DECAY_FAMILIES))
def test_average_weighted_decay_is_the_decay_merge(files, tmp_path, family):
    _, ckpts, paths = files
    out = tmp_path / "d.safetensors"
    r = twa_cli("average", "weighted", "--decay", family, "--reverse", *paths, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    want = twa.weighted_mean(ckpts, twa.decay_merge_weights(4, family, reverse=True))
    assert all(torch.equal(load_file(out)[k], want[k]) for k in want)
    if family == "linear":  # WSM's identity: a linear decay is the uniform merge
        assert all(torch.allclose(want[k], twa.swa(ckpts)[k], rtol=1e-6, atol=0) for k in want)


def test_average_window_by_last_k_and_by_step_range(files, tmp_path):
    _, ckpts, paths = files
    named = []
    for step, path in zip((900, 1000, 1100, 1200), paths):  # lexical order would put 1000 first
        named.append(tmp_path / f"checkpoint-{step}.safetensors")
        os.rename(path, named[-1])
    shuffled = [named[2], named[0], named[3], named[1]]
    r = twa_cli("average", "weighted", "--decay", "linear", "--last", "3", *shuffled, "-o", tmp_path / "a.safetensors",
                "--quiet")
    assert r.returncode == 0, r.stderr
    assert "checkpoint-1000.safetensors × 0.333333, checkpoint-1100" in r.stdout
    want = twa.weighted_mean(ckpts[1:], twa.decay_merge_weights(3, "linear"))
    assert all(torch.equal(load_file(tmp_path / "a.safetensors")[k], want[k]) for k in want)
    r = twa_cli("average", "uniform", "--steps", "950:1150", *shuffled, "-o", tmp_path / "b.safetensors", "--quiet")
    assert r.returncode == 0, r.stderr
    want = twa.swa(ckpts[1:3])
    assert all(torch.equal(load_file(tmp_path / "b.safetensors")[k], want[k]) for k in want)
    r = twa_cli("average", "uniform", "--steps", "5000:", *shuffled, "-o", tmp_path / "c.safetensors")
    assert r.returncode == 1 and "no checkpoint has a step in 5000:" in r.stderr


@pytest.mark.parametrize("extra,message", [
    (("--weights", "0.5,0.5"), "2 weight(s) for 4 checkpoint(s)"),
    (("--weights", "0.5,nan,0.25,0.25"), "weight 2 is nan"),
    (("--weights", "1,-1,0.5,-0.5"), "the weights sum to 0"),
    (("--weights", "a,b,c,d"), "comma-separated numbers"),
    ((), "exactly one of --weights"),
    (("--weights", "1,0,0,0", "--decay", "cosine"), "exactly one of --weights"),
])
def test_average_weighted_bad_weights_name_the_problem(files, tmp_path, extra, message):
    _, _, paths = files
    out = tmp_path / "bad.safetensors"
    r = twa_cli("average", "weighted", *extra, *paths, "-o", out)
    assert r.returncode == 1 and message in r.stderr and not out.exists(), r.stderr


def test_average_hugging_face_folders_gives_a_folder_from_pretrained_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    folders = []
    for i in range(3):
        torch.manual_seed(i)
        model = transformers.GPT2LMHeadModel(config)
        folder = tmp_path / f"checkpoint-{i}"
        model.save_pretrained(folder, max_shard_size="4KB")  # sharded: the output must be sharded alike
        folders.append(folder)
    assert (folders[0] / "model.safetensors.index.json").exists()
    out = tmp_path / "averaged"
    r = twa_cli("average", "uniform", *folders, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in folders[-1].glob("*.safetensors"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).state_dict()
    expected = twa.swa([str(f) for f in folders])
    # every averaged tensor is one the model loads (a tied head shares the embedding's storage)
    assert expected and set(expected) <= set(loaded), sorted(set(expected) - set(loaded))[:3]
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name


def test_build_needs_no_model_and_matches_the_python_api(files, tmp_path):
    model, ckpts, paths = files
    out = tmp_path / "space.safetensors"
    r = twa_cli("build", *paths, "--bits", "4", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    built = twa.Subspace.load(out)
    expected = twa.Subspace.from_names(built.names, built.shapes, ckpts, bits=4, progress=False)
    assert set(built.names) == {n for n, _ in model.named_parameters()}
    assert built.fingerprint == expected.fingerprint and torch.equal(built.projection.words, expected.projection.words)
    bound = twa.Subspace.load(out, model=make_model(dtype=torch.float32))
    opt = twa.ProjectedSGD(make_model(dtype=torch.float32).named_parameters(), bound, lr=0.1)
    assert opt.beta.shape == (len(built.names), 4)
    only_fc1 = tmp_path / "fc1.safetensors"
    r = twa_cli("build", *paths, "--include", "fc1.*", "--bits", "2", "-o", only_fc1, "--quiet")
    assert r.returncode == 0, r.stderr
    assert set(twa.Subspace.load(only_fc1).names) == {"fc1.weight", "fc1.bias"}


def test_info_of_a_subspace_and_of_a_checkpoint(files, tmp_path):
    model, ckpts, paths = files
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    space.save(tmp_path / "space.safetensors")
    r = twa_cli("info", tmp_path / "space.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["kind"], info["n"], info["bits"], info["layers"], info["fingerprint"]) == \
        ("subspace", 4, 4, space.num_layers, space.fingerprint)
    r = twa_cli("info", paths[0])
    assert r.returncode == 0 and "checkpoint" in r.stdout and "fc1.weight" in r.stdout


def test_alphas_from_a_saved_optimizer_state(files, tmp_path):
    model, ckpts, _ = files
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    space.save(tmp_path / "space.safetensors")
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    for x, y in batches(3, dtype=torch.float32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save({"epoch": 1, "optimizer": opt.state_dict()}, tmp_path / "train.pt")
    r = twa_cli("alphas", tmp_path / "space.safetensors", tmp_path / "train.pt")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["alphas"] == opt.named_alphas()
    other = twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), make_checkpoints(model, 4, seed=5),
                                          bits=4, progress=False)
    other.save(tmp_path / "other.safetensors")
    r = twa_cli("alphas", tmp_path / "other.safetensors", tmp_path / "train.pt")
    assert r.returncode == 1 and "trained in another subspace" in r.stderr


def test_bad_input_names_the_problem_and_writes_nothing(files, tmp_path):
    _, ckpts, paths = files
    out = tmp_path / "out.safetensors"
    r = twa_cli("average", "uniform", paths[0], tmp_path / "missing.safetensors", "-o", out)
    assert r.returncode == 1 and "missing.safetensors" in r.stderr and not out.exists()
    wide = dict(ckpts[1], **{"fc1.weight": torch.zeros(9, 5)})
    save_file(wide, tmp_path / "wide.safetensors")
    r = twa_cli("average", "uniform", paths[0], tmp_path / "wide.safetensors", "-o", out)
    assert r.returncode == 1 and "'fc1.weight' has shape (9, 5)" in r.stderr and not out.exists()
    index = write_sharded_safetensors(ckpts[2], tmp_path / "sharded")
    os.remove(tmp_path / "sharded" / "model-00001-of-00002.safetensors")
    r = twa_cli("build", paths[0], index, "-o", out)
    assert r.returncode == 1 and "names shard(s) that do not exist" in r.stderr and not out.exists()
    r = twa_cli("build", paths[0], paths[1], "-o", tmp_path / "space.pt")
    assert r.returncode == 1 and "saved as a .safetensors file" in r.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".twa-")]  # no staging left behind
    r = twa_cli("average", "median", *paths, "-o", out)
    assert r.returncode == 2  # a malformed command line: argparse's usage error


def _digest(path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("method,extra", [("uniform", ()), ("lawa", ("--k", "2")), ("weighted", ("--decay", "linear"))])
def test_average_leaves_its_inputs_unchanged(files, tmp_path, method, extra):
    _, _, paths = files
    before = [_digest(p) for p in paths]
    r = twa_cli("average", method, *paths, "-o", tmp_path / "out.safetensors", *extra, "--quiet")
    assert r.returncode == 0, r.stderr
    assert [_digest(p) for p in paths] == before
    # and an output that already exists is refused without touching it or them
    r = twa_cli("average", method, *paths, "-o", tmp_path / "out.safetensors", *extra, "--quiet")
    assert [_digest(p) for p in paths] == before


def test_trusted_opts_in_to_pickles_that_run_code(tmp_path):
    # A Lightning-style checkpoint whose hyper-parameters are an argparse.Namespace: torch's weights-only
    # loader refuses it, and so does twa until --trusted says the file is trusted.
    import argparse

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"c{i}.ckpt")
        torch.save({"state_dict": {"w": torch.full((3,), float(i))}, "hyper_parameters": argparse.Namespace(lr=0.1)},
                   paths[-1])
    out = tmp_path / "avg.safetensors"
    r = twa_cli("average", "uniform", *paths, "-o", out, "--quiet")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "cannot be loaded without running code" in r.stderr and "--trusted" in r.stderr and not out.exists()
    r = twa_cli("average", "uniform", *paths, "-o", out, "--quiet", "--trusted")
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(out)["w"], torch.full((3,), 0.5))
    r = twa_cli("build", *paths, "-o", tmp_path / "s.safetensors", "--quiet")
    assert r.returncode == 1 and "--trusted" in r.stderr
    r = twa_cli("build", *paths, "-o", tmp_path / "s.safetensors", "--quiet", "--trusted")
    assert r.returncode == 0, r.stderr
