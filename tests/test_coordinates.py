"""Scale-aware coordinates, starting points, the recommended schedule and the ICLR-2023 weight decay,
against the equations (float64) and against problems whose optimum in the subspace is known."""

import math

import pytest
import torch
from torch import nn

import twa_kernels as twa
from reference import batches, layer_stacks, make_checkpoints, make_model, projection


class ScaledSoftmax(nn.Module):
    """Softmax regression whose weight and bias enter the logits divided by ``kw`` and ``kb``: with
    checkpoints multiplied by the same factors the problem in α is unchanged, while the layers'
    checkpoint spreads differ by kw / kb."""

    def __init__(self, d_in=5, d_out=3, kw=1.0, kb=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(d_out, dtype=torch.float64))
        self.kw, self.kb = kw, kb

    def forward(self, x):
        return x @ (self.weight / self.kw).T + self.bias / self.kb


def scaled_checkpoints(n, kw, kb, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"weight": kw * torch.randn(3, 5, generator=gen, dtype=torch.float64),
             "bias": kb * torch.randn(3, generator=gen, dtype=torch.float64)} for _ in range(n)]


DATA = batches(1, batch=256, seed=11)[0]


def full_batch_loss(model):
    x, y = DATA
    return nn.functional.cross_entropy(model(x), y)


def subspace_optimum(model, space):
    """min over β of the full-batch loss at w̄ + Pβ, in float64 (convex in β: a linear map of softmax
    regression's parameters), by L-BFGS to its own tolerance."""
    dense = [space.dense(l).double() for l in range(space.num_layers)]
    centers = [c.double() for c in space.center.split(list(space.layer_sizes))]
    beta = torch.zeros(space.num_layers, space.n, dtype=torch.float64, requires_grad=True)
    shapes = dict(zip(space.names, space.shapes))
    opt = torch.optim.LBFGS([beta], lr=1.0, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def loss_at(b):
        params = {nm: (c + p @ b[l]).view(shapes[nm]) for l, (nm, c, p) in enumerate(zip(space.names, centers, dense))}
        x, y = DATA
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def closure():
        opt.zero_grad()
        loss = loss_at(beta)
        loss.backward()
        return loss

    opt.step(closure)
    return float(loss_at(beta.detach()))


@pytest.mark.parametrize("init", ["center", "last", "lawa"])
def test_defaults_reach_the_subspace_optimum_with_spreads_1e6_apart(init):
    model = ScaledSoftmax(kw=1e3, kb=1e-3)
    ckpts = scaled_checkpoints(4, 1e3, 1e-3)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    assert float(space.spread[0] / space.spread[1]) > 1e5  # the layers' own scales, 1e6 apart
    best = subspace_optimum(model, space)
    chosen = {"center": "center", "last": "last", "lawa": twa.lawa_weights(4, 2)}[init]
    opt = twa.ProjectedAdamW(model.parameters(), space, init=chosen)  # every other argument a default
    steps = 1500
    sched = twa.step_decay(opt, steps)
    start = float(full_batch_loss(model).detach())
    for _ in range(steps):
        loss = full_batch_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    final = float(full_batch_loss(model).detach())
    # Adam's last steps move x by lr·0.01 = 3e-4: the loss is then within its curvature times that
    # squared of the optimum, far below 1e-6 here, while the start is 1e-1 above it.
    assert start - best > 1e-2
    assert final - best < 1e-6, (final, best)


def test_the_paper_coordinates_cannot_fit_spreads_1e6_apart():
    # Why the default changed: one lr in weight units over-steps the bias (spread 1e-3) at once.
    model = ScaledSoftmax(kw=1e3, kb=1e-3)
    space = twa.Subspace.from_checkpoints(model, scaled_checkpoints(4, 1e3, 1e-3), bits=None, progress=False)
    best = subspace_optimum(model, space)
    opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2, init="center", coordinates="paper")
    for _ in range(300):
        loss = full_batch_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(full_batch_loss(model)) - best > 1e-2


