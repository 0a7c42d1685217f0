"""One reader for every checkpoint the subspace builder, the baselines and the command line take.

A checkpoint is any of:

* a state_dict in memory (a mapping of names to tensors);
* a ``.safetensors`` file (read row range by row range with ``pread``);
* a ``.pt`` / ``.pth`` / ``.bin`` / ``.pth.tar`` / Lightning ``.ckpt`` file, loaded with
  ``torch.load(weights_only=True, mmap=True)``, so loading never runs code and a slice reads only the
  pages it touches;
* a sharded index (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``): each shard is
  opened when one of its tensors is first read;
* a Hugging Face checkpoint directory (``checkpoint-500/``: ``model.safetensors``, its index, or
  ``pytorch_model.bin`` and its index, in that order);
* a ``torch.distributed.checkpoint`` directory (it holds ``.metadata``): tensors are read one at a time.

**Wrappers.** A file whose top level is not a state_dict (``{"epoch": 3, "model": sd, "optimizer": ...}``,
Lightning's ``{"state_dict": sd, ...}``) is unwrapped: the first of ``state_dict``, ``model_state_dict``,
``model``, ``module``, ``ema`` that holds tensors is taken.

**Names: one rule.** When the reader knows the names it wants (a model's parameters), a checkpoint key
``k`` stands for the name ``k`` itself if every wanted name is there; otherwise for ``k`` with one
prefix chain made of ``module.`` (DDP), ``_orig_mod.`` (torch.compile) and ``model.`` (Lightning)
stripped, if exactly one such chain yields every wanted name — two chains that both would is an
error, never a guess. Without wanted names (``twa average``, ``twa build``), a chain is stripped only
when every key carries it. ``key_map`` (a mapping from checkpoint key to name, or a function) is
applied first, for everything else.

**Safety.** A pickle that needs code to load (it names a class outside torch's weights-only allowlist,
such as an ``argparse.Namespace`` in a timm checkpoint) is refused with an error naming the file and
the class; ``trusted=True`` is the explicit opt-in (``torch.load(weights_only=False)``, which runs code
from the file). Every error names the file (or the checkpoint's position) and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")
PREFIXES = ("module.", "_orig_mod.", "model.")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file (or position) and key."""


# What a write of this package leaves while it runs: ``OUT.tmp-HOST-PID`` (a subspace file) and
# ``.twa-average-HOST-PID-*`` (the staging folder of ``twa average``). A killed run leaves them behind;
# the next write into the folder removes those of processes of this host that no longer run.
_TEMPORARY = re.compile(r"(?:.+\.tmp-|\.twa-average-)(?P<host>[\w.-]+?)-(?P<pid>\d+)(?:-[^/]*)?")


def _host() -> str:
    return re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"


def temporary_name(path: str) -> str:
    return f"{path}.tmp-{_host()}-{os.getpid()}"


def temporary_prefix() -> str:
    return f".twa-average-{_host()}-{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries of killed writes in ``folder`` (see ``_TEMPORARY``); returns what went."""
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    removed = []
    for name in names:
        m = _TEMPORARY.fullmatch(name)
        if m is None or m["host"] != _host() or int(m["pid"]) == os.getpid() or _running(int(m["pid"])):
            continue
        path = os.path.join(folder, name)
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        except OSError:
            pass  # another process cleaned it first
    return removed


def label(checkpoint, index: int | None = None) -> str:
    where = "checkpoint" if index is None else f"checkpoint {index}"
    if isinstance(checkpoint, (str, os.PathLike)):
        return f"{where} ({os.fspath(checkpoint)})"
    return where


