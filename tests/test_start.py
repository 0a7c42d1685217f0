"""Where TWA starts (best_start) and where it ends (the average of its iterates)."""

import math

import pytest
import torch

import twa_kernels as twa
from twa_kernels.start import run_candidates


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat(model, vector):
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def problem(n=8, seed=0):
    """A small model and n checkpoints around it (fp32 P̃, so every merge is exact)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ckpts = [{k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(n)]
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    return model, ckpts, space


def merge_vector(model, ckpts, alpha):
    state = twa.weighted_mean(ckpts, alpha)
    return torch.cat([state[name].reshape(-1) for name, _ in model.named_parameters()])


@pytest.mark.parametrize("target", ["last checkpoint", "LAWA (k=4)", "EMA (γ=0.9)", "uniform"])
def test_the_start_is_the_merge_with_the_lowest_loss(target):
    # The loss is the distance to one of the candidate merges: that merge, and only it, has loss 0.
    model, ckpts, space = problem()
    goal = merge_vector(model, ckpts, run_candidates(8)[target])
    start = twa.best_start(model, space, lambda m: float(((flat(m) - goal) ** 2).sum()), progress=False)
    assert start.name == target and start.loss < 1e-10
    assert set(start.losses) == set(run_candidates(8)) and start.evaluations == len(run_candidates(8))
    assert all(v > 1e-3 for k, v in start.losses.items() if k != target)
    # the model is left at the chosen start, and init=start puts an optimizer there too
    assert torch.allclose(flat(model), goal, atol=1e-6)
    load_flat(model, torch.zeros_like(goal))
    twa.ProjectedAdamW(model.parameters(), space, init=start)
    assert torch.allclose(flat(model), goal, atol=1e-6)
    assert target in str(start) and f"{start.evaluations} evaluations" in str(start)


def test_unordered_models_give_the_greedy_soup_whatever_their_order():
    # Models given in no order: the loss is lowest at the mean of models 2 and 5, which greedy soup finds
    # (model 2 or 5 first, the other joins, every other one makes it worse); permuting the models gives
    # the same point.
    model, ckpts, space = problem()
    goal = merge_vector(model, ckpts, [0, 0, 0.5, 0, 0, 0.5, 0, 0])

    def evaluate(m):
        return float(((flat(m) - goal) ** 2).sum())

    start = twa.best_start(model, space, evaluate, ordered=False, progress=False)
    assert start.name == "greedy soup (2 of 8)" and start.members == (2, 5) and start.loss < 1e-10
    assert {"uniform", *(f"model {i}" for i in range(8))} <= set(start.losses)
    order = [3, 7, 5, 0, 6, 2, 1, 4]
    model2, _, _ = problem()
    space2 = twa.Subspace.from_checkpoints(model2, [ckpts[i] for i in order], bits=None, progress=False)
    start2 = twa.best_start(model2, space2, evaluate, ordered=False, progress=False)
    assert start2.name == start.name and sorted(order[i] for i in start2.members) == [2, 5]
    assert torch.allclose(flat(model2), flat(model), atol=1e-6)


def test_greedy_selection_is_model_soups_rule():
    # Best first; a model joins when the soup's score does not drop (≥); the scores of subsets given here.
    soup_scores = {(0,): 0.5, (0, 2): 0.7, (0, 1, 2): 0.6, (0, 2, 3): 0.7}
    chosen, best = twa.greedy_selection([0.5, 0.3, 0.4, 0.1], lambda idx: soup_scores[tuple(sorted(idx))])
    assert chosen == [0, 2, 3] and best == 0.7
    with pytest.raises(ValueError, match="at least one"):
        twa.greedy_selection([], lambda idx: 0.0)


def test_extra_candidates_and_nonfinite_losses():
    model, ckpts, space = problem()
    goal = merge_vector(model, ckpts, [0.25, 0.25, 0.5, 0, 0, 0, 0, 0])
    start = twa.best_start(model, space, lambda m: float(((flat(m) - goal) ** 2).sum()), progress=False,
                           candidates={"mine": [0.25, 0.25, 0.5, 0, 0, 0, 0, 0]})
    assert start.name == "mine" and start.loss < 1e-10
    with pytest.raises(ValueError, match="NaN or Inf for every candidate"):
        twa.best_start(model, space, lambda m: float("nan"), progress=False)


def train(opt, model, x, y, steps):
    betas = []
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        betas.append(opt.beta)
    return betas


def test_the_iterate_average_is_the_mean_of_the_recorded_betas_and_resumes_bit_for_bit():
    model, ckpts, space = problem()
    torch.manual_seed(1)
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    opt = twa.ProjectedAdamW(model.parameters(), space, average_after=4)
    betas = train(opt, model, x, y, 10)
    want = torch.stack(betas[4:]).mean(0)
    # a running mean in fp32: each of its 6 updates rounds once, so a few ulps of |β| at most
    tol = 8 * torch.finfo(torch.float32).eps * float(want.abs().max())
    assert opt.averaged_steps == 6 and (opt.averaged_beta - want).abs().max() <= tol
    # resume at step 10 in a new optimizer and model, then both take 5 more steps: identical bits
    saved = opt.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    train(opt, model, x, y, 5)
    model2, _, _ = problem()
    opt2 = twa.ProjectedAdamW(model2.parameters(), twa.Subspace.from_checkpoints(model2, ckpts, bits=None,
                                                                                 progress=False), average_after=4)
    model2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    train(opt2, model2, x, y, 5)
    assert torch.equal(opt2.averaged_beta, opt.averaged_beta) and torch.equal(opt2.beta, opt.beta)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_swap_average_moves_the_weights_and_back():
    model, ckpts, space = problem()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    opt = twa.ProjectedSGD(model.parameters(), space, lr=0.05, average_after=2)
    with pytest.raises(RuntimeError, match="no iterate has been averaged yet"):
        opt.swap_average()
    train(opt, model, x, y, 6)
    last, last_weights, avg = opt.beta, flat(model), opt.averaged_beta
    opt.swap_average()
    assert torch.equal(opt.beta, avg) and torch.equal(opt.averaged_beta, last)
    point = space.center + torch.cat([space.dense(i) @ avg[i] for i in range(space.num_layers)])
    assert torch.allclose(flat(model), point, atol=1e-5)
    assert opt.state_dict()["state"][0]["twa"]["average_swapped"]
    with pytest.raises(RuntimeError, match="call swap_average\\(\\) again"):
        train(opt, model, x, y, 1)
    opt.swap_average()
    assert torch.equal(opt.beta, last) and torch.allclose(flat(model), last_weights, atol=1e-6)
    train(opt, model, x, y, 1)  # stepping goes on from the last iterate
    with pytest.raises(RuntimeError, match="keeps no average"):
        twa.ProjectedSGD(model.parameters(), space).swap_average()
    with pytest.raises(ValueError, match="average_after"):
        twa.ProjectedSGD(model.parameters(), space, average_after=-1)
    fresh = twa.ProjectedSGD(model.parameters(), space, average_after=3)
    with pytest.raises(ValueError, match="averages the iterates after step 2"):
        fresh.load_state_dict(opt.state_dict())


def test_a_skipped_step_does_not_enter_the_average():
    model, ckpts, space = problem()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    opt = twa.ProjectedAdamW(model.parameters(), space, average_after=0, nonfinite="skip")
    train(opt, model, x, y, 3)
    opt.zero_grad()
    (torch.nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    opt.step()
    assert opt.averaged_steps == 3


def test_averaging_lowers_the_expected_loss_of_noisy_sgd_on_a_quadratic():
    """SGD with a constant lr η on ½‖β − β*‖² with gradient noise σ: the last iterate keeps a stationary
    variance ησ²/(2 − η) per coordinate (0.053σ² at η = 0.1), while the mean of the last T iterates has a
    variance of about σ²/T (0.005σ² at T = 200) once the start is forgotten: 10× smaller. Over 12 seeds the
    mean excess loss of the average is then far below half the last iterate's. The loss is measured in
    weight space, ½‖P̃(β − β*)‖² (the centred basis has one direction with P̃v = 0, which no step moves)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False)
    ckpts = [{"weight": torch.randn(1, 8)} for _ in range(5)]
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=None, progress=False)
    target = space.beta_for_alphas(torch.tensor([0.4, 0.1, 0.2, 0.1, 0.2])).float()
    dense = space.dense(0)
    lift = torch.linalg.pinv(dense.T)  # a weight-space gradient g with P̃ᵀg = c (c in P̃ᵀ's range)
    last, averaged = [], []
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        opt = twa.ProjectedSGD(model.parameters(), space, lr=0.1, init="center", coordinates="paper",
                               average_after=200)
        for _ in range(400):
            # the gradient whose projection is (β − β*) + noise, in the subspace's own coordinates
            c = (opt.beta[0] - target[0]) + torch.randn(space.n, generator=gen)
            model.weight.grad = (lift @ c).view_as(model.weight)
            opt.step()
        last.append(0.5 * float((dense @ (opt.beta[0] - target[0])).pow(2).sum()))
        averaged.append(0.5 * float((dense @ (opt.averaged_beta[0] - target[0])).pow(2).sum()))
    assert sum(averaged) < 0.5 * sum(last)
    assert math.isfinite(sum(last))