@pytest.mark.parametrize("cls,hp", [(twa.ProjectedAdamW, {}), (twa.ProjectedSGD, dict(lr=0.5, momentum=0.9))])
def test_the_step_is_invariant_to_rescaling_a_layers_spread(cls, hp):
    def run(kw, kb):
        model = ScaledSoftmax(kw=kw, kb=kb)
        space = twa.Subspace.from_checkpoints(model, scaled_checkpoints(5, kw, kb), bits=4, progress=False)
        opt = cls(model.parameters(), space, **hp)
        for x, y in batches(12, batch=32, seed=5):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt.alphas()

    # Powers of two: every product and norm scales exactly, so the two runs agree to the last bit of
    # fp64, but Adam's ε (1e-8 against gradients of 2^±10 times another size) and the fp32 kernels'
    # rounding of P̃ᵀg, which scale exactly as well.
    plain, scaled = run(1.0, 1.0), run(2.0**10, 2.0**-10)
    assert torch.allclose(plain, scaled, rtol=0, atol=1e-9), (plain - scaled).abs().max()


def test_a_layer_at_rounding_level_is_held_fixed_and_reported():
    model = make_model()
    ckpts = make_checkpoints(model, 5)
    base = ckpts[0]["fc1.bias"]
    gen = torch.Generator().manual_seed(9)
    for ck in ckpts:  # a few fp32 ulps of noise, as a bias feeding a BatchNorm shows
        ck["fc1.bias"] = base * (1 + 2.0**-23 * torch.randint(-2, 3, base.shape, generator=gen).double())
    with pytest.warns(UserWarning, match="'fc1.bias' moved only by rounding"):
        space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    assert list(space.held_layers()) == ["fc1.bias"]
    assert "moved only by rounding" in space.held_layers()["fc1.bias"]
    layer = space.names.index("fc1.bias")
    opt = twa.ProjectedAdamW(model.parameters(), space, lr=0.3)
    held = model.fc1.bias.detach().clone()
    for x, y in batches(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.fc1.bias.detach(), held)
    assert torch.equal(model.fc1.bias.detach(), space.center[sum(space.layer_sizes[:layer]):][:base.numel()].double())
    alphas = opt.alphas()
    assert torch.allclose(alphas[layer], torch.full((5,), 0.2, dtype=torch.float64))
    assert float(alphas.abs().max()) < 10


def authors_iclr_sgd(model, ckpts, names, shapes, data, lr, momentum, weight_decay):
    """The ICLR-2023 code's update, in float64: Q from Gram-Schmidt of the raw checkpoints (per layer),
    the gradient projected g ← QQᵀg, then torch.optim.SGD with weight_decay on the weights themselves
    (d = QQᵀg + λw, buf = μ·buf + d, w ← w − lr·buf), from the first checkpoint."""
    stacks = layer_stacks(ckpts, names)
    qs = [projection(x, "gram_schmidt") for x in stacks]
    w = [x[0].clone() for x in stacks]
    sizes = [math.prod(s) for s in shapes]
    bufs, out = None, []
    for x, y in data:
        flat = torch.cat(w).requires_grad_(True)
        params = {nm: t.view(s) for nm, t, s in zip(names, flat.split(sizes), shapes)}
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        (g,) = torch.autograd.grad(loss, flat)
        d = [q @ (q.T @ gl) + weight_decay * wl for q, gl, wl in zip(qs, g.split(sizes), w)]
        bufs = d if bufs is None else [momentum * b + dl for b, dl in zip(bufs, d)]
        w = [wl - lr * b for wl, b in zip(w, bufs)]
        out.append(torch.cat(w))
    return out


def test_decay_to_zero_reproduces_the_authors_iclr_update():
    # Every layer has at least n elements, so Gram-Schmidt keeps all n directions in each
    model = ScaledSoftmax()
    ckpts = scaled_checkpoints(3, 1.0, 1.0, seed=4)
    names = [nm for nm, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    data = batches(15, batch=32, seed=6)
    hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-2)
    expected = authors_iclr_sgd(model, ckpts, names, shapes, data, **hp)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, decouple="gram_schmidt", progress=False)
    opt = twa.ProjectedSGD(model.parameters(), space, decay_to="zero", coordinates="paper", backend="torch",
                           init=[1.0, 0.0, 0.0], **hp)
    for (x, y), want in zip(data, expected):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        # P and w̄ are fp32 in the format, and the point w̄ + Pβ is summed in fp32 over n = 3 columns: each
        # step's weights carry at most (n + 3)·u·max|w| of rounding on either side (w̄, the n products and
        # their sum, the in-place add). This SGD is contractive on its problem, so a step's rounding is not
        # amplified by the next ones (measured: at most 7e-8 on weights up to 2.2, against 1.6e-6 here).
        bound = 2 * (3 + 3) * 2.0**-24 * float(want.abs().max())
        assert torch.allclose(got, want, rtol=0, atol=bound), (got - want).abs().max()
    # and it is not the default decay toward w̄
    other = twa.ProjectedSGD(ScaledSoftmax().parameters(), space, coordinates="paper", backend="torch", **hp)
    assert other.decay_to == "center"


