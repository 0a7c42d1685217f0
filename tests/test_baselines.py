import pytest
import torch
from safetensors.torch import save_file

import twa_kernels as twa
from reference import make_checkpoints, make_model


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 2))


def bn_checkpoints(n=4):
    model = bn_model()
    out = []
    for i in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
        out.append(sd)
    return out


def test_swa_is_the_uniform_mean_and_keeps_integer_buffers():
    cks = bn_checkpoints()
    avg = twa.swa(cks)
    for k, v in avg.items():
        if v.is_floating_point():
            expected = torch.stack([c[k].double() for c in cks]).mean(0)
            assert torch.allclose(v.double(), expected, atol=1e-7) and v.dtype == cks[0][k].dtype
    assert int(avg["1.num_batches_tracked"]) == 40


def test_ema_matches_its_recursion():
    cks = bn_checkpoints(5)
    gamma = 0.7
    m = {k: v.double() for k, v in cks[0].items() if v.is_floating_point()}
    for c in cks[1:]:
        m = {k: gamma * m[k] + (1 - gamma) * c[k].double() for k in m}
    got = twa.ema(cks, gamma)
    assert all(torch.allclose(got[k].double(), m[k], atol=1e-7) for k in m)
    with pytest.raises(ValueError, match="gamma"):
        twa.ema(cks, 1.0)


def test_lawa_is_the_mean_of_the_last_k():
    cks = bn_checkpoints(5)
    got = twa.lawa(cks, 2)
    ref = twa.swa(cks[-2:])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_files_average_like_dicts(tmp_path):
    cks = bn_checkpoints(3)
    paths = []
    for i, c in enumerate(cks):
        p = tmp_path / (f"c{i}.pt" if i % 2 else f"c{i}.safetensors")
        torch.save(c, p) if i % 2 else save_file(c, p)
        paths.append(str(p))
    a, b = twa.swa(paths), twa.swa(cks)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_greedy_soup_adds_only_what_helps():
    model = make_model()
    base = make_checkpoints(model, 1)[0]
    target = {k: v + 1.0 for k, v in base.items()}
    # Checkpoints at distance 0.2, 0.4 and 3 from the target: the far one would hurt the soup.
    cks = [{k: v + d for k, v in target.items()} for d in (0.4, -0.2, 3.0)]

    def score(m):
        return -sum(float((p.detach() - target[k]).abs().sum()) for k, p in m.state_dict().items())

    soup, chosen = twa.greedy_soup(model, cks, score)
    assert chosen == [0, 1]
    expected = twa.swa(cks[:2])
    assert all(torch.allclose(soup[k], expected[k]) for k in soup)
    assert all(torch.equal(model.state_dict()[k], soup[k]) for k in soup)


def test_update_bn_recomputes_statistics():
    model = bn_model()
    model.load_state_dict(twa.swa(bn_checkpoints()))
    data = torch.randn(64, 4) * 3 + 1
    loader = [data[i:i + 16] for i in range(0, 64, 16)]
    twa.update_bn(loader, model)
    with torch.no_grad():
        hidden = model[0](data)
    assert torch.allclose(model[1].running_mean, hidden.mean(0), atol=1e-5)


def test_bad_checkpoints():
    cks = bn_checkpoints(3)
    del cks[2]["0.bias"]
    with pytest.raises(ValueError, match="other keys"):
        twa.swa(cks)
    cks = bn_checkpoints(3)
    cks[1]["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"checkpoint 1: '0.weight' contains NaN"):
        twa.swa(cks)
    cks = bn_checkpoints(2)
    cks[1]["3.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="shape"):
        twa.swa(cks)
