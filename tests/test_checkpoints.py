"""The checkpoint reader: every format builds the same subspace as the equivalent in-memory state_dicts,
the baselines read the same sources, and bad files get errors that name them."""

import argparse
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import twa_kernels as twa
from reference import make_checkpoints, make_model
from twa_kernels.checkpoints import CheckpointError, load_state_dict, open_checkpoint


def reference():
    model = make_model(dtype=torch.float32)
    ckpts = [{k: v.float() for k, v in sd.items()} for sd in make_checkpoints(model, 4)]
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    return model, ckpts, space


def same_space(a, b):
    return (a.fingerprint == b.fingerprint and torch.equal(a.center, b.center)
            and torch.equal(a.projection.words, b.projection.words))


def write_sharded_safetensors(sd, folder, name="model.safetensors.index.json"):
    os.makedirs(folder, exist_ok=True)
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(folder, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(folder, name), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return os.path.join(folder, name)


def write_sharded_bin(sd, folder):
    os.makedirs(folder, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, os.path.join(folder, fname))
        weight_map.update({k: fname for k in part})
    path = os.path.join(folder, "pytorch_model.bin.index.json")
    with open(path, "w") as f:
        json.dump({"weight_map": weight_map}, f)
    return path


def write_dcp(sd, folder):
    import warnings

    from torch.distributed import checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": {k: v.clone() for k, v in sd.items()}}, storage_writer=dcp.FileSystemWriter(folder))
    return folder


FORMATS = {
    "pt wrapped": lambda sd, d, i: _save(d / f"{i}.pt", {"epoch": i, "model": sd, "optimizer": {"lr": 0.1}}),
    "pth module. prefix": lambda sd, d, i: _save(d / f"{i}.pth", {"module." + k: v for k, v in sd.items()}),
    "bin _orig_mod. prefix": lambda sd, d, i: _save(d / f"{i}.bin", {"_orig_mod." + k: v for k, v in sd.items()}),
    "lightning ckpt": lambda sd, d, i: _save(d / f"epoch={i}.ckpt", {
        "epoch": i, "global_step": 10 * i, "pytorch-lightning_version": "2.6.6",
        "state_dict": {"model." + k: v for k, v in sd.items()}, "optimizer_states": [], "lr_schedulers": []}),
    "safetensors": lambda sd, d, i: _safetensors(d / f"{i}.safetensors", sd),
    "sharded safetensors index": lambda sd, d, i: write_sharded_safetensors(sd, d / f"sharded{i}"),
    "sharded bin index": lambda sd, d, i: write_sharded_bin(sd, d / f"bin{i}"),
    "hf directory": lambda sd, d, i: os.path.dirname(write_sharded_safetensors(sd, d / f"checkpoint-{i}")),
    "hf directory single file": lambda sd, d, i: _hf_single(d / f"checkpoint-{i}", sd),
    "dcp directory": lambda sd, d, i: write_dcp(sd, str(d / f"dcp{i}")),
}


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def _safetensors(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return str(path)


def _hf_single(folder, sd):
    os.makedirs(folder, exist_ok=True)
    _safetensors(folder / "model.safetensors", sd)
    with open(folder / "config.json", "w") as f:
        json.dump({"model_type": "tiny"}, f)
    return str(folder)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_builds_the_same_subspace(tmp_path, fmt):
    model, ckpts, expected = reference()
    paths = [FORMATS[fmt](sd, tmp_path, i) for i, sd in enumerate(ckpts)]
    space = twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), paths, bits=4, progress=False)
    assert same_space(space, expected)
    # the baselines read the same sources
    got, want = twa.swa(paths), twa.swa(ckpts)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_baselines_unwrap_what_the_builder_unwraps(tmp_path):
    _, ckpts, _ = reference()
    paths = [_save(tmp_path / f"{i}.pt", {"epoch": i, "model": sd}) for i, sd in enumerate(ckpts)]
    for got, want in ((twa.swa(paths), twa.swa(ckpts)), (twa.ema(paths, 0.5), twa.ema(ckpts, 0.5)),
                      (twa.lawa(paths, 2), twa.lawa(ckpts, 2))):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_key_map_for_other_names(tmp_path):
    model, ckpts, expected = reference()
    renamed = [{"net/" + k.replace(".", "/"): v for k, v in sd.items()} for sd in ckpts]
    space = twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), renamed, bits=4, progress=False,
                                          key_map=lambda k: k[len("net/"):].replace("/", "."))
    assert same_space(space, expected)


