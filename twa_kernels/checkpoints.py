"""Reading checkpoints safely and in slices.

A checkpoint is a state_dict (a mapping of names to tensors) or a path to one: ``.safetensors`` files
are opened with safetensors, anything else with ``torch.load(weights_only=True, mmap=True)``, so
loading never runs code and a slice of a tensor reads only the pages it touches. That lets a subspace
be built from many checkpoints that together are far larger than memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")


def _label(source, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"checkpoint {index} ({os.fspath(source)})"
    return f"checkpoint {index}"


class _SafetensorsSource:
    def __init__(self, path: str):
        from safetensors import safe_open

        self._file = safe_open(path, framework="pt", device="cpu")
        self._keys = set(self._file.keys())

    def keys(self):
        return self._keys

    def shape(self, name):
        return tuple(self._file.get_slice(name).get_shape())

    def rows(self, name, start, stop):
        if not self.shape(name):  # 0-d tensors cannot be sliced
            return self._file.get_tensor(name).reshape(1)
        return self._file.get_slice(name)[start:stop]


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
        out = []
        for label, source in zip(self.labels, self.sources):
            chunk = source.rows(name, start, stop).to(dtype).reshape(-1)
            if not torch.isfinite(chunk).all():
                raise ValueError(f"{label}: parameter {name!r} contains NaN or Inf")
            out.append(chunk)
        return torch.stack(out)
