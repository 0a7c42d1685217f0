"""Hostile and broken inputs: no code runs, every error is a CheckpointError that names its file, nothing
altered loads silently. One test per defect of the fault probe, and a seeded fuzz of every reader."""

import json
import pickle
import random
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import twa_kernels as twa
from twa_kernels.checkpoints import CheckpointError, open_checkpoint, open_file, remove_stale_temporaries, temporary_name

ROOT = Path(__file__).resolve().parents[1]


def twa_cli(*args):
    return subprocess.run([sys.executable, "-m", "twa_kernels", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def read_all(path, **kw):
    source = open_checkpoint(str(path), **kw)
    return {k: source.tensor(k) for k in source.keys()}


def raw_safetensors(path, header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def dcp_folder(path, tensors):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(tensors, checkpoint_id=str(path))
    return path


# ---------------------------------------------------------------------------------------------- 1. DCP metadata
def test_a_crafted_dcp_metadata_pickle_is_refused_without_running(tmp_path):
    folder = dcp_folder(tmp_path / "run", {"w": torch.randn(3, 4)})
    assert read_all(folder)["w"].shape == (3, 4)  # a real one reads
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata cannot be read without running code.*trusted=True"):
        open_checkpoint(str(folder))
    r = twa_cli("info", folder)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "without running code" in r.stderr
    r = twa_cli("build", folder, folder, "-o", tmp_path / "s.safetensors")
    assert r.returncode == 1 and not (tmp_path / "s.safetensors").exists()
    assert not marker.exists()


def test_dcp_metadata_holds_only_metadata_classes(tmp_path):
    folder = dcp_folder(tmp_path / "run", {"w": torch.randn(2)})
    (folder / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(CheckpointError, match="not torch.distributed.checkpoint metadata"):
        open_checkpoint(str(folder))


# ---------------------------------------------------------------------------------------------- 2. Subspace.load
@pytest.fixture()
def space_file(tmp_path):
    model = nn.Linear(5, 3)
    ckpts = [{k: v + 0.1 * (i + 1) * torch.randn_like(v) for k, v in model.state_dict().items()} for i in range(3)]
    path = tmp_path / "space.safetensors"
    twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False).save(path)
    return path


def header_of(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


@pytest.mark.parametrize("damage", ["truncated", "empty", "header flipped", "bad dtype", "huge shape", "directory",
                                    "broken record"])
def test_a_damaged_subspace_file_raises_one_error_naming_it(space_file, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    header, data = header_of(space_file)
    if damage == "truncated":
        bad.write_bytes(space_file.read_bytes()[:400])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "header flipped":
        raw = bytearray(space_file.read_bytes())
        raw[12] ^= 0xFF
        bad.write_bytes(bytes(raw))
    elif damage == "bad dtype":
        header["center"]["dtype"] = "Q7"
        raw_safetensors(bad, header, data)
    elif damage == "huge shape":
        header["center"]["shape"] = [2 ** 40]
        raw_safetensors(bad, header, data)
    elif damage == "directory":
        bad.mkdir()
    else:
        header["__metadata__"]["twa_subspace"] = "{not json"
        raw_safetensors(bad, header, data)
    with pytest.raises(CheckpointError) as err:
        twa.Subspace.load(bad)
    assert str(bad) in str(err.value)
    r = twa_cli("info", bad)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- 3. headers, indexes
@pytest.mark.parametrize("case,match", [
    ("list header", "header is a JSON list"),
    ("no data_offsets", "invalid data_offsets"),
    ("nested deep", "nested too deep"),
    ("negative shape", "invalid shape"),
    ("overlapping offsets", "overlap"),
    ("empty .pt", "not a readable torch checkpoint"),
    ("index lists itself", "as a shard, an index itself"),
])
def test_malformed_headers_and_indexes_name_the_file(tmp_path, case, match):
    f32 = {"dtype": "F32", "shape": [2]}
    if case == "list header":
        path = raw_safetensors(tmp_path / "a.safetensors", [1, 2])
    elif case == "no data_offsets":
        path = raw_safetensors(tmp_path / "a.safetensors", {"w": f32}, bytes(8))
    elif case == "nested deep":
        path = raw_safetensors(tmp_path / "a.safetensors", b"[" * 200_000 + b"]" * 200_000)
    elif case == "negative shape":
        path = raw_safetensors(tmp_path / "a.safetensors", {"w": {"dtype": "F32", "shape": [-32, -64],
                                                                  "data_offsets": [0, 8192]}}, bytes(8192))
    elif case == "overlapping offsets":
        path = raw_safetensors(tmp_path / "a.safetensors", {"w": dict(f32, data_offsets=[0, 8]),
                                                            "v": dict(f32, data_offsets=[4, 12])}, bytes(12))
    elif case == "empty .pt":
        path = tmp_path / "a.pt"
        path.write_bytes(b"")
    else:
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps({"weight_map": {"w": "model.safetensors.index.json"}}))
    with pytest.raises(CheckpointError, match=match) as err:
        read_all(path)
    assert str(path) in str(err.value)


def test_a_negative_shape_is_blamed_on_its_own_file_not_the_healthy_one(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(32, 64)}, good)
    bad = raw_safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [-32, -64],
                                                               "data_offsets": [0, 8192]}}, bytes(8192))
    r = twa_cli("build", good, bad, "-o", tmp_path / "s.safetensors")
    assert r.returncode == 1 and "bad.safetensors" in r.stderr and "good.safetensors" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- 4. DCP data
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_dcp_folder_with_a_broken_data_file_raises_a_catchable_error(tmp_path, damage):
    folder = dcp_folder(tmp_path / "run", {"w": torch.randn(30, 40)})
    for data in folder.glob("*.distcp"):
        data.unlink() if damage == "missing" else data.write_bytes(data.read_bytes()[:50])
    try:
        read_all(folder)
    except Exception as err:  # DCP's CheckpointException is a BaseException: it must not get through as itself
        assert isinstance(err, CheckpointError) and str(folder) in str(err) and "'w'" in str(err)
    else:
        pytest.fail("a broken DCP folder was read")
    r = twa_cli("info", folder)  # reads only the metadata: that part is intact
    assert r.returncode == 0


