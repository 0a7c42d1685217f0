"""Merge weights that stand for a learning-rate decay (WSM's identity), against a recorded run."""

import math

import pytest
import torch

import twa_kernels as twa
from reference import batches, make_model


def test_merging_constant_lr_iterates_equals_the_run_with_decayed_gradients():
    # Record a constant-lr SGD run in float64: the iterates θ_1..θ_k and the gradients g_1..g_k taken
    # along it. The library's merge of the iterates with a family's weights c must equal θ_0 − η Σ w_i g_i,
    # the same gradients re-weighted by the decay w. Both sides are float64 sums of k ≤ 12 terms of size
    # ~1: they agree to ~1e-15; 1e-12 leaves room for the order of summation.
    model, lr, k = make_model(), 0.05, 12
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    iterates, grads = [], []
    for x, y in batches(k):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for family in twa.DECAY_FAMILIES:
        c, w = twa.decay_merge_weights(k, family), twa.decay_weights(k, family)
        merged = twa.weighted_mean(iterates, c)
        for name, start in theta0.items():
            replay = start - lr * sum(wi * g[name] for wi, g in zip(w, grads))
            torch.testing.assert_close(merged[name], replay, rtol=0, atol=1e-12, msg=f"{family}: {name}")


@pytest.mark.parametrize("k", [1, 2, 5, 20])
@pytest.mark.parametrize("family", list(twa.DECAY_FAMILIES))
def test_every_family_is_an_average_of_a_monotone_decay(family, k):
    c, w = twa.decay_merge_weights(k, family), twa.decay_weights(k, family)
    assert len(c) == len(w) == k and math.isclose(math.fsum(c), 1.0, rel_tol=0, abs_tol=1e-15)
    assert all(x >= 0 for x in c) and w[0] == 1.0 and all(a >= b for a, b in zip(w, w[1:]))
    assert twa.decay_of_merge(c) == pytest.approx(w, abs=1e-15)
    assert twa.decay_merge_weights(k, family, reverse=True) == c[::-1]


def test_the_families_have_their_known_shapes():
    k = 8
    assert twa.decay_merge_weights(k, "linear") == pytest.approx([1 / k] * k)  # WSM: linear decay = uniform merge
    # 1−sqrt: the discrete difference of √x over the checkpoint positions (Megatron's minus-sqrt)
    assert twa.decay_merge_weights(k, "1-sqrt") == pytest.approx([math.sqrt(j / k) - math.sqrt((j - 1) / k)
                                                                  for j in range(1, k + 1)])
    cosine = twa.decay_merge_weights(k, "cosine")
    assert cosine == pytest.approx(cosine[::-1]) and max(cosine) == pytest.approx(cosine[k // 2])  # the middle weighs most
    inverse = twa.decay_merge_weights(k, "inverse-sqrt")
    assert all(a > b for a, b in zip(inverse, inverse[1:]))  # falls fastest first: the oldest weigh most


def test_bad_windows_and_families_name_the_problem():
    with pytest.raises(ValueError, match="unknown decay family 'step'"):
        twa.decay_merge_weights(4, "step")
    with pytest.raises(ValueError, match="at least one checkpoint"):
        twa.decay_weights(0, "linear")
