
import pytest
import torch

import twa_kernels as twa
from twa_kernels.optim import twa_state
from reference import (adamw_rule, algorithm1, batches, in_coordinates, layer_stacks, make_checkpoints,
                       make_model, projection, quantize, sgd_rule, spread)

SGD_VARIANTS = [
    dict(lr=0.2),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, dampening=0.3),
]
ADAMW_VARIANTS = [dict(lr=1e-2), dict(lr=5e-2, weight_decay=0.1, betas=(0.8, 0.99)), dict(lr=1e-2, amsgrad=True)]


def names_shapes(model):
    named = [(nm, tuple(p.shape)) for nm, p in model.named_parameters() if p.requires_grad]
    return [a for a, _ in named], [b for _, b in named]


def reference_trajectory(model, ckpts, bits, decouple, layers, rule, steps, scale="layer", coordinates="spread"):
    names, shapes = names_shapes(model)
    stacks = layer_stacks(ckpts, names, layers)
    if coordinates == "spread":
        rule = in_coordinates(rule, [spread(x) for x in stacks])
    p_layers = [quantize(projection(x, decouple), bits, scale)[1] for x in stacks]
    # w̄ is stored in fp32 by the format.
    wbar = [x.mean(dim=0).float().double() for x in stacks]
    return algorithm1(model, names, shapes, wbar, p_layers, batches(steps), rule, layers)


def package_trajectory(model, space, make_opt, steps, backend="torch"):
    opt = make_opt(model.parameters(), space, backend)
    out = []
    for x, y in batches(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(opt.beta)
    return out, opt


def assert_trajectories_close(got, expected):
    # fp64 on both sides: the runs differ only in summation order (~1e-16 per operation), amplified
    # over 25 steps by the loss's curvature; 1e-9 leaves six orders of magnitude of margin.
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), (step, (a - b).abs().max())


OPTIMIZER_CASES = (
    [pytest.param(twa.ProjectedSGD, sgd_rule, hp, bits, 5, id=f"sgd{i}-{bits}")
     for i, hp in enumerate(SGD_VARIANTS) for bits in (None, 1, 4)]
    + [pytest.param(twa.ProjectedAdamW, adamw_rule, hp, bits, 4, id=f"adamw{i}-{bits}")
       for i, hp in enumerate(ADAMW_VARIANTS) for bits in (None, 2, 8)])


@pytest.mark.parametrize("coordinates", ["spread", "paper"])
@pytest.mark.parametrize("cls,rule,hp,bits,n", OPTIMIZER_CASES)
def test_optimizer_matches_algorithm1(cls, rule, hp, bits, n, coordinates):
    model = make_model()
    ckpts = make_checkpoints(model, n)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=bits, progress=False)
    expected = reference_trajectory(model, ckpts, bits, "center", "param", rule(hp), 25, coordinates=coordinates)
    got, _ = package_trajectory(model, space, lambda p, s, b: cls(p, s, backend=b, init="center",
                                                                  coordinates=coordinates, **hp), 25)
    assert_trajectories_close(got, expected)


@pytest.mark.parametrize("decouple,layers,scale", [
    ("none", "param", "layer"), ("gram_schmidt", "param", "layer"), ("center", "model", "layer"),
    ("gram_schmidt", "model", "column"), ("center", "param", "column"),
])
def test_variants_match_algorithm1(decouple, layers, scale):
    model = make_model()
    ckpts = make_checkpoints(model, 5)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, decouple=decouple, layers=layers,
                                          scale=scale, progress=False)
    hp = dict(lr=0.1, momentum=0.9)
    expected = reference_trajectory(model, ckpts, 4, decouple, layers, sgd_rule(hp), 20, scale)
    got, _ = package_trajectory(model, space, lambda p, s, b: twa.ProjectedSGD(p, s, backend=b, init="center",
                                                                               **hp), 20)
    assert_trajectories_close(got, expected)


