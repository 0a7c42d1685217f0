"""Shared cases for every kernel backend, checked against the torch reference engine."""

from __future__ import annotations

import torch

from twa_kernels.testing import random_projection  # noqa: F401  (re-exported for the tests)

U32 = 2.0**-24
# Layer sizes that hit the edges: a one-element layer, sizes no multiple of any block, a layer that
# spans many programs when the engine is built with small tiles.
EDGE_SIZES = (1, 33, 1000, 7, 2500)


def exact_vectors(numel, L, n, seed=1):
    """Small integers for g and multiples of 2^-3 for Δβ and w: with 2^-4 scales the sums stay
    below 2^24 units of their grid at these sizes, so every summation order is exact."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(-8, 9, (numel,), generator=gen).float()
    delta = torch.randint(-4, 5, (L, n), generator=gen).float() * 2.0**-3
    w = torch.randint(-64, 65, (numel,), generator=gen).float() * 2.0**-3
    return g, delta, w


def project_bound(proj, g):
    """Rigorous fp32 bound on |c_kernel − c_ref| (Higham: any summation order of D terms is within
    (D + 1)u Σ|terms|; the affine split adds the rounding of a·t and b·Σg): both sides, per column."""
    lay = proj.layout
    out = []
    for l, s in enumerate(lay.sizes):
        off = int(lay.param_offsets[l])
        q = proj.layer_codes(l).double()
        gl = g[off:off + s].double().abs()
        terms = (q * proj.scale[l].double().abs() + proj.zero[l].double().abs()).T @ gl
        out.append(2 * (s + 3) * U32 * terms)
    return torch.stack(out)


def expand_bound(proj, delta, w):
    lay = proj.layout
    out = []
    for l, s in enumerate(lay.sizes):
        off = int(lay.param_offsets[l])
        q = proj.layer_codes(l).double()
        terms = (q * proj.scale[l].double().abs() + proj.zero[l].double().abs()) @ delta[l].double().abs()
        out.append(2 * (lay.n + 3) * U32 * (terms + w[off:off + s].double().abs()))
    return torch.cat(out)


def float_case(proj, seed):
    """Random fp32 g, Δβ and w for ``proj``, the reference's c and w + P̃Δβ, and the fp32 bounds on both."""
    from twa_kernels.backends.torch_ref import TorchEngine

    ref = TorchEngine(proj, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(proj.layout.numel, generator=gen)
    delta = torch.randn(proj.layout.num_layers, proj.layout.n, generator=gen)
    w = torch.randn(proj.layout.numel, generator=gen)
    w_ref = w.clone()
    ref.expand(w_ref, delta)
    return g, delta, w, ref.project(g), w_ref, project_bound(proj, g), expand_bound(proj, delta, w)


def assert_same_bits(proj, engines, g, delta, w, segments=None, device="cpu"):
    """Every engine's project and expand give the torch reference's bits; g and w (a flat vector or a
    list of segment tensors) are copied to ``device`` for the engines (expand works in place)."""
    from twa_kernels.backends.torch_ref import TorchEngine

    def on(x):
        return [t.to(device, copy=True) for t in x] if isinstance(x, list) else x.to(device, copy=True)

    ref = TorchEngine(proj, torch.device("cpu"), segments)
    c_ref = ref.project(g)
    w_ref = [t.clone() for t in w] if isinstance(w, list) else w.clone()
    ref.expand(w_ref, delta)
    for eng in engines:
        assert torch.equal(eng.project(on(g)).cpu(), c_ref)
        w_eng = on(w)
        eng.expand(w_eng, delta.to(device))
        pairs = zip(w_eng, w_ref) if isinstance(w, list) else [(w_eng, w_ref)]
        assert all(torch.equal(a.cpu(), b) for a, b in pairs)


def point_bound(dense, betas, weights):
    """Elementwise bound on |w − (w̄ + P̃β)| for fp32 weights set to w̄, then moved in place through the β of
    ``betas`` (β after each move, the first from 0): each move rounds its sum over the n columns,
    (n + 3)·u Σ_j |P̃_ij Δβ_j| (Higham), and its addition to the weight, u·|w_i|; ``dense`` holds P̃ per layer."""
    n = betas[0].shape[1]
    moves = sum(torch.cat([d.double().abs() @ (b1.double() - b0.double()).abs() for d, b0, b1 in zip(dense, s0, s1)])
                for s0, s1 in zip([torch.zeros_like(betas[0])] + list(betas[:-1]), betas))
    return (n + 3) * U32 * moves + len(betas) * U32 * weights.double().abs()
