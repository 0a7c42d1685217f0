"""Checks that need an NVIDIA GPU (skipped elsewhere): a ResNet-50-sized projection, offsets past
2^31 bytes on real allocations, and CUDA-graph capture of a whole optimizer step."""

import pytest
import torch

import twa_kernels as twa
from twa_kernels.optim import twa_state
from backend_cases import U32, project_bound, random_projection
from twa_kernels.backends import REGISTRY, available_backends, make_engine
from twa_kernels.backends.torch_ref import TorchEngine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPU_BACKENDS = [name for name, b in REGISTRY.items() if name != "torch" and "cuda" in b.devices]  # every registered one


def _gpu_backend(name):
    if name not in available_backends("cuda"):
        pytest.skip(f"{name} unavailable")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_resnet50_sized_projection(backend):
    _gpu_backend(backend)
    # 25,557,032 parameters split like a ResNet-50's largest tensors plus a 1-element layer.
    head = (2_359_296,) * 8 + (1_048_576,) * 4 + (2_048_000, 1, 1000, 2048, 3)
    sizes = head + (25_557_032 - sum(head),)
    assert sum(sizes) == 25_557_032
    proj = random_projection(sizes, 60, 4, seed=0)
    g = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    ref = TorchEngine(proj.to("cuda"), torch.device("cuda"))
    c_ref = ref.project(g.cuda()).cpu()
    c = make_engine(proj, "cuda", backend).project(g.cuda()).cpu()
    assert torch.all((c.double() - c_ref.double()).abs() <= project_bound(proj, g))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offsets_past_2_31_bytes(backend):
    _gpu_backend(backend)
    if torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 12 GiB")
    # Two layers; the second starts past word 2^29 (byte 2^31) of the stream: 2.4 GB of codes.
    sizes = (40_000_000, 1000)
    from twa_kernels.packing import LayerLayout, PackedProjection
    lay = LayerLayout(sizes, 60, 8)
    assert int(lay.word_offsets[1]) * 4 > 2**31
    words = torch.randint(-(2**31), 2**31, (lay.num_words,), dtype=torch.int64, device="cuda").to(torch.int32)
    proj = PackedProjection(lay, torch.rand(2, 60, device="cuda"), torch.randn(2, 60, device="cuda"), words)
    g = torch.zeros(sum(sizes), device="cuda")
    g[-1000:] = torch.randn(1000, device="cuda")
    c = make_engine(proj, "cuda", backend).project(g)
    expected = proj.dequantize(1).T.double() @ g[-1000:].double()
    # fp32 against the fp64 sum of the same dequantized terms: within project_bound's argument for this
    # layer ((D + 3)·u Σ|terms| for any summation order, doubled for the rounding of the dequantized
    # terms), computed for layer 1 alone (the whole bound would expand 2.4 G codes)
    q = proj.layer_codes(1).double()
    terms = (q * proj.scale[1].double().abs() + proj.zero[1].double().abs()).T @ g[-1000:].double().abs()
    assert torch.all((c[1].double() - expected).abs() <= 2 * (1000 + 3) * U32 * terms)
    assert torch.all(c[0] == proj.zero[0] * 0)


