import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import twa_kernels as twa
from reference import layer_stacks, make_checkpoints, make_model, projection, quantize

U32 = 2.0**-24  # float32 unit roundoff


def build(model, ckpts, **kw):
    kw.setdefault("progress", False)
    return twa.Subspace.from_checkpoints(model, ckpts, **kw)


def names_of(model):
    return [nm for nm, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("layers", ["param", "model"])
@pytest.mark.parametrize("decouple", ["center", "none", "gram_schmidt"])
@pytest.mark.parametrize("bits", [None, 1, 2, 4, 8])
def test_projection_matches_equations(decouple, bits, layers):
    model = make_model()
    ckpts = make_checkpoints(model, 5)
    space = build(model, ckpts, bits=bits, decouple=decouple, layers=layers)
    stacks = layer_stacks(ckpts, names_of(model), layers)
    assert space.num_layers == len(stacks) and space.n == 5 and space.bits == bits
    for l, x in enumerate(stacks):
        p = projection(x, decouple)
        _, expected, size = quantize(p, bits)
        got = space.dense(l).double()
        # got = fl(fl(q·a) + b) in fp32 against the exact q·a + b: error ≤ 2u(|q·a| + |b|). bits=None:
        # both are P rounded once to fp32, and Gram-Schmidt via the Gram matrix agrees with the
        # reference's modified GS to ~1e-13 here, far below one fp32 ulp (the 2^-20 term).
        bound = (size + p.abs().max() * 2**-20 * (decouple == "gram_schmidt")) * 2 * U32
        assert torch.all((got - expected).abs() <= bound + 1e-30), (l, (got - expected).abs().max())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_per_column_and_norm_preserving_scales(bits):
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    stacks = layer_stacks(ckpts, names_of(model))
    col = build(model, ckpts, bits=bits, scale="column")
    nrm = build(model, ckpts, bits=bits, scale="column_norm")
    for l, x in enumerate(stacks):
        p = projection(x, "center")
        _, expected, size = quantize(p, bits, scale="column")
        assert torch.all((col.dense(l).double() - expected).abs() <= 2 * U32 * size)
        # Same codes; scale and zero of each column multiplied by one common factor, chosen so that
        # the dequantized column has the norm of e_i (= 1).
        assert torch.equal(nrm.projection.layer_codes(l), col.projection.layer_codes(l))
        live = col.projection.scale[l] > 0
        f_scale = nrm.projection.scale[l][live].double() / col.projection.scale[l][live].double()
        f_zero = nrm.projection.zero[l][live].double() / col.projection.zero[l][live].double()
        assert torch.allclose(f_scale, f_zero, rtol=4 * U32, atol=0)
        norms = nrm.dense(l).double().norm(dim=0)[live]
        assert torch.allclose(norms, torch.ones_like(norms), rtol=8 * U32 * math.sqrt(x.shape[1]), atol=0)


def test_one_sign_and_constant_layers_keep_float_zero():
    model = make_model()
    ckpts = make_checkpoints(model, 3)
    for i, ck in enumerate(ckpts):  # all-positive weights: min-max zero b > 0
        ck["fc1.weight"] = ck["fc1.weight"].abs() + 1.0
        ck["gain"] = torch.tensor(2.0 + i, dtype=torch.float64)  # 1 element, same sign: constant P
    space = build(model, ckpts, bits=2, decouple="none")
    names = names_of(model)
    l_w, l_g = names.index("fc1.weight"), names.index("gain")
    p = projection(layer_stacks(ckpts, names)[l_w], "none")
    assert p.min() > 0
    err = (space.dense(l_w).double() - p).abs().max()
    levels = 3
    assert err <= (p.max() - p.min()) / levels / 2 * (1 + 1e-6)  # round-to-nearest on the grid
    assert torch.equal(space.dense(l_g), torch.ones(1, 3))  # max = min: q = 0, P̃ = b, no 0/0


def test_frozen_layer_kept_fixed_never_nan():
    model = make_model()
    ckpts = make_checkpoints(model, 4)
    for ck in ckpts:
        ck["fc2.bias"] = ckpts[0]["fc2.bias"].clone()
    with pytest.warns(UserWarning, match="held fixed at their centre: .fc2.bias. is identical"):
        space = build(model, ckpts, bits=4)
    l = names_of(model).index("fc2.bias")
    assert bool(space.frozen[l])
    assert torch.equal(space.dense(l), torch.zeros(3, 4))
    alphas = space.alphas(torch.randn(space.num_layers, 4))
    assert torch.isfinite(alphas).all()


@pytest.mark.parametrize("decouple", ["center", "none", "gram_schmidt"])
def test_alphas_reproduce_the_point(decouple):
    model = make_model()
    ckpts = make_checkpoints(model, 6)
    space = build(model, ckpts, bits=None, decouple=decouple)
    beta = torch.randn(space.num_layers, 6, dtype=torch.float64) * 0.1
    alphas = space.alphas(beta)
    if decouple == "center":
        assert torch.allclose(alphas.sum(dim=1), torch.ones(space.num_layers, dtype=torch.float64), atol=1e-12)
    for l, x in enumerate(layer_stacks(ckpts, names_of(model))):
        p = space.dense(l).double()
        point = space.center[space.layer_slices()[l]].double() + p @ beta[l]
        mixed = alphas[l] @ x
        # P and w̄ are stored in fp32: the two sides differ by those roundings only.
        bound = 2 * U32 * (p.abs() @ beta[l].abs() + x.abs().max(dim=0).values) + 1e-12
        assert torch.all((point - mixed).abs() <= bound)
    back = space.beta_for_alphas(alphas)
    assert torch.allclose(space.alphas(back), alphas, atol=1e-9)


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "dict"])
def test_streaming_from_files_and_small_chunks(tmp_path, fmt):
    model = make_model(dtype=torch.float32)
    ckpts = make_checkpoints(model, 5)
    reference = build(model, ckpts, bits=4)
    if fmt == "dict":
        sources = ckpts
    else:
        sources = []
        for i, ck in enumerate(ckpts):
            path = tmp_path / f"ck{i}.{fmt}"
            if fmt == "pt":
                torch.save(ck, path)
            else:
                save_file({k: v.contiguous() for k, v in ck.items()}, path)
            sources.append(str(path))
    # A chunk budget of a few rows: chunks start mid-word and the layer is read piecewise.
    small = build(model, sources, bits=4, chunk_bytes=5 * 8 * 4 * 3)
    # Elementwise results are identical; the column norms are fp64 sums in another order, so the
    # scales agree to fp64 rounding, far inside one fp32 ulp.
    assert torch.equal(small.projection.words, reference.projection.words)
    assert torch.equal(small.center, reference.center)
    assert torch.allclose(small.col_norms, reference.col_norms, rtol=1e-13, atol=0)
    assert torch.allclose(small.projection.scale, reference.projection.scale, rtol=U32, atol=0)


