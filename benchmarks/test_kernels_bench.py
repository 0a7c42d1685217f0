"""The projection step per backend under pytest-benchmark, for tracking over commits:

    python -m pytest benchmarks/test_kernels_bench.py --benchmark-enable --benchmark-json=out.json

(`--benchmark-enable` because the project's pytest settings disable timing for the test run.) Sizes
grow on a GPU; the ratio tables and plots come from ``python -m benchmarks.roofline``.
"""

import pytest
import torch

from twa_kernels.backends import available_backends, make_engine
from twa_kernels.testing import layer_sizes_like_a_cnn, random_projection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
D = 25_557_032 if DEVICE == "cuda" else 200_000
CASES = [(n, bits) for n in (10, 60) for bits in (1, 2, 4, 8)]


@pytest.fixture(scope="module")
def vectors():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(D, generator=gen).to(DEVICE), torch.randn(D, generator=gen).to(DEVICE)


@pytest.mark.parametrize("backend", [b for b in available_backends(DEVICE)])
@pytest.mark.parametrize("n,bits", CASES)
def test_projection_step(benchmark, vectors, backend, n, bits):
    sizes = layer_sizes_like_a_cnn(D)
    engine = make_engine(random_projection(sizes, n, bits), DEVICE, backend)
    g, w = vectors
    delta = torch.randn(len(sizes), n, device=DEVICE) * 1e-3

    def step():
        engine.project(g)
        engine.expand(w, delta)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(D=D, n=n, bits=bits, backend=backend, device=DEVICE,
                                bytes=2 * D * n * bits / 8 + 12 * D)
    benchmark.pedantic(step, rounds=5 if backend != "torch" else 2, warmup_rounds=1)