def test_optimizer_step_in_a_cuda_graph():
    """A captured step, replayed, does exactly what the same step does eagerly: two copies of one model and
    optimizer take the same warm-up steps, then one replays the graph and the other steps eagerly; their β,
    step count and weights agree bit for bit (the kernels use no atomics, and the step no host sync)."""
    from reference import make_checkpoints, make_model
    base = make_model(dtype=torch.float32, d_in=32, hidden=64, d_out=10)
    ckpts = make_checkpoints(base, 9)
    x = torch.randn(64, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def copy():
        model = make_model(dtype=torch.float32, d_in=32, hidden=64, d_out=10)
        space = twa.Subspace.from_checkpoints(model, ckpts, bits=4, progress=False)
        model = model.cuda()
        return model, twa.ProjectedAdamW(model.parameters(), space, lr=1e-2, nonfinite="skip")

    def step(model, opt):
        opt.zero_grad(set_to_none=False)  # the captured gradients keep their addresses
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    eager, captured = copy(), copy()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(*captured)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        step(*eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*captured)
    before = captured[1].beta
    graph.replay()
    step(*eager)
    torch.cuda.synchronize()
    assert not torch.equal(before, captured[1].beta)
    assert torch.equal(captured[1].beta, eager[1].beta)
    assert int(twa_state(captured[1].state_dict())["step"]) == int(twa_state(eager[1].state_dict())["step"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(captured[0].parameters(), eager[0].parameters()))


def test_aot_cubins_are_what_a_launch_compiles(tmp_path):
    """The offline compile (tests/triton_aot.py, no GPU) produces the very cubin a launch on this GPU
    compiles, so SASS read offline is the SASS that runs."""
    _gpu_backend("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    from twa_kernels.backends.rows.triton_kernels import TritonEngine
    sys.path.insert(0, str(Path(__file__).parent))
    from triton_aot import N, SIZES

    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TWA_AOT_DUMP=str(tmp_path), TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"))
    subprocess.run([sys.executable, str(root / "tests" / "triton_aot.py"), str(arch)], cwd=root, env=env, check=True,
                   capture_output=True)
    eng = TritonEngine(random_projection(SIZES, N, 4), torch.device("cuda"))
    g = torch.randn(sum(SIZES), device="cuda")
    eng.project(g)
    eng.expand(g.clone(), torch.zeros(len(SIZES), N, device="cuda"))
    addresses, _ = eng.addresses.grads(g)
    t, gsum = torch.empty(len(SIZES), N, device="cuda"), torch.empty(len(SIZES), device="cuda")
    project = eng.project_launches(addresses, torch.float32, t, gsum)[0]
    (expand,) = eng.expand_launches(addresses, torch.float32, None, gsum)
    from twa_kernels.backends.plane.triton_kernels import TritonPlaneEngine
    plane = TritonPlaneEngine(random_projection(SIZES, N, 4), torch.device("cuda"))
    plane.project(g)
    plane.expand(g.clone(), torch.zeros(len(SIZES), N, device="cuda"))
    plane_project = plane.project_launches(addresses, torch.float32, t)[0]
    (plane_expand,) = plane.expand_launches(addresses, torch.float32, None, t)
    for name, launch in (("project_4-bit_float32", project), ("expand_4-bit_float32", expand),
                         ("plane_project_4-bit_float32", plane_project), ("plane_expand_4-bit_float32", plane_expand)):
        launched = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.constants)  # the launch's cache entry
        offline = (tmp_path / f"sm{arch}_{name}.cubin").read_bytes()
        assert launched.asm["cubin"] == offline, name


def test_model_moved_to_the_gpu_after_the_optimizer_is_followed():
    """model.cuda() after the optimizer was made (the Hugging Face Trainer's optimizers=(opt, None)):
    the first step follows the parameters to the GPU and trains there, as an optimizer made after the
    move does."""
    from reference import batches, make_checkpoints, make_model

    def run(move_first):
        model = make_model(dtype=torch.float32)
        space = twa.Subspace.from_checkpoints(model, make_checkpoints(model, 5), bits=4, progress=False)
        if move_first:
            model.cuda()
        opt = twa.ProjectedSGD(model.parameters(), space, lr=0.2, momentum=0.9)
        model.cuda()
        for x, y in batches(5, dtype=torch.float32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.cuda()), y.cuda()).backward()
            opt.step()
        return opt

    followed, made_after = run(False), run(True)
    assert followed.backend == made_after.backend != "torch"
    assert followed._beta.device.type == "cuda"
    assert torch.allclose(followed.beta, made_after.beta, rtol=0, atol=1e-6)