# ---------------------------------------------------------------------------------------------- 5. shards outside
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_an_index_may_not_name_shards_outside_its_folder_unless_trusted(tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, outside)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../outside.safetensors" if where == "parent" else str(outside)}}))
    with pytest.raises(CheckpointError, match="names a shard outside its folder"):
        read_all(index)
    assert torch.equal(read_all(index, trusted=True)["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------- 6. subspace integrity
def rewrite_metadata(src, dst, change):
    header, data = header_of(src)
    change(header["__metadata__"], header)
    raw_safetensors(dst, header, data)


def test_the_checksum_is_mandatory_and_covers_the_record(space_file, tmp_path):
    def drop_checksum_and_flip_a_centre_byte(meta, header):
        meta["checksum_"] = meta.pop("checksum")

    bad = tmp_path / "nosum.safetensors"
    rewrite_metadata(space_file, bad, drop_checksum_and_flip_a_centre_byte)
    raw = bytearray(bad.read_bytes())
    header, _ = header_of(bad)
    base = 8 + int.from_bytes(raw[:8], "little")
    raw[base + header["center"]["data_offsets"][0]] ^= 0x01
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="no checksum"):
        twa.Subspace.load(bad)

    def tamper_local_sizes(meta, header):
        record = json.loads(meta["twa_subspace"])
        record["local_sizes"] = [s + 1 for s in record["local_sizes"]]
        meta["twa_subspace"] = json.dumps(record)

    bad = tmp_path / "sizes.safetensors"
    rewrite_metadata(space_file, bad, tamper_local_sizes)
    with pytest.raises(CheckpointError, match="checksum"):
        twa.Subspace.load(bad)


# ---------------------------------------------------------------------------------------------- 7. stale temporaries
def _this_host() -> str:
    """The host part of the names this package gives its temporaries."""
    return temporary_name("x").split(".tmp-", 1)[1].rsplit("-", 1)[0]


def _temporaries_of(folder, pid, content):
    """A file and a staging folder as this package names the ones a process ``pid`` of this host writes."""
    host = _this_host()
    file = folder / f"s.safetensors.tmp-{host}-{pid}"
    file.write_bytes(content)
    staging = folder / f".twa-average-{host}-{pid}-abcd"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"x" * 1000)
    return file, staging


