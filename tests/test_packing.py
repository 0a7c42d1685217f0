import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from twa_kernels.packing import (LayerLayout, check_bits, or_codes_into, pack_codes, unpack_codes,
                                 words_for)
import pytest


def as_bytes(words):
    return bytes(words.numpy().astype("<i4").tobytes())


def test_nibble_order_by_hand():
    # First code in the low bits: for 4 bits, [1, 2] is the byte 0x21.
    assert as_bytes(pack_codes(torch.tensor([1, 2]), 4))[0] == 0x21
    assert as_bytes(pack_codes(torch.tensor([0, 1, 2, 3]), 2))[0] == 0b11100100
    assert as_bytes(pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1))[0] == 0b10000001
    assert as_bytes(pack_codes(torch.tensor([0xAB, 0x01, 0xFF]), 8))[:3] == bytes([0xAB, 0x01, 0xFF])
    # Code 31 of a 1-bit stream is the top bit of word 0 (the int32 sign bit).
    codes = torch.zeros(32, dtype=torch.long)
    codes[31] = 1
    assert int(pack_codes(codes, 1)[0]) == -(2**31)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), num=st.integers(1, 200), first=st.integers(0, 40),
       seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_are_inverse(bits, num, first, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (first + num,), generator=gen)
    words = pack_codes(codes, bits)
    assert words.numel() == words_for(first + num, bits)
    assert torch.equal(unpack_codes(words, bits, num, first).long(), codes[first:])


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), cuts=st.lists(st.integers(1, 37), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_chunked_writes_equal_one_pack(bits, cuts, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (sum(cuts),), generator=gen, dtype=torch.uint8)
    words = torch.zeros(words_for(codes.numel(), bits), dtype=torch.int32)
    start = 0
    for c in cuts:  # chunk boundaries fall mid-word
        or_codes_into(words, start, codes[start:start + c], bits)
        start += c
    assert torch.equal(words, pack_codes(codes, bits))


@pytest.mark.parametrize("bits", [0, 3, 5, 16, 32, True, "4", 4.0])
def test_unsupported_bit_width(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        check_bits(bits)


def test_code_range_checked():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_codes(torch.tensor([16]), 4)


def test_offsets_are_int64_beyond_2_31():
    # 1.3B parameters x 60 checkpoints at 4 bits: 39 GB of codes. Offsets only; nothing allocated.
    sizes = (50_000_000,) * 26
    layout = LayerLayout(sizes, 60, 4)
    offs = layout.word_offsets
    assert offs.dtype == torch.int64
    expected = [0]
    for s in sizes:
        expected.append(expected[-1] + -(-s * 60 * 4 // 32))
    assert offs.tolist() == expected
    assert layout.num_words * 4 > 2**31 * 18
    assert layout.param_offsets[-1] == sum(sizes)
