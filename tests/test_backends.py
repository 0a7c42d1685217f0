"""Every kernel backend against the torch reference engine, over shapes that hit the edges."""

import inspect

import pytest
import torch

import twa_kernels as twa
from backend_cases import EDGE_SIZES, U32, exact_vectors, float_case, random_projection
from reference import batches, make_checkpoints, make_model
from twa_kernels.backends import REGISTRY, available_backends, make_engine, probe
from twa_kernels.backends.contract import Engine, Segments
from twa_kernels.backends.torch_ref import TorchEngine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def kernel_backends():
    """Every registered backend but the reference, on every device it runs on here: a new backend is
    tested by registering it."""
    out = []
    for name, backend in REGISTRY.items():
        if name == "torch":
            continue
        for dev in DEVICES:
            if dev in backend.devices:
                marks = () if name in available_backends(dev) else (
                    pytest.mark.skip(reason=f"{name} unavailable on {dev}: {probe(name, dev).detail}"),)
                out.append(pytest.param(name, dev, marks=marks, id=f"{name}-{dev}"))
    return out


BACKENDS = kernel_backends()
# The Triton interpreter runs a case in seconds where compiled kernels take milliseconds.
INTERPRETED = {("triton", "cpu"), ("triton_plane", "cpu")}
# The plane kernels run E fields per word one program at a time there, about 10× slower again: their
# widest n in the interpreter is 17 (every edge of a column block that is not whole); the clamped block
# of wide n is test_triton_plane.py's headline-width case, and on a GPU every n runs.
INTERPRETED_MAX_N = {("triton_plane", "cpu"): 17}


def crossed(bits_widths, ns):
    """(backend, device, bits, n) cases: every bit width crossed with every n for the compiled kernels
    (and for Triton on a GPU); in the interpreter each bit width and each n once, paired cyclically, so
    that every edge is still hit and CI stays short."""
    out = []
    for case in BACKENDS:
        backend, device = case.values
        if (backend, device) in INTERPRETED:
            narrow = [n for n in ns if n <= INTERPRETED_MAX_N.get((backend, device), n)] or [min(ns)]
            k = max(len(bits_widths), len(narrow))
            pairs = sorted({(bits_widths[i % len(bits_widths)], narrow[i % len(narrow)]) for i in range(k)})
        else:
            pairs = [(b, n) for b in bits_widths for n in ns]
        out += [pytest.param(backend, device, b, n, marks=case.marks, id=f"{n}-{b}-{case.id}") for b, n in pairs]
    return out


def engines(proj, backend, device, segments=None):
    """The backend under test at default tiles, and with small tiles (many programs per layer); for
    cpp also its vectorised kernel on small runs and its portable kernel alone. A backend registered
    with no variant here is tested as ``make_engine`` builds it."""
    out = [make_engine(proj, device, backend, segments=segments)]
    if backend == "cuda_plane":  # one tile per program: more programs per layer
        from twa_kernels.backends.plane.cuda_engine import CudaPlaneEngine
        out.append(CudaPlaneEngine(proj, torch.device(device), segments, tiles_per_program=1))
    elif backend == "triton":
        from twa_kernels.backends.rows.triton_kernels import TritonEngine
        out.append(TritonEngine(proj, torch.device(device), segments, block_rows=16, rows_per_program=48))
    elif backend == "triton_plane":  # tiles of 8 threads (256 rows at ≤ 4 bits), two tiles per program
        from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine
        out.append(TritonPlaneEngine(proj, torch.device(device), segments, threads=8, tiles_per_program=2))
    elif backend in ("cpp", "cuda"):
        from twa_kernels.backends.rows.extension_engine import ExtensionEngine
        out.append(ExtensionEngine(proj, torch.device(device), segments, rows_per_program=48, vectorized=False))
        if device == "cpu":
            out.append(ExtensionEngine(proj, torch.device(device), segments, rows_per_program=cpp_small_run(proj)))
    return out