def test_killed_writes_leave_nothing_the_next_write_keeps(space_file, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file, stale_dir = _temporaries_of(tmp_path, dead.pid, b"half a subspace")
    other_host = tmp_path / f"y.safetensors.tmp-elsewhere-{dead.pid}"  # another machine's write in progress
    other_host.write_bytes(b"")
    mine = tmp_path / "user.tmp-1"  # not a name this package writes
    mine.write_bytes(b"")
    twa.Subspace.load(space_file).save(tmp_path / "again.safetensors")
    assert not stale_file.exists() and not stale_dir.exists() and other_host.exists() and mine.exists()
    assert remove_stale_temporaries(str(tmp_path)) == []


def test_the_writes_of_a_live_process_on_this_host_are_left_alone(space_file, tmp_path):
    # Another process of this host is still writing (it runs while the next write cleans up): its
    # temporaries stay; a finished process's go.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writing, staging = _temporaries_of(tmp_path, live.pid, b"a subspace being written")
        stale = tmp_path / f"t.safetensors.tmp-{_this_host()}-{dead.pid}"
        stale.write_bytes(b"half")
        twa.Subspace.load(space_file).save(tmp_path / "again.safetensors")
        assert writing.read_bytes() == b"a subspace being written" and (staging / "model.safetensors").exists()
        assert not stale.exists()
    finally:
        live.kill()
        live.wait()
    # once it has ended, the next write removes what it left
    twa.Subspace.load(space_file).save(tmp_path / "third.safetensors")
    assert not writing.exists() and not staging.exists()


# ---------------------------------------------------------------------------------------------- 9. replaced parameters
def test_a_parameter_object_replaced_after_the_optimizer_was_made_is_followed():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ckpts = [{k: v + 0.1 * (i + 1) * torch.randn_like(v) for k, v in model.state_dict().items()} for i in range(3)]
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    opt = twa.ProjectedAdamW(model.parameters(), space)
    x = torch.randn(5, 4)
    new = nn.Parameter(model[0].weight.detach().clone())
    model[0].weight = new
    model(x).sum().backward()
    opt.step()
    assert opt.param_groups[0]["params"][0] is new
    point = space.center[:12].view(3, 4) + (space.dense(0) @ opt.beta[0].float()).view(3, 4)
    torch.testing.assert_close(new.detach(), point, rtol=0, atol=1e-6)  # the new object took the step


# ---------------------------------------------------------------------------------------------- fuzz
def mutate(data: bytes, rng: random.Random, header_end: int | None = None) -> bytes:
    raw = bytearray(data)
    kind = rng.choice(["flip", "truncate", "splice", "zero"])
    hi = header_end if header_end is not None and rng.random() < 0.8 else len(raw)
    if kind == "truncate":
        return bytes(raw[:rng.randrange(0, len(raw))])
    if kind == "splice":
        i = rng.randrange(0, hi)
        return bytes(raw[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + raw[i:])
    for _ in range(rng.randrange(1, 6)):
        i = rng.randrange(0, hi)
        raw[i] = 0 if kind == "zero" else raw[i] ^ (1 << rng.randrange(8))
    return bytes(raw)


@pytest.mark.parametrize("reader", ["safetensors", "torch", "index", "dcp metadata", "subspace"])
def test_fuzzed_files_raise_only_checkpoint_errors_naming_them(tmp_path, space_file, reader):
    rng = random.Random({"safetensors": 1, "torch": 2, "index": 3, "dcp metadata": 4, "subspace": 5}[reader])
    sd = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(7), "b": torch.randn(3, 2).half()}
    if reader == "safetensors":
        src = tmp_path / "src.safetensors"
        save_file(sd, src)
        header_end = 8 + int.from_bytes(src.read_bytes()[:8], "little")
    elif reader == "torch":
        src = tmp_path / "src.pt"
        torch.save(sd, src)
        header_end = None
    elif reader == "index":
        save_file(sd, tmp_path / "model-1.safetensors")
        src = tmp_path / "model.safetensors.index.json"
        src.write_text(json.dumps({"metadata": {}, "weight_map": {k: "model-1.safetensors" for k in sd}}))
        header_end = None
    elif reader == "dcp metadata":
        folder = dcp_folder(tmp_path / "dcp", sd)
        src = folder / ".metadata"
        header_end = None
    else:
        src = space_file
        header_end = None
    original = src.read_bytes()
    outcomes = {"error": 0, "read": 0}
    for i in range(60):
        if reader == "dcp metadata":
            target, named = src, str(src.parent)
        else:
            target = src.with_name(f"fuzz{i}{''.join(src.suffixes)}") if reader != "index" else \
                src.with_name(f"fuzz{i}.index.json")
            named = str(target)
        target.write_bytes(mutate(original, rng, header_end))
        try:
            if reader == "subspace":
                twa.Subspace.load(target)
            elif reader == "dcp metadata":
                open_file(str(src.parent)).keys()
            else:
                read_all(target)
            outcomes["read"] += 1  # a mutation the format cannot see (a data byte) or that kept it valid
        except CheckpointError as err:
            assert named in str(err), (i, str(err))
            outcomes["error"] += 1
        finally:
            if reader == "dcp metadata":
                src.write_bytes(original)
    if reader == "subspace":
        assert outcomes["read"] == 0  # its checksum covers every byte that loads
    assert outcomes["error"] >= 20, outcomes


# ---------------------------------------------------------------------------------------------- bad input, model untouched
def _untouched_cases():
    from reference import make_checkpoints, make_model

    def build(ckpts, **kw):
        return lambda model: twa.Subspace.from_checkpoints(model, ckpts, progress=False, **kw)

    def ckpts(change=None):
        def make(model):
            out = make_checkpoints(model, 3)
            if change is not None:
                change(out)
            return out
        return make

    def shape(c):
        c[2]["fc1.bias"] = torch.zeros(8, dtype=torch.float64)

    def meta(c):
        c[1]["fc1.weight"] = c[1]["fc1.weight"].to("meta")

    return {
        "fewer than two checkpoints": (lambda m: build(make_checkpoints(m, 1))(m), "at least two checkpoints"),
        "identical checkpoints": (lambda m: build([make_checkpoints(m, 1)[0]] * 3)(m), "identical"),
        "a missing key": (lambda m: build(ckpts(lambda c: c[1].pop("fc2.weight"))(m))(m), "lacks 1"),
        "a shape mismatch": (lambda m: build(ckpts(shape)(m))(m), "has shape"),
        "unsupported bits": (lambda m: build(ckpts()(m), bits=3)(m), "unsupported bit width 3"),
        "a checkpoint with no values (meta)": (lambda m: build(ckpts(meta)(m))(m), "meta device"),
    }, make_model


@pytest.mark.parametrize("case", list(_untouched_cases()[0]))
def test_bad_input_names_the_problem_and_leaves_the_model_untouched(case):
    cases, make_model = _untouched_cases()
    run, message = cases[case]
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        run(model)
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_parameters_on_two_devices_are_refused_and_left_where_they_are():
    # (a meta module stands in for a second device on a machine with one)
    from reference import make_checkpoints, make_model

    model = make_model()
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 3), progress=False)
    model.fc2 = model.fc2.to("meta")
    before = {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}
    with pytest.raises(ValueError, match="parameters are on different devices"):
        twa.ProjectedAdamW(model.parameters(), space)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
