"""The cuda_plane kernels' per-thread code (csrc/plane/twa_plane.h) against the torch reference, through the
host build (tests/plane_host.py) and the real engine (CudaPlaneEngine: plane words, tables, address
tables): every bit width crossed with n = 1, 3 and 17, layers that are not whole tiles and one-row
layers, many whole tiles, segment boundaries inside tiles, misaligned segments, bf16 gradients and
Kahan-compensated bf16 weights. The host build runs a block's threads in turn and reduces in the GPU's
order; what only the GPU does (shuffles, shared memory, the launches) is in tests/test_gpu.py."""

import pytest
import torch

from backend_cases import EDGE_SIZES, assert_same_bits, exact_vectors, float_case, random_projection
from plane_host import HostPlaneKernels, compiler
from twa_kernels.backends.contract import Segments
from twa_kernels.backends.plane.cuda_engine import CudaPlaneEngine
from twa_kernels.backends.torch_ref import TorchEngine

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a C++ compiler for the host build")


@pytest.fixture(scope="module")
def kernels():
    return HostPlaneKernels()


def engines(proj, kernels, segments=None):
    """Tiles of 8 threads (256 rows at ≤ 4 bits: layers of several whole tiles, two per program) and of
    the GPU's 128 threads (one partial tile per layer here)."""
    return [CudaPlaneEngine(proj, "cpu", segments, kernels=kernels, threads=8),
            CudaPlaneEngine(proj, "cpu", segments, kernels=kernels, threads=128)]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_exact_on_dyadic_inputs(kernels, bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=bits * 100 + n, dyadic=True)
    g, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), n)
    assert_same_bits(proj, engines(proj, kernels), g, delta, w)


def test_exact_at_the_headline_width(kernels):
    # n = 60 at 4 bits (Table 13's shape): many whole tiles of 8 threads, a clamped last column block
    proj = random_projection((1, 1100, 8192 + 3), 60, 4, seed=5, dyadic=True)
    g, delta, w = exact_vectors(proj.layout.numel, 3, 60)
    assert_same_bits(proj, engines(proj, kernels), g, delta, w)


@pytest.mark.parametrize("bits,n", [(4, 5), (1, 7), (8, 9)])
def test_float_inputs_within_fp32_bound(kernels, bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=7 * bits + n)
    g, delta, w, c_ref, w_ref, pb, eb = float_case(proj, n)
    for eng in engines(proj, kernels):
        assert torch.all((eng.project(g).double() - c_ref.double()).abs() <= pb)
        w_eng = w.clone()
        eng.expand(w_eng, delta)
        assert torch.all((w_eng.double() - w_ref.double()).abs() <= eb)


@pytest.mark.parametrize("bits", [2, 4])
def test_segments_cut_tiles_and_start_misaligned(kernels, bits):
    # Layer 1 (1000 rows) cut at rows 1, 301 and 700: boundaries inside tiles, and segment tensors that
    # start at odd rows (the unaligned path); then the flat vector, whose layers start at odd offsets.
    sizes = (33, 1000, 7)
    proj = random_projection(sizes, 5, bits, seed=2, dyadic=True)
    segments = Segments.cut(proj.layout, [33, 1, 300, 399, 300, 7])
    g, delta, w = exact_vectors(proj.layout.numel, 3, 5)
    gs = list(g.split(list(segments.sizes)))
    ws = [t.clone() for t in w.split(list(segments.sizes))]
    assert_same_bits(proj, engines(proj, kernels, segments), gs, delta, ws, segments)
    assert_same_bits(proj, engines(proj, kernels), g, delta, w)


def test_bf16_grads_and_compensated_weights(kernels):
    proj = random_projection(EDGE_SIZES, 3, 4, seed=3, dyadic=True)
    ref = TorchEngine(proj, torch.device("cpu"))
    g, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), 3)
    g = g.to(torch.bfloat16)
    for eng in engines(proj, kernels):
        assert torch.equal(eng.project(g), ref.project(g))
        w_half = (w * 1.01).to(torch.bfloat16)
        comp = torch.zeros_like(w_half)
        w_ref, comp_ref, w_eng, comp_eng = w_half.clone(), comp.clone(), w_half.clone(), comp.clone()
        for k in range(3):
            d = delta * (k + 1) / 4
            ref.expand(w_ref, d, comp_ref)
            eng.expand(w_eng, d, comp_eng)
        assert torch.equal(w_eng, w_ref) and torch.equal(comp_eng, comp_ref)
        w_plain, w_plain_ref = w_half.clone(), w_half.clone()  # bf16 weights without compensation
        eng.expand(w_plain, delta)
        ref.expand(w_plain_ref, delta)
        assert torch.equal(w_plain, w_plain_ref)


def test_project_is_reproducible(kernels):
    proj = random_projection(EDGE_SIZES, 13, 4, seed=11)
    g = torch.randn(proj.layout.numel, generator=torch.Generator().manual_seed(0))
    for eng in engines(proj, kernels):
        first = eng.project(g)
        assert all(torch.equal(eng.project(g), first) for _ in range(3))


def test_a_rank_without_rows_projects_zeros(kernels):
    # a row-sharded rank may hold no rows of any layer: no programs, c = 0 from the reduction alone
    proj = random_projection((5, 9), 3, 4, seed=4)
    eng = CudaPlaneEngine(proj, "cpu", Segments((), (), ()), kernels=kernels, threads=8)
    assert eng.tables.num_programs == 0
    assert torch.equal(eng.project(torch.empty(0)), torch.zeros(2, 3))
    eng.expand(torch.empty(0), torch.ones(2, 3))


def test_the_gpu_engine_needs_a_gpu():
    proj = random_projection((5, 9), 3, 4, seed=4)
    with pytest.raises(RuntimeError, match="cuda_plane backend is unavailable"):
        CudaPlaneEngine(proj, "cpu")
    with pytest.raises(ValueError, match="compiled for 128 threads"):
        CudaPlaneEngine(proj, "cpu", threads=8)