def cpp_small_run(proj):
    """Five periods per program: one group of four periods and one period alone."""
    from twa_kernels.backends.extension import load
    return 5 * load().period_rows(proj.layout.n, proj.layout.bits)


@pytest.mark.parametrize("backend,device", BACKENDS + [pytest.param("torch", "cpu", id="torch-cpu")])
def test_every_engine_keeps_the_contract(backend, device):
    """What make_engine builds for each registered backend (and each variant tested here) is an
    :class:`Engine`: its registry name, the projection's layout, its segments (one per layer by default,
    or the ones given), and project / expand with the protocol's arguments."""
    proj = random_projection(EDGE_SIZES, 3, 4, seed=5)
    cut = Segments.cut(proj.layout, [1, 33, 500, 500, 7, 2500])
    for segments in (None, cut):
        for eng in engines(proj, backend, device, segments):
            assert isinstance(eng, Engine), type(eng)
            assert eng.name == backend and eng.layout is proj.layout, (eng.name, type(eng))
            assert eng.segments == (segments or Segments.per_layer(proj.layout))
            assert list(inspect.signature(eng.project).parameters) == ["grads"]
            expand = inspect.signature(eng.expand).parameters
            assert list(expand)[:3] == ["weights", "delta", "compensation"] and expand["compensation"].default is None
    dense = make_engine(random_projection(EDGE_SIZES, 3, None, seed=5), device, backend)
    assert isinstance(dense, Engine) and dense.name == "dense"


@pytest.mark.parametrize("backend,device,bits,n", crossed([1, 2, 4, 8], [1, 2, 3, 17, 60]))
def test_exact_on_dyadic_inputs(backend, device, bits, n):
    proj = random_projection(EDGE_SIZES, n, bits, seed=bits * 100 + n, dyadic=True)
    assert_exact(proj, engines(proj, backend, device), device)


def assert_exact(proj, engs, device):
    """Every engine gives the reference's bits on dyadic inputs, where every summation order is exact."""
    ref = TorchEngine(proj, torch.device("cpu"))
    g, delta, w = exact_vectors(proj.layout.numel, proj.layout.num_layers, proj.layout.n)
    c_ref = ref.project(g)
    w_ref = w.clone()
    ref.expand(w_ref, delta)
    for eng in engs:
        assert torch.equal(eng.project(g.to(device)).cpu(), c_ref)
        w_dev = w.clone().to(device)
        eng.expand(w_dev, delta.to(device))
        assert torch.equal(w_dev.cpu(), w_ref)


