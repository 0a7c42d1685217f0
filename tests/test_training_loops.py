"""The optimizers in real training loops: parameters bound by identity, a model that moves or is cast
after the optimizer was made, replaced parameters, and torch.optim's conventions."""

import warnings

import pytest
import torch

import twa_kernels as twa
from backend_cases import point_bound
from reference import batches, make_checkpoints, make_model


def build(dtype=torch.float32, bits=4, **kw):
    model = make_model(dtype=dtype, **kw)
    space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=bits, progress=False)
    return model, space


def train(model, opt, data, dtype=None):
    losses = []
    for x, y in data:
        x = x if dtype is None else x.to(dtype)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def flat(model):
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_model_cast_after_the_optimizer_trains_as_if_cast_before(dtype):
    """``model.to(dtype)`` after the optimizer was made (what ``model.cuda()`` does to a device, and the
    Hugging Face Trainer to a model given with ``optimizers=(opt, None)``) used to leave the optimizer
    on the old storage: a silent no-op. Now the step follows the parameters, bit for bit the run an
    optimizer made after the cast gives (bf16/fp16 included: the Kahan residue is rebuilt)."""
    data = batches(6, dtype=torch.float32)
    followed, space = build()
    opt = twa.ProjectedSGD(followed.parameters(), space, lr=0.2, momentum=0.9, init="center")
    followed.to(dtype)
    losses = train(followed, opt, data, dtype)

    ref, ref_space = build()
    ref.to(dtype)
    ref_opt = twa.ProjectedSGD(ref.parameters(), ref_space, lr=0.2, momentum=0.9, init="center")
    ref_losses = train(ref, ref_opt, data, dtype)

    assert opt.backend == ref_opt.backend
    assert not torch.equal(opt.beta, torch.zeros_like(opt.beta))
    assert torch.equal(opt.beta, ref_opt.beta)
    assert torch.equal(flat(followed), flat(ref))
    if dtype == torch.float64:
        assert opt._compensation is None and ref_opt._compensation is None  # no residue for fp64 weights
    else:
        assert torch.equal(opt._compensation, ref_opt._compensation)
    assert losses == ref_losses


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_cast_mid_run_keeps_training_at_the_exact_point(dtype):
    """A cast between steps leaves the weights as the cast made them and keeps training from there. The
    point w̄ + P̃β is evaluated in fp64 (codes dequantized in fp64): in fp64 the weights' distance to it
    stays what the fp32 steps left (fp64 rounding adds ~1e-16); bf16 weights stay within half an ulp
    of it (+10 % for the bf16 residue's own rounding), as without a cast."""
    data = batches(8, dtype=torch.float32)
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2, momentum=0.9)
    train(model, opt, data[:3])
    center = space.center.clone()

    def exact():
        return torch.cat([space.center[s].double() + space.projection.dequantize(l, dtype=torch.float64)
                          @ opt.beta[l].double() for l, s in enumerate(space.layer_slices())])

    start = (flat(model).double() - exact()).abs()
    beta = opt.beta
    model.to(dtype)
    train(model, opt, data[3:], dtype)
    assert not torch.equal(opt.beta, beta)
    assert torch.equal(space.center, center)  # the subspace itself is never written
    point = exact()
    weights = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    if dtype == torch.float64:
        assert torch.all((weights - point).abs() <= start + 1e-12)
    else:
        assert torch.all((weights - point).abs() <= 0.55 * torch.finfo(dtype).eps * point.abs())


def test_replaced_data_is_followed_on_the_same_device():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    betas = [opt.beta]
    for data in (batches(2, dtype=torch.float32), batches(2, seed=9, dtype=torch.float32)):
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            betas.append(opt.beta)
        if len(betas) == 3:
            for p in model.parameters():
                p.data = p.data.clone()  # new storage, same values
            snapshot = flat(model)
    assert not torch.equal(flat(model), snapshot)  # the new storage is what the step updated
    exact = torch.cat([space.center[s].double() + space.dense(l).double() @ opt.beta[l].double()
                       for l, s in enumerate(space.layer_slices())])
    dense = [space.dense(l) for l in range(space.num_layers)]
    assert torch.all((flat(model).double() - exact).abs() <= point_bound(dense, betas, exact))