def test_wrapped_and_ddp_prefixed_state_dicts():
    model = make_model()
    ckpts = make_checkpoints(model, 3)
    wrapped = [{"state_dict": ckpts[0], "epoch": 1}, {f"module.{k}": v for k, v in ckpts[1].items()}, ckpts[2]]
    assert build(model, wrapped).fingerprint == build(model, ckpts).fingerprint


def test_save_load_roundtrip(tmp_path):
    model = make_model()
    space = build(model, make_checkpoints(model, 5), bits=2, decouple="gram_schmidt")
    path = tmp_path / "space.safetensors"
    space.save(path)
    back = twa.Subspace.load(path)
    assert back.fingerprint == space.fingerprint
    for l in range(space.num_layers):
        assert torch.equal(back.dense(l), space.dense(l))
    assert torch.equal(back.center, space.center)
    assert back.nbytes == space.nbytes and back.names == space.names


def test_nbytes_is_the_packed_size():
    model = make_model()
    space = build(model, make_checkpoints(model, 7), bits=4)
    expected_words = sum(-(-d * 7 * 4 // 32) for d in space.layer_sizes)
    assert space.nbytes == expected_words * 4 + 2 * space.num_layers * 7 * 4


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestBadInput:
    def test_fewer_than_two(self):
        model = make_model()
        with pytest.raises(ValueError, match="at least two checkpoints"):
            build(model, make_checkpoints(model, 1))

    def test_identical(self):
        model = make_model()
        ck = make_checkpoints(model, 1)[0]
        with pytest.raises(ValueError, match="identical"):
            build(model, [ck, {k: v.clone() for k, v in ck.items()}, ck])

    def test_missing_key_and_bad_shape_name_the_problem(self):
        model = make_model()
        ckpts = make_checkpoints(model, 3)
        del ckpts[1]["fc2.weight"]
        with pytest.raises(ValueError, match=r"checkpoint 1 lacks 1 .*fc2\.weight"):
            build(model, ckpts)
        ckpts = make_checkpoints(model, 3)
        ckpts[2]["fc1.bias"] = torch.zeros(8, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"checkpoint 2: parameter 'fc1.bias' has shape \(8,\)"):
            build(model, ckpts)

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_nonfinite_checkpoint_file_untouched(self, tmp_path, bad):
        model = make_model(dtype=torch.float32)
        ckpts = make_checkpoints(model, 3)
        ckpts[1]["fc1.weight"][2, 3] = bad
        paths = []
        for i, ck in enumerate(ckpts):
            paths.append(tmp_path / f"c{i}.pt")
            torch.save(ck, paths[-1])
        before = [sha(p) for p in paths]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"checkpoint 1 \(.*c1\.pt\): parameter 'fc1.weight' contains NaN or Inf"):
            build(model, [str(p) for p in paths])
        assert [sha(p) for p in paths] == before
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    def test_unsupported_bits_and_modes(self):
        model = make_model()
        ckpts = make_checkpoints(model, 2)
        with pytest.raises(ValueError, match="unsupported bit width 3"):
            build(model, ckpts, bits=3)
        with pytest.raises(ValueError, match="decouple mode"):
            build(model, ckpts, decouple="pca")
        with pytest.raises(ValueError, match="scale mode"):
            build(model, ckpts, scale="tensor")

    def test_corrupt_safetensors_checkpoint(self, tmp_path):
        model = make_model(dtype=torch.float32)
        ckpts = make_checkpoints(model, 2)
        paths = []
        for i, ck in enumerate(ckpts):
            paths.append(tmp_path / f"c{i}.safetensors")
            save_file({k: v.contiguous() for k, v in ck.items()}, paths[-1])
        raw = bytearray(paths[1].read_bytes())
        paths[1].write_bytes(bytes(raw[:-4]))  # truncated: the last tensor's bytes run past the end
        with pytest.raises(ValueError, match=r"c1\.safetensors: tensor .* inconsistent offsets"):
            build(model, [str(p) for p in paths])

    def test_code_is_never_run(self, tmp_path):
        model = make_model()
        path, marker = tmp_path / "evil.pt", tmp_path / "ran"

        class Evil:  # unpickling this runs code: it creates the marker file
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"fc1.weight": Evil()}, path)
        with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
            build(model, [str(path), str(path)])
        assert not marker.exists()

    def test_corrupt_subspace_file(self, tmp_path):
        model = make_model()
        space = build(model, make_checkpoints(model, 3))
        path = tmp_path / "s.safetensors"
        space.save(path)
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["scale"] = tensors["scale"] * 2
        save_file(tensors, path, metadata=meta)
        with pytest.raises(ValueError, match="do not match their checksum"):
            twa.Subspace.load(path)

    def test_a_flipped_byte_in_the_codes_is_caught(self, tmp_path):
        model = make_model()
        space = build(model, make_checkpoints(model, 3))
        path = tmp_path / "s.safetensors"
        space.save(path)
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        begin, _ = json.loads(data[8:header])["words"]["data_offsets"]
        data[header + begin + 3] ^= 0x10  # one bit of one code
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="do not match their checksum"):
            twa.Subspace.load(path)