@pytest.mark.parametrize("backend,device,bits,n", crossed([1, 2, 4, 8], [1, 5, 64, 300]))
def test_float_inputs_within_fp32_bound(backend, device, bits, n):
    sizes = EDGE_SIZES if n < 300 else (1, 33, 700)
    proj = random_projection(sizes, n, bits, seed=7 * bits + n)
    g, delta, w, c_ref, w_ref, pb, eb = float_case(proj, n)
    for eng in engines(proj, backend, device):
        c = eng.project(g.to(device)).cpu()
        assert torch.all((c.double() - c_ref.double()).abs() <= pb)
        w_dev = w.clone().to(device)
        eng.expand(w_dev, delta.to(device))
        assert torch.all((w_dev.cpu().double() - w_ref.double()).abs() <= eb)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_and_compensated_weights(backend, device, dtype):
    proj = random_projection(EDGE_SIZES, 9, 4, seed=3, dyadic=True)
    ref = TorchEngine(proj, torch.device("cpu"))
    g, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), 9)
    g = g.to(dtype)  # small integers: exact in bf16 and fp16
    eng = make_engine(proj, device, backend)
    assert torch.equal(eng.project(g.to(device)).cpu(), ref.project(g))
    # Kahan path: w (half) + residue (bf16) carry the exact sum; same operation order everywhere.
    w_half = (w * 1.01).to(dtype)
    comp = torch.zeros_like(w_half, dtype=torch.bfloat16)
    w_ref, comp_ref = w_half.clone(), comp.clone()
    w_dev, comp_dev = w_half.clone().to(device), comp.clone().to(device)
    for k in range(3):
        d = delta * (k + 1) / 4  # dyadic: every sum exact, only the final roundings matter
        ref.expand(w_ref, d, comp_ref)
        eng.expand(w_dev, d.to(device), comp_dev)
    assert torch.equal(w_dev.cpu(), w_ref) and torch.equal(comp_dev.cpu(), comp_ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_project_is_reproducible(backend, device):
    proj = random_projection(EDGE_SIZES, 13, 4, seed=11)
    eng = engines(proj, backend, device)[-1]
    g = torch.randn(proj.layout.numel, generator=torch.Generator().manual_seed(0)).to(device)
    first = eng.project(g)
    for _ in range(3):
        assert torch.equal(eng.project(g), first)


def trajectory_cases():
    """Both optimizers at 1, 4 and 8 bits; in the interpreter the bit widths alternate optimizers."""
    optimizers = [(twa.ProjectedSGD, dict(lr=0.1, momentum=0.9)),
                  (twa.ProjectedAdamW, dict(lr=1e-2, weight_decay=1e-4, eps=1e-3))]
    out = []
    for case in BACKENDS:
        backend, device = case.values
        combos = [(opt, bits) for opt in optimizers for bits in (1, 4, 8)]
        if (backend, device) in INTERPRETED_MAX_N:  # the slowest: one optimizer at the headline width
            combos = [(optimizers[0], 4)]
        elif (backend, device) in INTERPRETED:
            combos = [(optimizers[i % 2], bits) for i, bits in enumerate((1, 4, 8))]
        out += [pytest.param(backend, device, cls, hp, bits, marks=case.marks,
                             id=f"{bits}-{cls.__name__}-{case.id}") for (cls, hp), bits in combos]
    return out


@pytest.mark.parametrize("backend,device,cls,hp,bits", trajectory_cases())
def test_optimizer_trajectory_matches_reference(backend, device, cls, hp, bits):
    def run(which, dev):
        model = make_model(dtype=torch.float32, d_in=6, hidden=11, d_out=3)
        space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 7), bits=bits, progress=False)
        model = model.to(dev)
        opt = cls(model.parameters(), space, backend=which, **hp)
        out = [opt.beta.cpu()]  # the start, then β after each step
        for x, y in batches(20, d_in=6, dtype=torch.float32):
            loss = torch.nn.functional.cross_entropy(model(x.to(dev)), y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(opt.beta.cpu())
        dense = [space.dense(l).double() for l in range(space.num_layers)]
        return out, torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]), dense

    # AdamW's step is about lr·sign(c) once |c| >> eps. At 1 bit a 3-element layer's P̃ᵀg cancels to
    # rounding noise (~1e-8), where any two correct fp32 sums disagree in sign; eps = 1e-3 bounds the
    # step's sensitivity to lr/eps. (The exact-input tests above pin the kernels bit for bit.)
    ref, w_ref, dense = run("torch", "cpu")
    got, w_got, _ = run(backend, device)
    # fp32 with D ≈ 120: each step's c agrees to ~(D + 3)·2u relative (about 1.5e-5); over 20 steps
    # of a contractive small-lr run the differences add up at most linearly.
    for step, (a, b) in enumerate(zip(got, ref)):
        assert torch.allclose(a, b, rtol=0, atol=20 * 1.5e-5 * float(b.abs().max() + 1e-3)), step
    # The weights are w̄ + P̃β carried by 21 fp32 in-place updates (the start, then a step each): they differ
    # by P̃ times the final β's difference, plus each run's rounding of every update, (n + 3)·u Σ_j |P̃_ij Δβ_j|
    # for the expand's sum and u·|w_i| for the addition.
    n = ref[0].shape[1]
    spread = torch.cat([d.abs() @ (a.double() - b.double()).abs() for d, a, b in zip(dense, got[-1], ref[-1])])
    moves = sum(torch.cat([d.abs() @ (b1.double() - b0.double()).abs() for d, b0, b1 in zip(dense, s0, s1)])
                for s0, s1 in zip([torch.zeros_like(ref[0])] + ref[:-1], ref))
    rounding = 2 * ((n + 3) * U32 * moves + len(ref) * U32 * w_ref.double().abs().max())
    assert torch.all((w_got.double() - w_ref.double()).abs() <= spread + rounding)