def test_load_state_dict_assign_replaces_parameters_and_the_optimizer_follows():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    train(model, opt, batches(2, dtype=torch.float32))
    old = list(model.parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert all(a is not b for a, b in zip(old, model.parameters()))
    snapshot = flat(model)
    train(model, opt, batches(2, seed=9, dtype=torch.float32))
    assert not torch.equal(flat(model), snapshot)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}  # param_groups hold the model's tensors again


def test_parameters_replaced_behind_the_optimizers_back_are_followed():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    model.fc1 = torch.nn.Linear(5, 7)  # new modules and Parameter objects, no load_state_dict
    model.fc2 = torch.nn.Linear(7, 3)
    model.gain = torch.nn.Parameter(torch.ones(()))
    x, y = batches(1, dtype=torch.float32)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    new = dict(model.named_parameters())
    before = {nm: p.detach().clone() for nm, p in new.items()}
    beta = opt.beta.clone()
    opt.step()
    assert all(p is new[nm] for p, nm in zip(opt.param_groups[0]["params"], space.names))
    # the new tensors took the step, as loaded weights do: their values + P̃Δβ, layer by layer
    for l, nm in enumerate(space.names):
        want = before[nm].reshape(-1) + space.dense(l) @ (opt.beta[l] - beta[l]).float()
        torch.testing.assert_close(new[nm].detach().reshape(-1), want, rtol=0, atol=1e-6)


def test_a_step_with_no_gradient_at_all_raises():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    with pytest.raises(RuntimeError, match="no parameter of the subspace has a gradient"):
        opt.step()


def test_a_parameter_cast_alone_is_named():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    train(model, opt, batches(1, dtype=torch.float32))
    beta = opt.beta
    model.fc2.bias.data = model.fc2.bias.data.double()
    with pytest.raises(ValueError, match=r"mixed dtypes \(.*'fc2.bias' is torch.float64"):
        opt.step()
    assert torch.equal(opt.beta, beta)


def test_a_non_contiguous_parameter_is_refused_by_name():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    model.fc1.weight.data = model.fc1.weight.data.t().contiguous().t()
    with pytest.raises(ValueError, match="'fc1.weight' is not contiguous"):
        train(model, opt, batches(1, dtype=torch.float32))


def test_zero_grad_as_torch_documents():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    train(model, opt, batches(1, dtype=torch.float32))
    x, y = batches(1, dtype=torch.float32)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", [twa.ProjectedAdamW, twa.ProjectedSGD])
def test_foreach_and_fused_give_the_same_trajectory(cls):
    """torch.optim's foreach/fused flags choose an implementation, never the result: the projected rule is
    one set of tensor operations whatever they say, so every flag gives the default run's bits."""
    data = batches(5, dtype=torch.float32)
    runs = {}
    for flags in (dict(), dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
        model, space = build()
        opt = cls(model.parameters(), space, lr=1e-2, **flags)
        assert all(opt.param_groups[0][k] == v for k, v in flags.items())
        losses = train(model, opt, data)
        runs[str(flags)] = (opt.beta, flat(model), losses)
    beta0, weights0, losses0 = runs["{}"]
    assert beta0.abs().max() > 0
    for name, (beta, weights, losses) in runs.items():
        assert torch.equal(beta, beta0) and torch.equal(weights, weights0) and losses == losses0, name


def test_torch_optim_flags():
    model, space = build()
    for flags in (dict(maximize=True),):
        opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2, **flags)
        assert all(opt.param_groups[0][k] == v for k, v in flags.items())
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        twa.ProjectedSGD(model.parameters(), space, differentiable=True)
    with pytest.raises(ValueError, match="capturable=True needs nonfinite='skip'"):
        twa.ProjectedSGD(model.parameters(), space, capturable=True, nonfinite="raise")
    opt = twa.ProjectedSGD(model.parameters(), space, capturable=True)
    assert opt._nonfinite == "skip"


