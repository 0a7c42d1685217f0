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

from .packing import LayerLayout, PackedProjection
from .placement import from_dict, group_or_world

FORMAT_VERSION = 2  # 2: the checkpoints' spread per layer (scale-aware coordinates)


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


def checksum(stored: dict) -> str:
    """sha256 of every stored tensor's bytes (name, dtype, shape and data, in name order): a flipped bit
    anywhere in a saved subspace changes it."""
    h = hashlib.sha256()
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
    tmp = f"{path}.tmp-{os.getpid()}"
    stored = {k: v.contiguous() for k, v in tensors(space).items()}
    save_file(stored, tmp, metadata={"twa_subspace": json.dumps(meta), "fingerprint": space.fingerprint,
                                     "checksum": checksum(stored)})
    os.replace(tmp, path)
    return path


def load(cls, path, process_group=None):
    """A subspace of class ``cls`` from ``path``; a sharded one only on the rank and world size that saved it."""
    rank = dist.get_rank(process_group) if "{rank}" in os.fspath(path) and dist.is_initialized() else 0
    path = os.fspath(path).replace("{rank}", str(rank))
    with safe_open(path, framework="pt", device="cpu") as f:
        meta_raw = f.metadata() or {}
        if "twa_subspace" not in meta_raw:
            raise ValueError(f"{path} is not a twa_kernels subspace file")
        meta = json.loads(meta_raw["twa_subspace"])
        stored = {k: f.get_tensor(k) for k in f.keys()}
    if "checksum" in meta_raw and checksum(stored) != meta_raw["checksum"]:
        raise ValueError(f"{path}: the stored tensors do not match their checksum (corrupt file?)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: subspace format {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}; rebuild it with this version of twa_kernels")
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
    space = cls(names=meta["names"], shapes=meta["shapes"], layers_mode=meta["layers"],
                decouple_mode=meta["decouple"], scale_mode=meta["scale"], center=stored["center"],
                projection=proj, col_norms=stored["col_norms"], spread=stored["spread"], transform=stored.get("transform"),
                checkpoint_coords=stored.get("checkpoint_coords"),
                frozen=stored["frozen"].bool(), layer_sizes=meta["layer_sizes"], global_scale=gscale,
                global_zero=gzero, placement=placement, process_group=group)
    if space.fingerprint != meta_raw.get("fingerprint"):
        raise ValueError(f"{path}: contents do not match the stored fingerprint (corrupt file?)")
    return space
