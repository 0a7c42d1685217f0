"""One flat buffer for all trainable parameters (and one for their gradients).

The parameters become views of ``data`` and their ``.grad`` views of ``grad``, so one kernel launch
updates every layer in place and autograd accumulates straight into the flat gradient. Nothing is
copied on the hot path unless a user replaced a ``.grad`` (``model.zero_grad()`` sets them to None):
then that gradient is copied in once and the view is put back.
"""

from __future__ import annotations

import torch


class FlatParameters:
    def __init__(self, params: list[torch.Tensor], padded_numel: int = 0):
        """``padded_numel``: allocate at least this many elements (row-sharded training reduce-scatters
        and all-gathers the flat vectors in k equal pieces); the tail past the parameters stays 0."""
        self.params = params
        first = params[0]
        self.numel = sum(p.numel() for p in params)
        size = max(self.numel, padded_numel)
        self.padded_data = torch.zeros(size, dtype=first.dtype, device=first.device)
        self.padded_grad = torch.zeros(size, dtype=first.dtype, device=first.device)
        self.data = self.padded_data[: self.numel]
        self.grad = self.padded_grad[: self.numel]
        self.data_views, self.grad_views = [], []
        offset = 0
        for p in params:
            sl = slice(offset, offset + p.numel())
            offset += p.numel()
            self.data[sl].copy_(p.detach().reshape(-1))
            if p.grad is not None:
                self.grad[sl].copy_(p.grad.reshape(-1))
            dv = self.data[sl].view_as(p)
            gv = self.grad[sl].view_as(p)
            p.data = dv
            p.grad = gv
            self.data_views.append(dv)
            self.grad_views.append(gv)

    def gathered_grad(self) -> torch.Tensor:
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view
        return self.grad

    def zero_grad(self) -> None:
        self.padded_grad.zero_()
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not view:
                p.grad = view