def test_construction_moves_model_to_center_and_last():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    twa.ProjectedSGD(model.parameters(), space, lr=0.1, init="center")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(flat, space.center.double())
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1, init="last")
    last = torch.cat([ckpts[-1][nm].reshape(-1) for nm, _ in model.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # w̄ and P are fp32 in the format: the point matches the last checkpoint to fp32 rounding.
    assert torch.allclose(flat, last, rtol=0, atol=1e-6)
    alphas = opt.alphas()
    assert torch.allclose(alphas[:, -1], torch.ones(space.num_layers, dtype=torch.float64), atol=1e-12)


def run_steps(model, opt, data):
    for x, y in data:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("cls,hp", [(twa.ProjectedSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
                                    (twa.ProjectedAdamW, dict(lr=1e-2, weight_decay=1e-3))])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, cls, hp):
    data = batches(20)
    model = make_model(dtype=torch.float32)
    ckpts = make_checkpoints(model, 5)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    opt = cls(model.parameters(), space, **hp)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for x, y in data[:10]:
        run_steps(model, opt, [(x.float(), y)])
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "ck.pt")
    for x, y in data[10:]:
        run_steps(model, opt, [(x.float(), y)])
        sched.step()

    fresh = make_model(seed=123, dtype=torch.float32)
    opt2 = cls(fresh.parameters(), space, **hp)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=5, gamma=0.5)
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)  # plain tensors and numbers only
    fresh.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for x, y in data[10:]:
        run_steps(fresh, opt2, [(x.float(), y)])
        sched2.step()
    assert torch.equal(opt2.beta, opt.beta)
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == hp["lr"] * 0.5**4


def test_sync_weights_restores_the_point_from_the_optimizer_state_alone():
    model = make_model()
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=4, progress=False)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1, momentum=0.9)
    run_steps(model, opt, batches(6))
    fresh = make_model(seed=7)
    opt2 = twa.ProjectedSGD(fresh.parameters(), space, lr=0.1, momentum=0.9)
    # The fresh model's weights are still where opt2 put them (w̄): loading β moves them to its point.
    with pytest.warns(UserWarning, match="moved to w̄ \\+ P̃β of the loaded state"):
        opt2.load_state_dict(opt.state_dict())
    beta = opt.beta
    exact = torch.cat([space.center[s].double() + space.projection.dequantize(l, dtype=torch.float64) @ beta[l]
                       for l, s in enumerate(space.layer_slices())])
    got = torch.cat([p.detach().reshape(-1) for p in fresh.parameters()])
    trained = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, exact, rtol=0, atol=1e-12)  # float64 model: w̄ + P̃β in one pass
    assert torch.allclose(got, trained, rtol=0, atol=1e-12)  # the point the trained run reached


def test_lr_scheduler_drives_the_step():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.0 if k >= 3 else 1.0)
    data = batches(6)
    for i, batch in enumerate(data):
        before = opt.beta
        run_steps(model, opt, [batch])
        sched.step()
        moved = not torch.equal(before, opt.beta)
        assert moved == (i < 3)


def test_param_groups_map_to_layers():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    named = dict(model.named_parameters())
    groups = [{"params": [(k, named[k]) for k in ("fc1.weight", "fc2.weight")], "lr": 0.0},
              {"params": [(k, named[k]) for k in ("fc1.bias", "fc2.bias", "gain")], "lr": 0.5}]
    opt = twa.ProjectedSGD(groups, space, lr=0.1, init="center")
    run_steps(model, opt, batches(3))
    names = [nm for nm, _ in model.named_parameters()]
    beta = opt.beta
    for l, nm in enumerate(names):
        assert bool((beta[l] == 0).all()) == nm.endswith("weight"), nm
    # The same grouping with plain tensors (a decay / no-decay split): bound by identity to the model the
    # subspace was built from, it trains the same β.
    plain_model = make_model()
    plain_space = twa.Subspace.from_checkpoints(plain_model, ckpts, bits=None, progress=False)
    p = dict(plain_model.named_parameters())
    plain = twa.ProjectedSGD([{"params": [p["fc2.weight"], p["fc1.weight"]], "lr": 0.0},
                              {"params": [p["gain"], p["fc2.bias"], p["fc1.bias"]], "lr": 0.5}], plain_space, lr=0.1, init="center")
    run_steps(plain_model, plain, batches(3))
    assert torch.equal(plain.beta, beta)