# ---------------------------------------------------------------------------------------------- sources
class Source:
    """Tensors of one checkpoint by name: ``keys``, ``shape``, ``dtype``, and ``rows`` (a dim-0 slice)."""

    label = "checkpoint"

    def keys(self):
        raise NotImplementedError  # pragma: no cover

    def shape(self, name) -> tuple[int, ...]:
        raise NotImplementedError  # pragma: no cover

    def dtype(self, name) -> torch.dtype:
        raise NotImplementedError  # pragma: no cover

    def rows(self, name, start, stop) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (``stop=None``: to the end); a 0-d tensor as one row."""
        raise NotImplementedError  # pragma: no cover

    def tensor(self, name) -> torch.Tensor:
        return self.rows(name, 0, None).reshape(self.shape(name))


_MAX_HEADER = 100 << 20  # safetensors' own limit


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _checked_header(path: str, header, data_bytes: int) -> dict:
    """The tensor entries of a safetensors header, each checked as the format specifies: an object
    per tensor with a known dtype, a shape of non-negative ints and byte offsets that lie inside the
    data, match the shape and do not overlap another tensor's."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is a JSON {type(header).__name__}, "
                              "not an object)")
    meta = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} is described by a JSON {type(info).__name__}, not an object")
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(f"{where} has unsupported dtype {info.get('dtype')}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r} (a list of non-negative integers)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has invalid data_offsets {offsets!r} ([begin, end], 0 ≤ begin ≤ end)")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != expected or offsets[1] > data_bytes:
            raise CheckpointError(f"{where} has inconsistent offsets (truncated or corrupt file?)")
        meta[name] = info
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in meta.items()
                   if info["data_offsets"][1] > info["data_offsets"][0])
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap in the file (corrupt file?)")
    return meta