def test_init_takes_averaging_weights_and_refuses_bad_ones():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    before = [p.detach().clone() for p in model.parameters()]
    for bad, match in [([0.5, 0.5], "shape"), ([0.5, 0.5, 0.5, 0.5], "sum to 1"),
                       ([float("nan"), 0, 0, 1], "NaN"), ("first", "init must be one of")]:
        with pytest.raises(ValueError, match=match):
            twa.ProjectedAdamW(model.parameters(), space, init=bad)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))  # untouched
    opt = twa.ProjectedAdamW(model.parameters(), space, init=twa.lawa_weights(4, 2))
    want = twa.lawa(ckpts, 2)
    for nm, p in model.named_parameters():
        assert torch.allclose(p.detach(), want[nm], rtol=0, atol=1e-6)
    assert torch.allclose(opt.alphas(), torch.tensor([0, 0, 0.5, 0.5], dtype=torch.float64).expand(space.num_layers, 4),
                          atol=1e-9)


def test_default_init_is_the_centre():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    opt = twa.ProjectedAdamW(model.parameters(), space)
    assert torch.equal(opt.beta, torch.zeros_like(opt.beta))
    for nm, p in model.named_parameters():
        mean = sum(c[nm] for c in ckpts) / 4
        assert torch.allclose(p.detach().double(), mean.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decouple", ["gram_schmidt", "none", "center"])
@pytest.mark.parametrize("init", ["last", "lawa"])
def test_init_is_exact_where_layers_are_smaller_than_n(tmp_path, init, decouple):
    # n = 6 checkpoints, and layers of 3 elements (fc2.bias) and 1 (gain): their later checkpoints depend
    # on the earlier ones, so gram_schmidt's T has zero columns and α → β must go through Pᵀx_i, not T⁻¹.
    # fp32 P̃ and w̄: the point is exact to fp32 rounding of weights of size ~1 summed over n = 6 columns.
    model = make_model()
    ckpts = make_checkpoints(model, 6)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, decouple=decouple, progress=False)
    space.save(tmp_path / "gs.safetensors")
    loaded = twa.Subspace.load(tmp_path / "gs.safetensors", model=model)
    alpha = twa.lawa_weights(6, 3) if init == "lawa" else None
    want = twa.lawa(ckpts, 3) if init == "lawa" else ckpts[-1]
    for sp in (space, loaded):
        twa.ProjectedAdamW(model.parameters(), sp, init="last" if alpha is None else alpha)
        for nm, p in model.named_parameters():
            assert torch.allclose(p.detach(), want[nm], rtol=0, atol=1e-6), nm


def test_step_decay_is_the_papers_schedule_and_a_torch_scheduler():
    model = make_model()
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 3), bits=4, progress=False)
    opt = twa.ProjectedAdamW(model.parameters(), space)
    sched = twa.step_decay(opt, 10)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    lrs = []
    for x, y in batches(10):
        lrs.append(opt.param_groups[0]["lr"])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.03] * 5 + [0.003] * 3 + [0.0003] * 2)
    with pytest.raises(ValueError, match="milestones"):
        twa.step_decay(opt, 10, milestones=(0.8, 0.5))


def test_a_state_from_other_coordinates_is_refused():
    model = make_model()
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 3), bits=4, progress=False)
    sd = twa.ProjectedAdamW(model.parameters(), space, coordinates="paper").state_dict()
    opt = twa.ProjectedAdamW(model.parameters(), space)
    with pytest.raises(ValueError, match="'paper' coordinates"):
        opt.load_state_dict(sd)