def test_named_parameters_in_any_order():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    ref_model = make_model()
    ref, _ = package_trajectory(ref_model, space, lambda p, s, b: twa.ProjectedSGD(p, s, lr=0.1), 5)
    shuffled = list(model.named_parameters())[::-1]
    opt = twa.ProjectedSGD(shuffled, space, lr=0.1)
    run_steps(model, opt, batches(5))
    assert torch.equal(opt.beta, ref[-1])


def test_grads_replaced_by_model_zero_grad_are_picked_up():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    ref, _ = package_trajectory(make_model(), space, lambda p, s, b: twa.ProjectedSGD(p, s, lr=0.1), 4)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1)
    for x, y in batches(4):
        model.zero_grad(set_to_none=True)  # the user's own zeroing drops the flat-buffer views
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert torch.equal(opt.beta, ref[-1])


def _drift_in_ulps(dtype, compensated):
    torch.manual_seed(0)
    model = make_model(dtype=torch.float32, d_in=16, hidden=32, d_out=8)
    ckpts = make_checkpoints(model, 6, step=0.02)
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    model = model.to(dtype)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=1e-3, init="center", coordinates="paper")
    if not compensated:
        opt._compensation = None  # the control: plain rounding of w += P̃Δβ
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(3000):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.01).to(dtype)
        opt.step()
    beta = opt.beta.double()
    exact = torch.cat([space.center[s].double() + space.dense(l).double() @ beta[l]
                       for l, s in enumerate(space.layer_slices())])
    got = torch.cat([p.detach().double().reshape(-1) for p in params])
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    return float(((got - exact).abs() / ulp).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_do_not_drift(dtype):
    """3000 small steps: bf16/fp16 weights stay within half an ulp of w̄ + P̃β evaluated in fp64
    (round to nearest; +5% for the residue's own bf16 rounding), where plain rounding walks away."""
    assert _drift_in_ulps(dtype, compensated=True) <= 0.55
    assert _drift_in_ulps(dtype, compensated=False) > 2


def test_projection_of_low_precision_gradients():
    model = make_model(dtype=torch.float32)
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=4, progress=False)
    from twa_kernels.backends import make_engine
    eng = make_engine(space.projection, "cpu", "torch")
    g = torch.randn(space.numel)
    for dt in (torch.bfloat16, torch.float16):
        gl = g.to(dt)
        assert torch.equal(eng.project(gl), eng.project(gl.float()))