def test_auto_picks_triton_on_cuda_only():
    assert twa.available_backends("cpu")[-1] == "torch"
    from twa_kernels.backends import resolve_backend
    assert resolve_backend("auto", "cpu") in ("cpp", "torch")
    if torch.cuda.is_available():
        assert resolve_backend("auto", "cuda") == "triton"


@pytest.mark.parametrize("n_slots,expected", [(1, 2), (2, 2), (3, 4), (8, 8), (10, 2), (38, 8), (75, 16), (32, 32)])
def test_triton_column_windows_pad_little(n_slots, expected):
    # Slots per window: n = 60 at 4 bits (8 slots) is one window; n = 300 at 4 bits (38 slots) is five
    # windows of 8, 40 slots instead of the 64 a single power-of-two window would take.
    from twa_kernels.backends.rows.triton_kernels import window_slots

    s = window_slots(n_slots)
    assert s == expected
    padded = -(-n_slots // s) * s
    assert padded - n_slots <= 1 or padded * 8 <= n_slots * 9


CPP = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="cpp unavailable")


@CPP
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [8, 9, 10, 16, 24, 31, 64, 300])
def test_cpp_vectorised_kernel_exact(bits, n):
    # n = 8: every vector of 8 codes is one whole row; n = 9, 10, 31: vectors cross rows at every
    # offset; n = 300 at 1 bit: 8 rows per period. Sizes leave rows after the last whole period.
    from twa_kernels.backends.extension import load
    from twa_kernels.backends.rows.extension_engine import ExtensionEngine

    period = load().period_rows(n, bits)
    sizes = (1, period - 1 or 1, 3 * period + 1, 21 * period + period // 2, 7)
    proj = random_projection(sizes, n, bits, seed=n * 10 + bits, dyadic=True)
    engs = [ExtensionEngine(proj, torch.device("cpu"), rows_per_program=rows) for rows in (None, period, 5 * period)]
    assert all(e.vectorized == bool(load().cpu_vector_kernels_available()) for e in engs)
    assert_exact(proj, engs, "cpu")


@CPP
def test_cpp_falls_back_to_portable_where_vectors_do_not_fit():
    from twa_kernels.backends.extension import load
    from twa_kernels.backends.rows.extension_engine import ExtensionEngine

    proj = random_projection(EDGE_SIZES, 7, 4, seed=1)  # n < 8: a vector would hold codes of 3 rows
    assert not ExtensionEngine(proj, torch.device("cpu")).vectorized
    proj = random_projection(EDGE_SIZES, 17, 1, seed=1)  # 32 rows per period: 48 is no multiple
    assert load().period_rows(17, 1) == 32
    assert not ExtensionEngine(proj, torch.device("cpu"), rows_per_program=48).vectorized


# Layer 2 (1000 rows) cut at rows 1, 334 and 999: segments that start inside their layer at rows whose
# codes start mid-word, a one-row segment at each end; the other layers are one segment each.
SEGMENT_CUT = (1, 33, 1, 333, 665, 1, 7, 2500)


def scattered(flat, segments):
    """The flat vector as one separate allocation per segment (what a model's parameters are)."""
    return [part.clone() for part in flat.split(list(segments.sizes))]


@pytest.mark.parametrize("backend,device,bits,n", crossed([1, 2, 4, 8], [3, 17, 60]))
def test_segment_lists_give_the_flat_vectors_bits(backend, device, bits, n):
    """Kernels read each segment through its address: separate tensors, segments starting at any row
    of a layer, give exactly what the reference gives on one flat vector (dyadic inputs)."""
    proj = random_projection(EDGE_SIZES, n, bits, seed=bits * 31 + n, dyadic=True)
    segments = Segments.cut(proj.layout, SEGMENT_CUT)
    ref = TorchEngine(proj, torch.device("cpu"))
    g, delta, w = exact_vectors(proj.layout.numel, proj.layout.num_layers, n)
    c_ref = ref.project(g)
    w_ref = w.clone()
    ref.expand(w_ref, delta)
    for eng in engines(proj, backend, device, segments):
        assert torch.equal(eng.project(scattered(g.to(device), segments)).cpu(), c_ref)
        parts = scattered(w.to(device), segments)
        eng.expand(parts, delta.to(device))
        assert torch.equal(torch.cat(parts).cpu(), w_ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_segment_lists_with_compensation(backend, device):
    proj = random_projection(EDGE_SIZES, 9, 4, seed=5, dyadic=True)
    segments = Segments.cut(proj.layout, SEGMENT_CUT)
    ref = TorchEngine(proj, torch.device("cpu"))
    _, delta, w = exact_vectors(proj.layout.numel, len(EDGE_SIZES), 9)
    w_half = (w * 1.01).to(torch.bfloat16)
    w_ref, comp_ref = w_half.clone(), torch.zeros_like(w_half)
    parts = scattered(w_half.to(device), segments)
    comps = [torch.zeros_like(p) for p in parts]
    eng = make_engine(proj, device, backend, segments=segments)
    for k in range(3):
        d = delta * (k + 1) / 4
        ref.expand(w_ref, d, comp_ref)
        eng.expand(parts, d.to(device), comps)
    assert torch.equal(torch.cat(parts).cpu(), w_ref) and torch.equal(torch.cat(comps).cpu(), comp_ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_addresses_follow_tensors_that_moved(backend, device):
    """The address table is cached; a call with tensors elsewhere (a model moved or replaced its
    .data) reads the new ones, never the old."""
    proj = random_projection(EDGE_SIZES, 5, 4, seed=2, dyadic=True)
    ref = TorchEngine(proj, torch.device("cpu"))
    eng = make_engine(proj, device, backend)
    g, _, _ = exact_vectors(proj.layout.numel, len(EDGE_SIZES), 5)
    parts = scattered(g.to(device), Segments.per_layer(proj.layout))
    assert torch.equal(eng.project(parts).cpu(), ref.project(g))
    moved = [p.clone() * 2 for p in parts]
    assert torch.equal(eng.project(moved).cpu(), ref.project(2 * g))
    assert torch.equal(eng.project(parts).cpu(), ref.project(g))


def test_segment_errors_name_the_problem():
    proj = random_projection((4, 6), 3, 4, seed=0)
    with pytest.raises(ValueError, match="straddle layers 0 and 1"):
        Segments.cut(proj.layout, (3, 3, 4))
    with pytest.raises(ValueError, match="cover 9 elements, the layers 10"):
        Segments.cut(proj.layout, (4, 5))
    eng = make_engine(proj, "cpu", "torch")
    with pytest.raises(ValueError, match="expected 2 segment tensors"):
        eng.project([torch.zeros(10)])
    kernel = make_engine(proj, "cpu", "auto")
    with pytest.raises(ValueError, match="segment 1 must be a contiguous tensor of 6 elements"):
        kernel.project([torch.zeros(4), torch.zeros(5)])
    with pytest.raises(ValueError, match="not contiguous"):
        kernel.project([torch.zeros(4), torch.zeros(3, 2).t()])
    with pytest.raises(ValueError, match="one dtype for all"):
        kernel.project([torch.zeros(4), torch.zeros(6, dtype=torch.bfloat16)])
