"""Numerics every backend and the optimizer share: the accumulation precision and the in-place update
with Kahan compensation for bf16/fp16 weights."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_update(w: torch.Tensor, dw: torch.Tensor, compensation: torch.Tensor | None) -> None:
    """w += dw in place. With a compensation buffer (bf16/fp16 weights) the pair (w, comp) carries the
    exact sum: y = w + (dw + comp); w = round(y); comp = y − w (Kahan summation). Every backend uses
    this order of operations."""
    acc = accumulation_dtype(w.dtype)
    if compensation is None:
        if w.dtype == acc:
            w.add_(dw)
        else:
            w.copy_(w.to(acc) + dw)
        return
    y = w.to(acc) + (dw + compensation.to(acc))
    rounded = y.to(w.dtype)
    compensation.copy_(y - rounded.to(acc))
    w.copy_(rounded)
