"""Reading checkpoints safely and in slices.

A checkpoint is a state_dict (a mapping of names to tensors) or a path to one: ``.safetensors`` files
are opened with safetensors, anything else with ``torch.load(weights_only=True, mmap=True)``, so
loading never runs code and a slice of a tensor reads only the pages it touches. That lets a subspace
be built from many checkpoints that together are far larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence

import torch

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _label(source, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"checkpoint {index} ({os.fspath(source)})"
    return f"checkpoint {index}"


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsSource:
    """Rows of a tensor in a .safetensors file read with one ``pread`` each.

    safetensors' own loader memory-maps the file; for checkpoint sets larger than memory, page-faulting
    through the maps costs more system time than the reading itself, so the row range is read straight
    into a buffer instead. The header is parsed as the format specifies (8-byte little-endian length,
    JSON of dtype, shape and byte offsets) and checked against the file size."""

    def __init__(self, path: str):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{path} is not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"{path} is not a safetensors file (header length {n} past the end)")
            header = json.loads(f.read(n))
        self._path = path
        self._base = 8 + n
        self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in self._meta.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected or self._base + end > size:
                raise ValueError(f"{path}: tensor {name!r} has inconsistent offsets (corrupt file?)")
        self._fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def keys(self):
        return self._meta.keys()

    def shape(self, name):
        return tuple(self._meta[name]["shape"])

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
            raise ValueError(f"{self._path}: short read of tensor {name!r}")
        return torch.frombuffer(buf, dtype=dtype).reshape(stop - start, *shape[1:]) if nbytes else \
            torch.empty(0, *shape[1:], dtype=dtype)


class _MappingSource:
    def __init__(self, mapping: Mapping):
        self._map = mapping

    def keys(self):
        return self._map.keys()

    def shape(self, name):
        value = self._map[name]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"entry {name!r} is a {type(value).__name__}, not a tensor")
        return tuple(value.shape)

    def rows(self, name, start, stop):
        value = self._map[name]
        return value[start:stop] if value.dim() else value.reshape(1)


def _unwrap(obj, names):
    """Accept ``{"state_dict": sd, ...}`` wrappers and DDP's ``module.`` prefix."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    if names and names[0] not in obj:
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping) and names[0] in obj[key]:
                return _unwrap(obj[key], names)
        if names and all(k.startswith("module.") for k in obj.keys()) and f"module.{names[0]}" in obj:
            return {k[len("module."):]: v for k, v in obj.items()}
    return obj


def open_source(checkpoint, names):
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file at {path}")
        if path.endswith(".safetensors"):
            return _SafetensorsSource(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return _MappingSource(_unwrap(obj, names))
    return _MappingSource(_unwrap(checkpoint, names))


class CheckpointSet:
    """n checkpoints checked against the model's parameter names and shapes; rows read on demand."""

    def __init__(self, checkpoints, names: Sequence[str], shapes: Sequence[tuple[int, ...]]):
        if isinstance(checkpoints, (str, os.PathLike, Mapping)):
            raise TypeError("checkpoints must be a sequence of state_dicts or paths, not a single one")
        checkpoints = list(checkpoints)
        if len(checkpoints) < 2:
            raise ValueError(
                f"TWA needs at least two checkpoints to span a subspace, got {len(checkpoints)}"
            )
        self.labels = [_label(c, i) for i, c in enumerate(checkpoints)]
        self.sources = []
        for label, ckpt in zip(self.labels, checkpoints):
            try:
                source = open_source(ckpt, list(names))
            except (TypeError, FileNotFoundError) as err:
                raise type(err)(f"{label}: {err}") from None
            keys = source.keys()
            missing = [nm for nm in names if nm not in keys]
            if missing:
                shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
                raise ValueError(
                    f"{label} lacks {len(missing)} of the model's parameters: {shown}"
                )
            for nm, shape in zip(names, shapes):
                got = source.shape(nm)
                if tuple(got) != tuple(shape) and not (tuple(shape) == () and tuple(got) in ((), (1,))):
                    raise ValueError(
                        f"{label}: parameter {nm!r} has shape {tuple(got)}, the model's has {tuple(shape)}"
                    )
            self.sources.append(source)

    def __len__(self):
        return len(self.sources)

    def rows(self, name: str, start: int, stop: int, dtype=torch.float64) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of one tensor from every checkpoint, flattened: [n, m]."""
        out = None
        for i, (label, source) in enumerate(zip(self.labels, self.sources)):
            chunk = source.rows(name, start, stop).reshape(-1)
            if not torch.isfinite(chunk).all():
                raise ValueError(f"{label}: parameter {name!r} contains NaN or Inf")
            if out is None:
                out = torch.empty(len(self.sources), chunk.numel(), dtype=dtype)
            out[i].copy_(chunk)  # converts to float64 in place: no per-checkpoint temporaries
        return out

    def fingerprint(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> str:
        """A cheap content hash of the set: the first and last row of every tensor of every checkpoint.
        Ranks given different checkpoints differ here before any work is done."""
        h = hashlib.sha256()
        for nm, shape in zip(names, shapes):
            rows = shape[0] if shape else 1
            for r0 in sorted({0, rows - 1}):
                h.update(self.rows(nm, r0, r0 + 1).numpy().tobytes())
        return h.hexdigest()
