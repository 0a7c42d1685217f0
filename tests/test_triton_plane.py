"""The v2 Triton kernels on the plane device layout (backend ``triton_plane``) against the torch reference,
in the interpreter: every bit width, n = 1 and odd n, layers that are not whole tiles, one-row layers,
segment boundaries inside tiles, misaligned segments, low-precision gradients and Kahan-compensated
weights. The interpreter runs these kernels slowly (one program at a time, E fields per word), so the
matrix is chosen to hit each edge once rather than crossed in full; test_gpu.py runs them on a GPU."""

import pytest
import torch

pytest.importorskip("triton")

import twa_kernels as twa  # noqa: E402
from backend_cases import EDGE_SIZES, exact_vectors, float_case, random_projection  # noqa: E402
from backend_cases import assert_same_bits as same_bits  # noqa: E402
from test_backends import test_optimizer_trajectory_matches_reference as backend_trajectory_matches  # noqa: E402
from twa_kernels.backends import make_engine  # noqa: E402
from twa_kernels.backends.contract import Segments  # noqa: E402
from twa_kernels.backends.plane_layout import PlaneLayout  # noqa: E402
from twa_kernels.backends.torch_ref import TorchEngine  # noqa: E402

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
# In the interpreter on the CPU; on a GPU (tests/test_gpu.py's run, TRITON_INTERPRET unset) on CUDA.
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 on the CPU, or a GPU")


def on(x):
    """A copy on the device under test (a copy on the CPU too: expand works in place)."""
    return [t.to(DEVICE, copy=True) for t in x] if isinstance(x, list) else x.to(DEVICE, copy=True)


def plane_engines(proj, segments=None, small_only=False):
    """Default tiles (one partial tile per layer here) and tiles of 8 threads (256 rows at ≤ 4 bits:
    layers of several whole tiles, two tiles per program)."""
    from twa_kernels.backends.triton_plane import TritonPlaneEngine
    small = TritonPlaneEngine(proj, torch.device(DEVICE), segments, threads=8, tiles_per_program=2)
    return [small] if small_only else [make_engine(proj, DEVICE, "triton_plane", segments=segments), small]


def assert_same_bits(proj, engines, g, delta, w, segments=None):
    same_bits(proj, engines, g, delta, w, segments, DEVICE)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_plane_words_hold_the_canonical_codes(bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=bits + n)
    for threads in (8, 128):
        plane = PlaneLayout(EDGE_SIZES, n, bits, threads)
        words = plane.pack(proj, "cpu")
        assert words.numel() == plane.num_words
        for layer in range(len(EDGE_SIZES)):
            assert torch.equal(plane.layer_codes(words, layer), proj.layer_codes(layer))
        # a layer's partial tile is narrowed, not padded to a whole tile: under E·V rows of padding per layer
        assert plane.num_words * (32 // bits) <= (sum(EDGE_SIZES) + len(EDGE_SIZES) * plane.per_word * plane.vec) * n


@pytest.mark.parametrize("bits,n", [(1, 3), (2, 5), (4, 1), (4, 17), (8, 3)])
def test_exact_on_dyadic_inputs(bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=bits * 100 + n, dyadic=True)
    g, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), n)
    assert_same_bits(proj, plane_engines(proj), g, delta, w)


def test_exact_at_the_headline_width():
    # n = 60 at 4 bits (Table 13's shape), tiles of 8 threads: many whole tiles, clamped column block
    proj = random_projection((1, 1100, 257), 60, 4, seed=5, dyadic=True)
    g, delta, w = exact_vectors(proj.layout.numel, 3, 60)
    assert_same_bits(proj, plane_engines(proj, small_only=True), g, delta, w)


@pytest.mark.parametrize("bits,n", [(4, 5), (8, 7)])
def test_float_inputs_within_fp32_bound(bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=7 * bits + n)
    g, delta, w, c_ref, w_ref, pb, eb = float_case(proj, n)
    for eng in plane_engines(proj):
        assert torch.all((eng.project(on(g)).cpu().double() - c_ref.double()).abs() <= pb)
        w_eng = on(w)
        eng.expand(w_eng, delta.to(DEVICE))
        w_eng = w_eng.cpu()
        assert torch.all((w_eng.double() - w_ref.double()).abs() <= eb)


def test_segments_cut_tiles_and_start_misaligned():
    # Layer 1 (1000 rows) is cut at rows 1, 301 and 700: segment boundaries inside tiles of 256 rows,
    # and segment tensors that start at odd rows (no vector alignment): each program takes its own rows.
    sizes = (33, 1000, 7)
    proj = random_projection(sizes, 5, 4, seed=2, dyadic=True)
    segments = Segments.cut(proj.layout, [33, 1, 300, 399, 300, 7])
    g, delta, w = exact_vectors(proj.layout.numel, 3, 5)
    gs = list(g.split(list(segments.sizes)))
    ws = [t.clone() for t in w.split(list(segments.sizes))]
    assert_same_bits(proj, plane_engines(proj, segments), gs, delta, ws, segments)
    # and the flat vector, whose layers start at odd offsets (33 elements in), gives the same bits
    assert_same_bits(proj, plane_engines(proj, small_only=True), g, delta, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_and_compensated_weights(dtype):
    proj = random_projection(EDGE_SIZES, 3, 4, seed=3, dyadic=True)
    ref = TorchEngine(proj, torch.device("cpu"))
    g, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), 3)
    g = g.to(dtype)
    (eng,) = plane_engines(proj, small_only=True)
    assert torch.equal(eng.project(on(g)).cpu(), ref.project(g))
    w_half = (w * 1.01).to(dtype)
    comp = torch.zeros_like(w_half, dtype=torch.bfloat16)
    w_ref, comp_ref, w_eng, comp_eng = w_half.clone(), comp.clone(), on(w_half), on(comp)
    for k in range(3):
        d = delta * (k + 1) / 4
        ref.expand(w_ref, d, comp_ref)
        eng.expand(w_eng, d.to(DEVICE), comp_eng)
    assert torch.equal(w_eng.cpu(), w_ref) and torch.equal(comp_eng.cpu(), comp_ref)


def test_project_is_reproducible():
    proj = random_projection(EDGE_SIZES, 13, 4, seed=11)
    (eng,) = plane_engines(proj, small_only=True)
    g = on(torch.randn(proj.layout.numel, generator=torch.Generator().manual_seed(0)))
    first = eng.project(g)
    assert all(torch.equal(eng.project(g), first) for _ in range(3))


def test_optimizer_trajectory_matches_reference():
    # the same 20-step check, with its argued tolerance, as every other backend (test_backends.py)
    backend_trajectory_matches("triton_plane", DEVICE, twa.ProjectedSGD, dict(lr=0.1, momentum=0.9), 4)