class SafetensorsSource(Source):
    """Rows of a tensor in a .safetensors file read with one ``pread`` each.

    safetensors' own loader memory-maps the file; for checkpoint sets larger than memory, page-faulting
    through the maps costs more system time than the reading itself, so the row range is read straight
    into a buffer instead. The header is parsed as the format specifies (8-byte little-endian length,
    JSON of dtype, shape and byte offsets) and checked against the file size."""

    def __init__(self, path: str):
        self.label = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{path} is not a safetensors file (header length {n} past the end)")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path} is not a safetensors file (a header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path} is not a safetensors file (header: {err})") from None
            except RecursionError:
                raise CheckpointError(f"{path} is not a safetensors file (its header is nested too deep)") from None
        self._path = path
        self._base = 8 + n
        self._meta = _checked_header(path, header, size - self._base)
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def keys(self):
        return self._meta.keys()

    def shape(self, name):
        return tuple(self._meta[name]["shape"])

    def dtype(self, name):
        return _SAFETENSORS_DTYPES[self._meta[name]["dtype"]]

    def rows(self, name, start, stop):
        info = self._meta[name]
        shape = info["shape"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        if not shape:  # 0-d tensors cannot be sliced
            start, stop, shape = 0, 1, [1]
        stop = shape[0] if stop is None else min(stop, shape[0])
        inner = math.prod(shape[1:])
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = (stop - start) * inner * itemsize
        buf = bytearray(nbytes)
        offset = self._base + info["data_offsets"][0] + start * inner * itemsize
        got = os.preadv(self._fd, [buf], offset) if nbytes else 0
        if got != nbytes:
            raise CheckpointError(f"{self._path}: short read of tensor {name!r} (truncated file?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:]) if nbytes else \
            torch.empty(0, *shape[1:], dtype=dtype)


class MappingSource(Source):
    """A state_dict in memory (or one a torch file unpickled into, memory-mapped)."""

    def __init__(self, mapping: Mapping, where: str = "checkpoint"):
        self._map = mapping
        self.label = where

    def keys(self):
        return self._map.keys()

    def _get(self, name) -> torch.Tensor:
        value = self._map[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{self.label}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise CheckpointError(f"{self.label}: entry {name!r} is on the meta device and holds no values "
                                  "(load the weights before building)")
        return value

    def shape(self, name):
        return tuple(self._get(name).shape)

    def dtype(self, name):
        return self._get(name).dtype

    def rows(self, name, start, stop):
        value = self._get(name).detach()
        return value[start:stop] if value.dim() else value.reshape(1)


class ShardedSource(Source):
    """A sharded checkpoint: an index JSON whose ``weight_map`` names the shard file of every tensor."""

    def __init__(self, index_path: str, trusted: bool = False):
        self.label = index_path
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise CheckpointError(f"{index_path}: not a sharded-checkpoint index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: not a sharded-checkpoint index (weight_map must map names to "
                                  "file names)")
        folder = os.path.dirname(os.path.abspath(index_path))
        self._shard_of = {k: os.path.join(folder, v) for k, v in weight_map.items()}
        for shard in sorted(set(self._shard_of.values())):
            real = os.path.realpath(shard)
            if real == os.path.realpath(index_path) or real.endswith(".json"):
                raise CheckpointError(f"{index_path}: the index names {os.path.relpath(shard, folder)!r} as a "
                                      "shard, an index itself")
            if not trusted and os.path.commonpath([real, os.path.realpath(folder)]) != os.path.realpath(folder):
                raise CheckpointError(f"{index_path} names a shard outside its folder ({os.path.relpath(shard, folder)}); "
                                      "if you trust the index, opt in explicitly: trusted=True (twa: --trusted)")
        missing = sorted({p for p in self._shard_of.values() if not os.path.isfile(p)})
        if missing:
            raise CheckpointError(f"{index_path} names shard(s) that do not exist: {', '.join(missing[:3])}")
        self._trusted = trusted
        self._open: dict[str, Source] = {}

    def _shard(self, name) -> Source:
        path = self._shard_of[name]
        if path not in self._open:
            self._open[path] = open_file(path, self._trusted)
        source = self._open[path]
        if name not in source.keys():
            raise CheckpointError(f"{self.label}: the index puts {name!r} in {path}, which does not hold it")
        return source

    def keys(self):
        return self._shard_of.keys()

    def shape(self, name):
        return self._shard(name).shape(name)

    def dtype(self, name):
        return self._shard(name).dtype(name)

    def rows(self, name, start, stop):
        return self._shard(name).rows(name, start, stop)


_DCP_PACKAGE = "torch.distributed.checkpoint"
_DCP_FUNCTIONS = {("torch.serialization", "_get_layout")}  # a lookup in torch's own table of layouts
_DCP_PATHS = {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}


def _dcp_global(module: str, name: str):
    """What torch.distributed.checkpoint's ``.metadata`` pickle may name, or None: its own dataclasses
    and enums, ``torch.Size``, dtypes, layouts, memory formats and paths; never a function that acts."""
    import dataclasses
    import enum
    import importlib
    import pathlib

    if (module, name) in _DCP_FUNCTIONS:
        return torch.serialization._get_layout
    if (module, name) in _DCP_PATHS:
        return getattr(pathlib, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if module == _DCP_PACKAGE or module.startswith(_DCP_PACKAGE + "."):
        try:
            obj = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
                                      or (issubclass(obj, tuple) and hasattr(obj, "_fields"))):
            return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _dcp_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return obj


def read_dcp_metadata(path: str, trusted: bool = False):
    """The ``Metadata`` of a torch.distributed.checkpoint directory. Its ``.metadata`` is a pickle that
    torch reads with plain ``pickle.load`` (which runs whatever the file names); here it is unpickled
    allowing only the classes that metadata is made of, unless ``trusted``."""
    file = os.path.join(path, ".metadata")
    try:
        with open(file, "rb") as f:
            return pickle.load(f) if trusted else _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        if re.fullmatch(r"[\w.]+\.[\w]+", str(err)):
            raise CheckpointError(
                f"{file} cannot be read without running code from it: it names {err}, which is not part of "
                "torch.distributed.checkpoint's metadata. If you trust the folder, opt in explicitly: "
                "trusted=True (twa: --trusted)") from None
        raise CheckpointError(f"{file}: unreadable torch.distributed.checkpoint metadata ({err})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: unreadable torch.distributed.checkpoint metadata (nested too deep)") from None
    except Exception as err:  # a damaged pickle raises almost anything
        raise CheckpointError(f"{file}: unreadable torch.distributed.checkpoint metadata "
                              f"({type(err).__name__}: {err})") from None


class DistributedCheckpointSource(Source):
    """A ``torch.distributed.checkpoint`` directory, read one whole tensor at a time (the format keeps
    tensors as chunks of the ranks that saved them); the last tensor read is kept for its next rows.
    Its metadata is read by :func:`read_dcp_metadata`, the tensors by DCP (``torch.load(weights_only=True)``)."""

    def __init__(self, path: str, trusted: bool = False):
        from torch.distributed import checkpoint as dcp  # imported only for such a directory
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

        self.label = self._path = path
        self._dcp = dcp
        metadata = read_dcp_metadata(path, trusted)
        if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
            raise CheckpointError(f"{path}/.metadata: not torch.distributed.checkpoint metadata "
                                  f"(it holds a {type(metadata).__name__})")
        self._meta = {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._cached: tuple[str, torch.Tensor] | None = None

        class Reader(dcp.FileSystemReader):
            """DCP's reader, given the metadata read above instead of unpickling the file again."""

            def read_metadata(self, *args, **kwargs):
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                return metadata

        self._reader = Reader

    def keys(self):
        return self._meta.keys()

    def shape(self, name):
        return tuple(self._meta[name].size)

    def dtype(self, name):
        return self._meta[name].properties.dtype

    def tensor(self, name):
        if self._cached is None or self._cached[0] != name:
            out = {name: torch.empty(self.shape(name), dtype=self.dtype(name))}
            try:
                with warnings.catch_warnings():  # reading in one process is the intent here, not a mistake
                    warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                    self._dcp.load(out, storage_reader=self._reader(self._path))
            except (Exception, self._dcp.api.CheckpointException) as err:
                # CheckpointException is a BaseException: it would pass every `except Exception`
                raise CheckpointError(f"{self._path}: cannot read tensor {name!r}: a data file of the folder is "
                                      f"missing, truncated or corrupt ({type(err).__name__})") from None
            self._cached = (name, out[name])
        return self._cached[1]

    def rows(self, name, start, stop):
        value = self.tensor(name)
        return value[start:stop] if value.dim() else value.reshape(1)


class RenamedSource(Source):
    """Another source seen through a name map (name -> the source's key)."""

    def __init__(self, source: Source, key_of: dict[str, str]):
        self._source, self._key_of = source, key_of
        self.label = source.label

    def keys(self):
        return self._key_of.keys()

    def shape(self, name):
        return self._source.shape(self._key_of[name])

    def dtype(self, name):
        return self._source.dtype(self._key_of[name])

    def rows(self, name, start, stop):
        return self._source.rows(self._key_of[name], start, stop)

    def tensor(self, name):
        return self._source.tensor(self._key_of[name])


# ---------------------------------------------------------------------------------------------- opening
def _torch_load(path: str, trusted: bool):
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (torch < 1.6) format
    except pickle.UnpicklingError as err:
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if needs is None:  # not a torch file at all, or a damaged one
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_last_line(err)})") from None
        raise CheckpointError(
            f"{path} cannot be loaded without running code from it (it holds a {needs.group(1)}). If you trust "
            "the file, opt in explicitly: trusted=True (twa: --trusted), which loads it with "
            "torch.load(weights_only=False)") from None
    except FileNotFoundError:
        raise
    except Exception as err:  # torch.load of a damaged file raises almost anything (IndexError for an empty one)
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {first})") from None


def _last_line(err) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def open_file(path: str, trusted: bool = False) -> Source:
    """The source of one file or directory, before unwrapping and renaming."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")):
            return DistributedCheckpointSource(path, trusted)
        for name in HF_WEIGHT_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return open_file(candidate, trusted)
        raise CheckpointError(f"{path} is a directory with no checkpoint in it (looked for .metadata of "
                              f"torch.distributed.checkpoint and {', '.join(HF_WEIGHT_FILES)})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        return SafetensorsSource(path)
    if path.endswith(".json"):
        return ShardedSource(path, trusted)
    return _unwrap(_torch_load(path, trusted), path)


def _holds_tensors(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, where: str) -> Source:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a state_dict (a mapping of names to tensors), got "
                              f"{type(obj).__name__}")
    if _holds_tensors(obj) or not obj:
        return MappingSource(obj, where)
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return _unwrap({k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}, where)
    if any(isinstance(v, torch.Tensor) for v in obj.values()):  # tensors beside a few plain entries
        return MappingSource({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, where)
    raise CheckpointError(f"{where} holds no state_dict: no tensors at the top level or under "
                          f"{', '.join(map(repr, WRAPPER_KEYS))}")


def _strip(key: str, chain: str) -> str | None:
    return key[len(chain):] if key.startswith(chain) else None


def _prefix_chains(keys, depth: int = 3) -> list[str]:
    """Every chain of known prefixes (``module.``, ``_orig_mod.``, ``model.``, up to ``depth`` long) that
    some key starts with, shortest first."""
    chains, frontier = [], [""]
    for _ in range(depth):
        frontier = [c + p for c in frontier for p in PREFIXES if any(k.startswith(c + p) for k in keys)]
        chains += frontier
    return chains


def resolve_names(keys, wanted: Sequence[str] | None, where: str) -> dict[str, str]:
    """name -> checkpoint key by the module's one rule (see the module docstring)."""
    keys = list(keys)
    if wanted is not None:
        key_set = set(keys)
        if all(nm in key_set for nm in wanted):
            return {k: k for k in keys}
        fits = []
        for chain in _prefix_chains(keys):
            stripped = {s: k for k in keys if (s := _strip(k, chain)) is not None}
            if all(nm in stripped for nm in wanted):
                fits.append((chain, stripped))
        if len(fits) > 1:
            raise CheckpointError(f"{where}: the model's names match the checkpoint with either of the prefixes "
                                  f"{' or '.join(repr(c) for c, _ in fits)} stripped; say which with key_map=")
        if fits:
            return fits[0][1]
        return {k: k for k in keys}  # the caller reports what is missing
    common = [c for c in _prefix_chains(keys) if keys and all(k.startswith(c) for k in keys)]
    chain = max(common, key=len, default="")
    return {k[len(chain):]: k for k in keys}


def _apply_key_map(keys, key_map) -> dict[str, str]:
    """new key -> original key."""
    out = {}
    for k in keys:
        new = key_map(k) if callable(key_map) else key_map.get(k, k)
        if new is None:
            continue  # a key the map drops
        if new in out:
            raise CheckpointError(f"key_map maps both {out[new]!r} and {k!r} to {new!r}")
        out[new] = k
    return out


def open_checkpoint(checkpoint, wanted: Sequence[str] | None = None, *, key_map: Mapping | Callable | None = None,
                    trusted: bool = False, where: str | None = None) -> Source:
    """A checkpoint (state_dict, file or directory) as a :class:`Source` whose keys are the model's names."""
    where = where or label(checkpoint)
    if isinstance(checkpoint, (str, os.PathLike)):
        source = open_file(os.fspath(checkpoint), trusted)
    elif isinstance(checkpoint, Mapping):
        source = _unwrap(checkpoint, where)
    else:
        raise TypeError(f"{where}: expected a state_dict, a file or a directory, got {type(checkpoint).__name__}")
    source.label = where
    if key_map is not None:
        source = RenamedSource(source, _apply_key_map(source.keys(), key_map))
    key_of = resolve_names(source.keys(), wanted, where)
    if any(name != key for name, key in key_of.items()):
        source = RenamedSource(source, key_of)
    return source


def load_state_dict(checkpoint, *, key_map=None, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A whole state_dict from any checkpoint the reader takes (never running code from the file unless
    ``trusted``)."""
    source = open_checkpoint(checkpoint, key_map=key_map, trusted=trusted)
    return {k: source.tensor(k) for k in source.keys()}


# ---------------------------------------------------------------------------------------------- sets
class CheckpointSet:
    """n checkpoints checked against the model's parameter names and shapes; rows read on demand."""

    def __init__(self, checkpoints, names: Sequence[str], shapes: Sequence[tuple[int, ...]], *,
                 key_map=None, trusted: bool = False):
        if isinstance(checkpoints, (str, os.PathLike, Mapping)):
            raise TypeError("checkpoints must be a sequence of state_dicts or paths, not a single one")
        checkpoints = list(checkpoints)
        if len(checkpoints) < 2:
            raise ValueError(f"TWA needs at least two checkpoints to span a subspace, got {len(checkpoints)}")
        self.labels = [label(c, i) for i, c in enumerate(checkpoints)]
        self.sources = []
        for where, ckpt in zip(self.labels, checkpoints):
            try:
                source = open_checkpoint(ckpt, list(names), key_map=key_map, trusted=trusted, where=where)
            except (TypeError, FileNotFoundError) as err:
                raise type(err)(f"{where}: {err}") from None
            self.check(source, names, shapes)
            self.sources.append(source)

    @staticmethod
    def check(source: Source, names, shapes) -> None:
        """Every name present, with the model's shape and a floating-point dtype."""
        keys = source.keys()
        missing = [nm for nm in names if nm not in keys]
        if missing:
            shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
            raise ValueError(f"{source.label} lacks {len(missing)} of the model's parameters: {shown}")
        for nm, shape in zip(names, shapes):
            got = source.shape(nm)
            if tuple(got) != tuple(shape) and not (tuple(shape) == () and tuple(got) in ((), (1,))):
                raise ValueError(f"{source.label}: parameter {nm!r} has shape {tuple(got)}, the model's has "
                                 f"{tuple(shape)}")
            if not source.dtype(nm).is_floating_point:
                raise ValueError(f"{source.label}: parameter {nm!r} is {source.dtype(nm)}, not floating point")

    def __len__(self):
        return len(self.sources)

    def rows(self, name: str, start: int, stop: int, dtype=torch.float64) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of one tensor from every checkpoint, flattened: [n, m]."""
        out = None
        for i, source in enumerate(self.sources):
            chunk = source.rows(name, start, stop).reshape(-1)
            if not torch.isfinite(chunk).all():
                raise ValueError(f"{source.label}: parameter {name!r} contains NaN or Inf")
            if out is None:
                out = torch.empty(len(self.sources), chunk.numel(), dtype=dtype)
            out[i].copy_(chunk)  # converts to float64 in place: no per-checkpoint temporaries
        return out

    def fingerprint(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]], full: bool = False,
                    chunk_elems: int = 1 << 18) -> str:
        """A content hash of the set, so that ranks given different checkpoints differ here before any
        work is done: the first and last row of every tensor of every checkpoint (where the subspace's
        own statistics, read from every row, catch the rest), or with ``full`` every row, read in chunks
        (for a placement whose ranks each read only their own rows)."""
        h = hashlib.sha256()
        for nm, shape in zip(names, shapes):
            rows = shape[0] if shape else 1
            if full:
                step = max(1, chunk_elems // max(1, math.prod(shape[1:]) if len(shape) > 1 else 1))
                starts = range(0, rows, step)
            else:
                step, starts = 1, sorted({0, rows - 1})
            for r0 in starts:
                h.update(self.rows(nm, r0, min(r0 + step, rows)).numpy().tobytes())
        return h.hexdigest()
