"""The user's parameters, bound to the subspace's layers, as the kernels read them every step.

Nothing is re-viewed or copied: the kernels find each parameter and its gradient by address
(:mod:`twa_kernels.backends.contract`), so the parameters stay the user's own tensors, ``.grad`` is
whatever autograd (or the user) put there, and ``zero_grad(set_to_none=True)`` behaves as torch
documents. Every step the binding compares the parameters' addresses with the last step's (O(L) host
work, no device work): when a storage changed — ``model.to(device or dtype)``, ``.cuda()``, ``.half()``,
a replaced ``p.data`` — it checks the parameters again and tells the optimizer, which follows them to
where they now are; what it cannot follow (parameters on several devices, a changed shape, a
non-contiguous parameter) raises an error naming the parameter.
"""

from __future__ import annotations

import torch

from ..placement import is_dtensor

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def bind_parameters(items, names, shapes, model_params=None):
    """The given tensors in the subspace's layer order.

    ``items``: ``(tensor, name or None)`` of every trainable parameter given to the optimizer, in any
    grouping and order. Named tensors bind by name; plain tensors by identity with ``model_params``
    (name -> tensor of the model the subspace is bound to) when that holds them all, else by position."""
    expected = dict(zip(names, shapes))
    if all(nm is not None for _, nm in items):
        by_name = {}
        for t, nm in items:
            if nm not in expected:
                raise ValueError(f"parameter {nm!r} belongs to no layer of the subspace")
            by_name[nm] = t
    elif model_params is not None and _all_known(items, model_params):
        name_of = {id(t): nm for nm, t in model_params.items()}
        by_name = {name_of[id(t)]: t for t, _ in items}
    else:
        if len(items) != len(names):
            raise ValueError(f"the optimizer got {len(items)} trainable parameters, the subspace was built for "
                             f"{len(names)}; a subspace loaded from a file binds by name: "
                             "twa.Subspace.load(path, model=model), or pass model.named_parameters()")
        by_name = {nm: t for (t, _), nm in zip(items, names)}
    missing = [nm for nm in names if nm not in by_name]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ValueError(f"{len(missing)} layer(s) of the subspace have no tensor among the optimizer's parameters: "
                         f"{shown} (the subspace fixes the layers: pass every trainable parameter of the model)")
    ordered = [by_name[nm] for nm in names]
    if len({id(t) for t in ordered}) != len(ordered):
        raise ValueError("a parameter appears more than once")
    for t, nm, shape in zip(ordered, names, shapes):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"parameter {nm!r}: the model's has shape {tuple(t.shape)}, the subspace's "
                             f"{tuple(shape)} (pass parameters in model order, or pass named parameters, e.g. "
                             "model.named_parameters(), in any order)")
    return ordered


def _all_known(items, model_params) -> bool:
    known = {id(t) for t in model_params.values()}
    return all(id(t) in known for t, _ in items)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels read: itself, or this rank's shard of an FSDP2 DTensor."""
    return t.to_local() if is_dtensor(t) else t


class ParameterBinding:
    """The bound parameters (subspace layer order) and the tensors a step hands the kernels. Under FSDP2
    those are the parameters' and gradients' local shards."""

    def __init__(self, params: list[torch.Tensor], names: list[str]):
        self.params = list(params)
        self.names = list(names)
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self._key = None
        self._zeros = None
        self.device, self.dtype = self._validate()
        self._key = self._addresses()

    # ------------------------------------------------------------------ what moved
    def _addresses(self):
        return tuple(local(p).data_ptr() for p in self.params)

    def _validate(self) -> tuple[torch.device, torch.dtype]:
        devices = {}
        for nm, p in zip(self.names, self.params):
            devices.setdefault(p.device, nm)
        if len(devices) > 1:
            shown = ", ".join(f"{nm!r} on {dev}" for dev, nm in devices.items())
            raise ValueError(f"parameters are on different devices ({shown}); TWA keeps all trainable parameters "
                             "on one device per process")
        dtypes = {}
        for nm, p in zip(self.names, self.params):
            dtypes.setdefault(p.dtype, nm)
        if len(dtypes) > 1:
            shown = ", ".join(f"{nm!r} is {dt}" for dt, nm in dtypes.items())
            raise ValueError(f"parameters have mixed dtypes ({shown}); use one dtype")
        (dtype,) = dtypes
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"unsupported parameter dtype {dtype}")
        for nm, p, size in zip(self.names, self.params, self.sizes):
            if p.numel() != size:
                raise ValueError(f"parameter {nm!r} now has {p.numel()} elements, it had {size} when the "
                                 "optimizer was made")
            if not local(p).is_contiguous():
                raise ValueError(f"parameter {nm!r} is not contiguous (channels_last?): TWA updates weights in place "
                                 "in row-major order; use model.to(memory_format=torch.contiguous_format)")
        (device,) = devices
        return device, dtype

    def moved(self) -> bool:
        """Whether any parameter's storage changed since the last call (then the parameters are checked
        again: :attr:`device` and :attr:`dtype` say where they are now)."""
        key = self._addresses()
        if key == self._key:
            return False
        self.device, self.dtype = self._validate()
        self._key = key
        self._zeros = None
        return True

    def replace(self, params: list[torch.Tensor]) -> None:
        """Bind new tensors for the same layers (the model's parameters were replaced)."""
        self.params = list(params)
        self._key = None

    # ------------------------------------------------------------------ what a step reads
    def weights(self) -> list[torch.Tensor]:
        return [local(p) for p in self.params]

    def grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient as the kernels read it: a missing one reads as zeros, a
        non-contiguous one (a channels_last layer's) as a contiguous copy."""
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                g = self._zero(local(p).numel())
            else:
                g = local(g)
                if not g.is_contiguous():
                    g = g.contiguous()
            out.append(g)
        return out

    def any_grad(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def _zero(self, numel: int) -> torch.Tensor:
        if self._zeros is None:
            self._zeros = torch.zeros(max(self.sizes), dtype=self.dtype, device=self.device)
        return self._zeros[:numel]
