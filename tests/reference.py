"""TWA written straight from the equations of the paper / docs/DESIGN.md, in float64, for the tests.

Nothing here calls twa_kernels: it is the independent statement the package is checked against.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TinyNet(nn.Module):
    """Sizes chosen to hit edges: odd widths, and a 0-d parameter (a one-element layer)."""

    def __init__(self, d_in=5, hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) * self.gain


def make_model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TinyNet(**kw).to(dtype)


def make_checkpoints(model, n, seed=1, step=0.05):
    """A random-walk 'training run': n state_dicts (clones; the model itself is not changed)."""
    gen = torch.Generator().manual_seed(seed)
    current = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for _ in range(n):
        current = {k: v + step * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in current.items()}
        out.append({k: v.clone() for k, v in current.items()})
    return out


def layer_stacks(checkpoints, names, layers="param"):
    """Per layer: the [n, D_l] float64 stack of checkpoints."""
    per_param = [torch.stack([ck[nm].double().reshape(-1) for ck in checkpoints]) for nm in names]
    return per_param if layers == "param" else [torch.cat(per_param, dim=1)]


def projection(x, decouple):
    """P (float64, [D_l, n]) of one layer from its [n, D_l] stack (section 1 of docs/DESIGN.md)."""
    if decouple == "center":
        d = x - x.mean(dim=0)
        return (d / d.norm(dim=1, keepdim=True)).T
    if decouple == "none":
        return (x / x.norm(dim=1, keepdim=True)).T
    basis = []  # modified Gram-Schmidt on the raw checkpoints, in order
    for v in x:
        norm0 = v.norm()
        v = v.clone()
        for e in basis:
            v -= (e @ v) * e
        # In the span of the earlier checkpoints (always once i >= D_l): a zero column.
        basis.append(v / v.norm() if v.norm() > 1e-6 * norm0 else torch.zeros_like(v))
    return torch.stack(basis, dim=1)


def quantize(p, bits, scale="layer"):
    """Eq. 16 with the scale and zero stored in float32, as the format specifies.

    Returns (codes, dequantized float64, |q·a| + |b|: the size fp32 dequantization rounds at)."""
    if bits is None:
        return None, p.float().double(), p.abs()
    levels = 2**bits - 1
    # A column that is identically zero (dependent checkpoint) decodes to exactly 0 and is left out
    # of the min-max range: the format's refinement of Eq. 16.
    live = p.abs().amax(dim=0) > 0
    if scale == "layer":
        lo = p[:, live].min().expand(p.shape[1])
        hi = p[:, live].max().expand(p.shape[1])
    else:
        lo, hi = p.min(dim=0).values, p.max(dim=0).values
    a = torch.where(live, ((hi - lo) / levels).float().double(), torch.zeros(()))
    b = torch.where(live, lo.float().double(), torch.zeros(()))
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    q = torch.where(a > 0, torch.round((p - b) / safe_a), torch.zeros_like(p)).clamp(0, levels)
    return q, q * a + b, (q * a).abs() + b.abs()


def flat_from_layers(vectors):
    return torch.cat([v.reshape(-1) for v in vectors])


def sgd_rule(hp):
    lr, mu, damp, wd, nesterov = hp["lr"], hp.get("momentum", 0.0), hp.get("dampening", 0.0), \
        hp.get("weight_decay", 0.0), hp.get("nesterov", False)
    state = {}

    def update(beta, c, step):
        d = c + wd * beta
        if mu:
            buf = d.clone() if step == 1 else mu * state["buf"] + (1 - damp) * d
            state["buf"] = buf
            d = d + mu * buf if nesterov else buf
        return beta - lr * d

    return update


def adamw_rule(hp):
    lr, (b1, b2), eps, wd = hp["lr"], hp.get("betas", (0.9, 0.999)), hp.get("eps", 1e-8), hp.get("weight_decay", 0.0)
    amsgrad = hp.get("amsgrad", False)
    state = {}

    def update(beta, c, step):
        m = (1 - b1) * c if step == 1 else b1 * state["m"] + (1 - b1) * c
        v = (1 - b2) * c * c if step == 1 else b2 * state["v"] + (1 - b2) * c * c
        state["m"], state["v"] = m, v
        if amsgrad:
            vmax = v if step == 1 else torch.maximum(state["vmax"], v)
            state["vmax"] = vmax
            v = vmax
        m_hat = m / (1 - b1**step)
        v_hat = v / (1 - b2**step)
        return beta * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)

    return update


def spread(x):
    """The rms distance of a layer's checkpoints ([n, D_l]) from their mean."""
    return float((x - x.mean(dim=0)).norm(dim=1).square().mean().sqrt())


def in_coordinates(update, scale):
    """The rule run on x = β / s per layer with the chain-rule gradient s·c (scale-aware coordinates)."""
    s = torch.tensor(scale, dtype=torch.float64)[:, None]

    def scaled(beta, c, step):
        return s * update(beta / s, s * c, step)

    return scaled


def algorithm1(model, names, shapes, wbar_layers, p_layers, batches, update, layers="param", lrs=None):
    """Algorithm 1: w = w̄ + P̃β, g = ∇L(w), c = P̃ᵀg, β ← rule(β, c). Returns β after every step."""
    n = p_layers[0].shape[1]
    beta = torch.zeros(len(p_layers), n, dtype=torch.float64)
    sizes = [math.prod(s) for s in shapes]
    trajectory = []
    for step, (x, y) in enumerate(batches, start=1):
        w_layers = [wb + p @ b for wb, p, b in zip(wbar_layers, p_layers, beta)]
        flat = flat_from_layers(w_layers).requires_grad_(True)
        params = {nm: t.view(s) for nm, t, s in zip(names, flat.split(sizes), shapes)}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        (g,) = torch.autograd.grad(loss, flat)
        if layers == "param":
            g_layers = g.split(sizes)
        else:
            g_layers = [g]
        c = torch.stack([p.T @ gl for p, gl in zip(p_layers, g_layers)])
        beta = update(beta, c, step)
        trajectory.append(beta.clone())
    return trajectory


def batches(num, d_in=5, d_out=3, batch=16, seed=3, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=gen, dtype=dtype),
             torch.randint(0, d_out, (batch,), generator=gen)) for _ in range(num)]