class TestBadInput:
    def setup_method(self):
        self.model = make_model()
        self.ckpts = make_checkpoints(self.model, 4)
        self.space = twa.Subspace.from_checkpoints(self.model, self.ckpts, bits=4, progress=False)

    def save_space(self):
        import tempfile
        path = tempfile.mktemp(suffix=".safetensors")
        self.space.save(path)
        return path

    def snapshot(self, opt=None):
        model = {k: v.clone() for k, v in self.model.state_dict().items()}
        state = None if opt is None else {k: (v.clone() if torch.is_tensor(v) else v)
                                          for k, v in twa_state(opt.state_dict()).items() if k != "buffers"}
        return model, state

    def assert_same(self, snap, opt=None):
        model, state = snap
        for k, v in self.model.state_dict().items():
            assert torch.equal(model[k], v), k
        if opt is not None:
            now = twa_state(opt.state_dict())
            for k, v in state.items():
                assert (torch.equal(v, now[k]) if torch.is_tensor(v) else v == now[k]), k

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_nonfinite_gradient_raises_and_changes_nothing(self, bad):
        opt = twa.ProjectedSGD(self.model.parameters(), self.space, lr=0.1, momentum=0.9)
        run_steps(self.model, opt, batches(2))
        snap = self.snapshot(opt)
        torch.nn.functional.cross_entropy(self.model(batches(1)[0][0]), batches(1)[0][1]).backward()
        self.model.fc1.weight.grad[0, 0] = bad
        with pytest.raises(FloatingPointError, match="NaN or Inf"):
            opt.step()
        self.assert_same(snap, opt)

    def test_nonfinite_gradient_skipped_without_sync(self):
        opt = twa.ProjectedAdamW(self.model.parameters(), self.space, lr=1e-2, nonfinite="skip")
        run_steps(self.model, opt, batches(2))
        snap = self.snapshot(opt)
        self.model.fc2.bias.grad.fill_(float("nan"))
        opt.step()
        self.assert_same(snap, opt)
        run_steps(self.model, opt, batches(1))
        assert torch.isfinite(opt.beta).all() and int(twa_state(opt.state_dict())["step"]) == 3

    def test_state_dict_from_another_subspace(self):
        opt = twa.ProjectedSGD(self.model.parameters(), self.space, lr=0.1)
        run_steps(self.model, opt, batches(2))
        other_model = make_model()
        other = twa.Subspace.from_checkpoints(other_model, make_checkpoints(other_model, 4, seed=9),
                                              bits=4, progress=False)
        opt_other = twa.ProjectedSGD(other_model.parameters(), other, lr=0.1)
        snap = self.snapshot(opt)
        with pytest.raises(ValueError, match="different subspace"):
            opt.load_state_dict(opt_other.state_dict())
        with pytest.raises(ValueError, match="not a ProjectedSGD state_dict"):
            opt.load_state_dict(torch.optim.SGD(self.model.parameters(), lr=0.1).state_dict())
        adam = twa.ProjectedAdamW(make_model().parameters(), self.space)
        with pytest.raises(ValueError, match="from ProjectedAdamW"):
            opt.load_state_dict(adam.state_dict())
        self.assert_same(snap, opt)

    def test_mixed_devices(self):
        self.model.gain = torch.nn.Parameter(torch.empty((), device="meta", dtype=torch.float64))
        with pytest.raises(ValueError, match="different devices"):
            twa.ProjectedSGD(self.model.parameters(), self.space)

    def test_wrong_model_leaves_it_untouched(self):
        other = make_model(hidden=9)
        snap = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(ValueError, match="shape"):
            twa.ProjectedSGD(other.parameters(), self.space)
        assert all(torch.equal(snap[k], v) for k, v in other.state_dict().items())
        with pytest.raises(ValueError, match="layer\\(s\\) of the subspace have no tensor .*'fc2.bias'"):
            twa.ProjectedSGD(list(self.model.parameters())[:4], self.space)
        loaded = twa.Subspace.load(self.save_space(), model=None)
        with pytest.raises(ValueError, match="got 4 trainable parameters, the subspace was built for 5"):
            twa.ProjectedSGD(list(self.model.parameters())[:4], loaded)
        with pytest.raises(TypeError, match="Subspace"):
            twa.ProjectedSGD(self.model.parameters(), object())

    def test_bad_hyperparameters_and_backend(self):
        snap = self.snapshot()
        with pytest.raises(ValueError, match="learning rate"):
            twa.ProjectedSGD(self.model.parameters(), self.space, lr=-1)
        with pytest.raises(ValueError, match="unknown backend"):
            twa.ProjectedSGD(self.model.parameters(), self.space, backend="opencl")
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            twa.ProjectedSGD(self.model.parameters(), self.space, backend="cuda")
        with pytest.raises(ValueError, match="init"):
            twa.ProjectedSGD(self.model.parameters(), self.space, init="first")
        self.assert_same(snap)


@pytest.mark.parametrize("rule,reference,hp", [
    ("adamw", torch.optim.AdamW, dict(lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False,
                                      maximize=False)),
    ("adamw", torch.optim.AdamW, dict(lr=0.03, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=True,
                                      maximize=False)),
    ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                                  maximize=False)),
], ids=["adamw", "adamw-amsgrad", "sgd-nesterov"])
def test_the_pure_update_rules_are_torchs(rule, reference, hp):
    # the rule alone, on one [L, n] tensor of coordinates, against torch.optim's optimizer over 5 steps
    # (float64: the same operations in another order agree to ~1e-16)
    from twa_kernels.optim.adamw import adamw_update
    from twa_kernels.optim.sgd import sgd_update

    update = {"adamw": adamw_update, "sgd": sgd_update}[rule]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(5)]
    p = x0.clone().requires_grad_()
    ref = reference([p], **hp)
    x = x0.clone()
    state = {k: torch.zeros_like(x0) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")}
    for step, g in enumerate(grads, start=1):
        p.grad = g.clone()
        ref.step()
        x, new = update(x, g, state, torch.tensor(float(step), dtype=torch.float64), **hp)
        state.update(new)
        torch.testing.assert_close(x, p.detach(), rtol=1e-12, atol=1e-14)
