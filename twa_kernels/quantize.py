"""Uniform min-max quantization of P (Eq. 16 of the paper), producing the codes and affine parameters
of the packed format in :mod:`twa_kernels.packing`: ``P̃ = scale · q + zero`` per (layer, column),
q ∈ {0 … 2^B − 1}.

``scale_mode``:

* ``"layer"``: the paper's Eq. 16, one (scale, zero) per layer, stored per column for the kernels;
* ``"column"``: min-max per column;
* ``"column_norm"``: per column, then rescaled so each dequantized column keeps the norm of the exact
  one (:func:`column_norm_ratio`): at 1–2 bits min-max codes inflate column norms by roughly
  max|P|·√D_l, which makes a learning rate tuned at 4 bits diverge.

A column that is identically zero (a dropped checkpoint, a frozen layer) gets scale = zero = 0, so it
dequantizes to exactly 0 whatever its codes, and a constant layer never divides by zero.
"""

from __future__ import annotations

import torch

SCALE_MODES = ("layer", "column", "column_norm")


def min_max_quantizer(lo: torch.Tensor, hi: torch.Tensor, live: torch.Tensor, bits: int,
                      scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scale, zero) per column from the fp64 column extremes ``lo``/``hi``; ``live`` marks the
    columns that are not identically zero."""
    levels = (1 << bits) - 1
    n = lo.shape[0]
    if scale_mode == "layer":
        lo = torch.where(live, lo, torch.inf).min().expand(n)
        hi = torch.where(live, hi, -torch.inf).max().expand(n)
    a = ((hi - lo) / levels).float()
    b = lo.float()
    return torch.where(live, a, torch.zeros_like(a)), torch.where(live, b, torch.zeros_like(b))


def quantize(p: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (as float64 integers) of the fp64 rows ``p`` [m, n]: round to nearest, clamped to the range."""
    levels = (1 << bits) - 1
    return torch.where(scale > 0, torch.round((p - zero) / scale.clamp_min(1e-300)),
                       torch.zeros_like(p)).clamp_(0, levels)


def column_norm_ratio(exact_sq: torch.Tensor, quant_sq: torch.Tensor) -> torch.Tensor:
    """fp32 factor per column that gives each dequantized column the norm of the exact one."""
    return torch.where(quant_sq > 0, (exact_sq / quant_sq.clamp_min(1e-300)).sqrt(),
                       torch.zeros_like(quant_sq)).float()
