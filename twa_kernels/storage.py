"""Saving and loading subspaces: one ``.safetensors`` file (per rank, for a sharded subspace) holding the
tensors and a JSON record, so loading never runs code; and the fingerprint that ties an optimizer state
to the subspace it was trained in.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoints import CheckpointError, remove_stale_temporaries, temporary_name
from .packing import LayerLayout, PackedProjection
from .parts import SubspaceParts
from .placement import from_dict, group_or_world

FORMAT_VERSION = 3  # 2: the checkpoints' spread per layer; 3: the checksum covers the JSON record too


def record(space) -> dict:
    """What identifies a subspace apart from its tensors (the same on every rank)."""
    return {
        "format_version": FORMAT_VERSION, "names": space.names, "shapes": space.shapes,
        "layers": space.layers_mode, "decouple": space.decouple_mode, "scale": space.scale_mode,
        "n": space.n, "bits": space.bits, "layer_sizes": list(space.layer_sizes),
    }


def tensors(space) -> dict:
    p = space.projection
    out = {"center": space.center, "scale": space.global_scale, "zero": space.global_zero,
           "col_norms": space.col_norms, "spread": space.spread, "frozen": space.frozen.to(torch.uint8)}
    if p.words is not None:
        out["words"] = p.words
    else:
        out["dense_rows"] = p.dense_rows
    if space.transform is not None:
        out["transform"] = space.transform
    if space.checkpoint_coords is not None:
        out["checkpoint_coords"] = space.checkpoint_coords
    return out


def fingerprint(space) -> str:
    """A hash of what every rank shares (record, scales, zeros, norms, frozen layers, transform)."""
    h = hashlib.sha256(json.dumps(record(space), sort_keys=True).encode())
    stored = tensors(space)
    for key in ("scale", "zero", "col_norms", "spread", "frozen"):
        h.update(stored[key].contiguous().cpu().numpy().tobytes())
    if space.transform is not None:
        h.update(space.transform.contiguous().numpy().tobytes())
    if space.checkpoint_coords is not None:
        h.update(space.checkpoint_coords.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def checksum(stored: dict, meta: str) -> str:
    """sha256 of the JSON record ``meta`` and every stored tensor's bytes (name, dtype, shape and data, in
    name order): a flipped bit anywhere in a saved subspace, w̄, P̃, scales or sizes, changes it."""
    h = hashlib.sha256(meta.encode())
    for name in sorted(stored):
        t = stored[name].contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(space, path) -> str:
    """Write ``space`` to ``path`` (``{rank}`` in it is replaced by the rank); returns the path written.
    Written to a temporary name first: a half-written file never lies under the user's name."""
    path = space.placement.file_path(path)
    meta = dict(record(space), shard=space.placement.to_dict(), local_sizes=list(space.projection.layout.sizes),
                local_n=space.projection.layout.n)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    tmp = temporary_name(path)
    stored = {k: v.contiguous() for k, v in tensors(space).items()}
    text = json.dumps(meta)
    save_file(stored, tmp, metadata={"twa_subspace": text, "fingerprint": space.fingerprint,
                                     "checksum": checksum(stored, text)})
    os.replace(tmp, path)
    return path


def load(cls, path, process_group=None):
    """A subspace of class ``cls`` from ``path``; a sharded one only on the rank and world size that saved it.
    A file that is not an intact subspace of this format raises :class:`CheckpointError` naming it."""
    rank = dist.get_rank(process_group) if "{rank}" in os.fspath(path) and dist.is_initialized() else 0
    path = os.fspath(path).replace("{rank}", str(rank))
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a subspace file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no subspace file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta_raw = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error type, OSError, allocation of a huge shape
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if "twa_subspace" not in meta_raw:
        raise CheckpointError(f"{path} is not a twa_kernels subspace file")
    try:
        meta = json.loads(meta_raw["twa_subspace"])
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: its subspace record is not valid JSON ({err})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: subspace format {version} is not {FORMAT_VERSION}; rebuild it with this "
                              "version of twa_kernels")
    if "checksum" not in meta_raw:
        raise CheckpointError(f"{path}: the subspace file has no checksum (altered or corrupt file?)")
    if checksum(stored, meta_raw["twa_subspace"]) != meta_raw["checksum"]:
        raise CheckpointError(f"{path}: the stored record and tensors do not match their checksum (corrupt file?)")
    try:
        return _build(cls, path, meta, meta_raw, stored, process_group)
    except (KeyError, TypeError, IndexError, RuntimeError) as err:  # our own ValueErrors name the file already
        raise CheckpointError(f"{path}: an inconsistent subspace file ({type(err).__name__}: {err})") from None


def _build(cls, path, meta, meta_raw, stored, process_group):
    placement = from_dict(meta.get("shard"))
    group = None
    if placement.mode is not None:
        group = group_or_world(process_group)
        placement.check_rank(path, group)
    layout = LayerLayout(tuple(meta["local_sizes"]), meta["local_n"], meta["bits"])
    gscale, gzero = stored["scale"], stored["zero"]
    cols = placement.column_slice(meta["n"])
    proj = PackedProjection(layout, gscale[:, cols].contiguous(), gzero[:, cols].contiguous(),
                            stored.get("words"), stored.get("dense_rows"))
    space = cls(SubspaceParts(names=meta["names"], shapes=meta["shapes"], layers_mode=meta["layers"],
                              decouple_mode=meta["decouple"], scale_mode=meta["scale"], center=stored["center"],
                              projection=proj, col_norms=stored["col_norms"], spread=stored["spread"],
                              transform=stored.get("transform"), checkpoint_coords=stored.get("checkpoint_coords"),
                              frozen=stored["frozen"].bool(), layer_sizes=meta["layer_sizes"], global_scale=gscale,
                              global_zero=gzero, placement=placement, process_group=group))
    if space.fingerprint != meta_raw.get("fingerprint"):
        raise CheckpointError(f"{path}: contents do not match the stored fingerprint (corrupt file?)")
    return space