def test_maximize_is_descent_on_the_negated_loss():
    data = batches(4, dtype=torch.float32)
    a, space_a = build()
    opt_a = twa.ProjectedSGD(a.parameters(), space_a, lr=0.1, maximize=True)
    for x, y in data:
        opt_a.zero_grad()
        torch.nn.functional.cross_entropy(a(x), y).backward()
        opt_a.step()
    b, space_b = build()
    opt_b = twa.ProjectedSGD(b.parameters(), space_b, lr=0.1)
    for x, y in data:
        opt_b.zero_grad()
        (-torch.nn.functional.cross_entropy(b(x), y)).backward()
        opt_b.step()
    assert torch.equal(opt_a.beta, opt_b.beta)


def test_add_param_group_is_refused():
    model, space = build()
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2)
    with pytest.raises(ValueError, match="parameters cannot be added"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1


def test_closure_runs_without_warnings_and_a_skipped_backward_skips_the_step():
    model, space = build()
    opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2)
    x, y = batches(1, dtype=torch.float32)[0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = opt.step(closure)
    assert loss is not None and not torch.equal(opt.beta, torch.zeros_like(opt.beta))
    beta = opt.beta

    def skipped():
        opt.zero_grad()
        return None

    assert opt.step(skipped) is None
    assert torch.equal(opt.beta, beta)
    with pytest.raises(RuntimeError, match="call loss.backward\\(\\) before opt.step\\(\\)"):
        opt.step()


def test_a_loaded_subspace_binds_by_name(tmp_path):
    model, space = build()
    space.save(tmp_path / "space.safetensors")
    fresh = make_model(dtype=torch.float32, seed=3)
    named = dict(fresh.named_parameters())
    decay = [named["fc1.weight"], named["fc2.weight"]]
    no_decay = [named["gain"], named["fc2.bias"], named["fc1.bias"]]
    groups = [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]
    unbound = twa.Subspace.load(tmp_path / "space.safetensors")
    with pytest.raises(ValueError, match="has shape"):
        twa.ProjectedSGD(groups, unbound, lr=0.1)  # plain tensors out of model order, nothing to bind to
    loaded = twa.Subspace.load(tmp_path / "space.safetensors", model=fresh)
    opt = twa.ProjectedSGD(groups, loaded, lr=0.1)
    train(fresh, opt, batches(3, dtype=torch.float32))
    ref = make_model(dtype=torch.float32, seed=3)
    rn = dict(ref.named_parameters())
    ref_opt = twa.ProjectedSGD([{"params": [(k, rn[k]) for k in ("fc1.weight", "fc2.weight")], "weight_decay": 1e-2},
                                {"params": [(k, rn[k]) for k in ("gain", "fc2.bias", "fc1.bias")],
                                 "weight_decay": 0.0}], twa.Subspace.load(tmp_path / "space.safetensors"), lr=0.1)
    train(ref, ref_opt, batches(3, dtype=torch.float32))
    assert torch.equal(opt.beta, ref_opt.beta)
    with pytest.raises(ValueError, match="the model lacks 5 parameter"):
        twa.Subspace.load(tmp_path / "space.safetensors", model=torch.nn.Sequential(torch.nn.Linear(5, 7)))


def test_a_parameter_outside_the_subspace_is_named():
    model, space = build()
    stray = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="'stray' belongs to no layer"):
        twa.ProjectedSGD([*model.named_parameters(), ("stray", stray)], space)


def test_distributed_checkpoint_round_trip_in_one_process(tmp_path):
    """get_optimizer_state_dict / set_optimizer_state_dict and dcp.save / dcp.load carry TWA's state (it
    lives in the optimizer's per-parameter state); the resumed run is the uninterrupted one, bit for bit."""
    import warnings as w

    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    data = batches(8, dtype=torch.float32)
    model, space = build()
    opt = twa.ProjectedAdamW(model.parameters(), space, lr=1e-2)
    train(model, opt, data[:4])
    with w.catch_warnings():
        w.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=str(tmp_path / "ckpt"))
        train(model, opt, data[4:])
        fresh, fresh_space = build()
        opt2 = twa.ProjectedAdamW(fresh.parameters(), fresh_space, lr=1e-2)
        state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
        dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, opt2, state["optim"])
    train(fresh, opt2, data[4:])
    assert torch.equal(opt2.beta, opt.beta) and torch.equal(flat(fresh), flat(model))