def test_anchor_starts_at_the_exact_merge_and_moves_it_by_ptilde_delta_beta():
    # At 4 bits, placing a merge through P̃ misses it by the quantization error; anchoring keeps the exact
    # merge (β set to its α's) and every step moves it by P̃Δβ, as any step does.
    model, ckpts, _ = problem()
    space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
    alpha = [0, 0, 0.5, 0, 0, 0.5, 0, 0]
    exact = merge_vector(model, ckpts, alpha).float()
    twa.ProjectedAdamW(model.parameters(), space, init=alpha)
    assert (flat(model) - exact).abs().max() > 1e-4  # the 4-bit point is not the merge

    load_flat(model, exact)
    opt = twa.ProjectedAdamW(model.parameters(), space, init="keep")
    opt.anchor(alpha)
    beta0 = space.beta_for_alphas(torch.tensor(alpha, dtype=torch.float64)).float()
    assert torch.equal(flat(model), exact) and torch.allclose(opt.beta, beta0)
    assert torch.allclose(opt.alphas(), space.alphas(beta0))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    train(opt, model, x, y, 3)
    moved = torch.cat([space.dense(l) @ (opt.beta[l] - beta0[l]) for l in range(space.num_layers)])
    assert opt.beta.ne(beta0).any() and torch.allclose(flat(model) - exact, moved, atol=1e-5)
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.anchor(alpha)
