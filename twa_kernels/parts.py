"""What a :class:`~twa_kernels.subspace.Subspace` is made of, as plain data: construction computes it, a
subspace file stores it and ``testing`` makes one up, and ``Subspace(parts)`` is built from it, so the
modules below ``subspace`` never need the class (the package's imports run one way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import PackedProjection
from .placement import Placement

# A layer whose checkpoints all lie within this fraction of its centre's norm of the centre moved only by
# the rounding of fp32 weights (a few units in the last place; e.g. a bias that feeds a BatchNorm, whose
# gradient is zero but for rounding): the directions are noise, so the layer is held fixed. 2^-18 is 32
# fp32 ulps, far below any layer a training run moves (the smallest seen in this package's benchmarks
# moved 2.6 % of its norm).
NOISE_RTOL = 2.0**-18


def held_reasons(labels, spread, frozen, center_norms=None) -> dict[str, str]:
    """Why each held layer is held: identical in every checkpoint, or moved only by rounding."""
    out = {}
    for l in torch.nonzero(frozen).flatten().tolist():
        if float(spread[l]) == 0.0:
            out[labels[l]] = "is identical in every checkpoint"
            continue
        rel = "" if center_norms is None else f", {float(spread[l]) / max(float(center_norms[l]), 1e-300):.1e} of its norm"
        out[labels[l]] = f"moved only by rounding (spread {float(spread[l]):.1e}{rel}, below {NOISE_RTOL:.1e} of its norm)"
    return out


@dataclass
class SubspaceParts:
    names: list[str]
    shapes: list[tuple[int, ...]]
    layers_mode: str
    decouple_mode: str
    scale_mode: str
    center: torch.Tensor  # fp32 [D] (this rank's rows of it when sharded by rows), CPU
    projection: PackedProjection  # this rank's part of P̃, CPU
    col_norms: torch.Tensor  # fp64 [L, n]: ‖x_i − s‖ per layer
    spread: torch.Tensor  # fp64 [L]: rms_i ‖x_i − w̄‖, the checkpoints' own scale
    transform: torch.Tensor | None  # fp64 [L, n, n] for gram_schmidt, else None
    frozen: torch.Tensor  # bool [L]
    checkpoint_coords: torch.Tensor | None = None  # fp64 [L, n, n] for gram_schmidt: Pᵀ x_i as columns
    layer_sizes: tuple[int, ...] | None = None  # of the whole subspace (default: the projection's)
    global_scale: torch.Tensor | None = None  # of every column, all ranks' (default: the projection's)
    global_zero: torch.Tensor | None = None
    placement: Placement | None = None
    process_group: object = None
