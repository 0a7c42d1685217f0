"""What only the plane layout has, for the v2 Triton kernels (backend ``triton_plane``): its words hold the
canonical codes, many whole tiles at the headline width, segment boundaries inside tiles and misaligned
segments. Everything every backend must pass (every bit width, odd n, edge sizes, low precision and
Kahan, reproducibility, optimizer trajectories) runs in tests/test_backends.py, which takes its backends
from the registry. In the interpreter on the CPU; test_gpu.py runs this file on a GPU."""

import pytest
import torch

pytest.importorskip("triton")

from backend_cases import EDGE_SIZES, exact_vectors, random_projection  # noqa: E402
from backend_cases import assert_same_bits as same_bits  # noqa: E402
from twa_kernels.backends import make_engine  # noqa: E402
from twa_kernels.backends.contract import Segments  # noqa: E402
from twa_kernels.backends.plane.layout import PlaneLayout  # noqa: E402

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
    from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine
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


def test_exact_at_the_headline_width():
    # n = 60 at 4 bits (Table 13's shape), tiles of 8 threads: many whole tiles, clamped column block
    proj = random_projection((1, 1100, 257), 60, 4, seed=5, dyadic=True)
    g, delta, w = exact_vectors(proj.layout.numel, 3, 60)
    assert_same_bits(proj, plane_engines(proj, small_only=True), g, delta, w)


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