def test_two_prefixes_that_both_fit_are_an_error():
    _, ckpts, _ = reference()
    both = [{**{"module." + k: v for k, v in sd.items()}, **{"model." + k: v for k, v in sd.items()}} for sd in ckpts]
    with pytest.raises(CheckpointError, match="either of the prefixes 'module.' or 'model.'"):
        twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), both, bits=4, progress=False)


def test_a_pickle_that_needs_code_names_the_file_and_the_opt_in(tmp_path):
    model, ckpts, expected = reference()
    paths = [_save(tmp_path / f"{i}.pth.tar", {"state_dict": sd, "args": argparse.Namespace(lr=0.1)})
             for i, sd in enumerate(ckpts)]
    with pytest.raises(CheckpointError, match=r"0\.pth\.tar cannot be loaded without running code .*trusted=True"):
        twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), paths, bits=4, progress=False)
    space = twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), paths, bits=4, progress=False, trusted=True)
    assert same_space(space, expected)


def test_bad_files_name_themselves(tmp_path):
    _, ckpts, _ = reference()
    model = make_model(dtype=torch.float32)
    good = _safetensors(tmp_path / "good.safetensors", ckpts[0])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(good, "rb").read()[:-40])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        twa.Subspace.from_checkpoints(model, [good, str(truncated)], progress=False)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt.pt: not a readable torch checkpoint"):
        twa.Subspace.from_checkpoints(model, [good, str(corrupt)], progress=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        twa.Subspace.from_checkpoints(model, [good, str(tmp_path / "missing.pt")], progress=False)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty_dir is a directory with no checkpoint"):
        twa.Subspace.from_checkpoints(model, [good, str(empty)], progress=False)
    index = write_sharded_safetensors(ckpts[1], tmp_path / "sharded")
    os.remove(tmp_path / "sharded" / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that do not exist"):
        twa.Subspace.from_checkpoints(model, [good, index], progress=False)


def test_a_non_floating_parameter_is_refused_by_file_and_key(tmp_path):
    _, ckpts, _ = reference()
    bad = dict(ckpts[1], **{"fc1.weight": ckpts[1]["fc1.weight"].to(torch.int32)})
    path = _safetensors(tmp_path / "int.safetensors", bad)
    with pytest.raises(ValueError, match=r"int.safetensors\): parameter 'fc1.weight' is torch.int32"):
        twa.Subspace.from_checkpoints(make_model(dtype=torch.float32), [ckpts[0], path], progress=False)


class WithFrozenAndBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.head = torch.nn.Linear(6, 2)
        self.body.requires_grad_(False)


def test_frozen_parameters_and_buffers_come_from_the_checkpoints():
    torch.manual_seed(0)
    trained = WithFrozenAndBuffers()
    ckpts = []
    for i in range(3):
        with torch.no_grad():
            for p in (trained.head.weight, trained.head.bias, trained.norm.weight, trained.norm.bias):
                p.add_(0.1 * torch.randn_like(p))
            trained.norm.running_mean.fill_(float(i))
        ckpts.append({k: v.clone() for k, v in trained.state_dict().items()})
    fresh = WithFrozenAndBuffers()  # another random initialisation
    twa.Subspace.from_checkpoints(fresh, ckpts, bits=4, progress=False)
    assert torch.equal(fresh.body.weight, ckpts[0]["body.weight"])  # frozen: from the checkpoints
    assert torch.equal(fresh.norm.running_mean, ckpts[-1]["norm.running_mean"])  # buffers: the last one's
    kept = WithFrozenAndBuffers()
    before = kept.body.weight.clone()
    twa.Subspace.from_checkpoints(kept, ckpts, bits=4, progress=False, non_trainable="model")
    assert torch.equal(kept.body.weight, before)
    ckpts[1]["body.weight"] = ckpts[1]["body.weight"] + 1
    untouched = WithFrozenAndBuffers()
    snapshot = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError, match="frozen parameter\\(s\\) 'body.weight' differ between the checkpoints"):
        twa.Subspace.from_checkpoints(untouched, ckpts, bits=4, progress=False)
    assert all(torch.equal(snapshot[k], v) for k, v in untouched.state_dict().items())


def test_reader_without_names_strips_a_prefix_every_key_carries(tmp_path):
    _, ckpts, _ = reference()
    path = _save(tmp_path / "ddp.pt", {"state_dict": {"module." + k: v for k, v in ckpts[0].items()}})
    sd = load_state_dict(path)
    assert sd.keys() == ckpts[0].keys()
    mixed = _save(tmp_path / "mixed.pt", {"module.a": torch.zeros(1), "b": torch.zeros(1)})
    assert set(open_checkpoint(mixed).keys()) == {"module.a", "b"}
