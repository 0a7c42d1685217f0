"""The plane layout's geometry is written twice, in Python (``backends/plane/layout.py``, which lays the
words out) and in C++ (``csrc/plane/twa_plane.h``'s ``Geometry``, which reads them): a program compiled from
the header prints its constants, and they must be Python's for every bit width."""

import subprocess

import pytest

from plane_host import ROOT, compiler
from twa_kernels.backends.plane.layout import words_per_load
from twa_kernels.packing import SUPPORTED_BITS, codes_per_word

PROGRAM = r"""
#include <cstdio>
#include "plane/twa_plane.h"
template <int B> void row() { std::printf("%d %d %d\n", B, twa::plane::Geometry<B, 1>::E, twa::plane::Geometry<B, 1>::V); }
int main() { row<1>(); row<2>(); row<4>(); row<8>(); return 0; }
"""


@pytest.mark.skipif(compiler() is None, reason="no C++ compiler")
def test_words_per_load_and_codes_per_word_agree_with_the_cpp_geometry(tmp_path):
    source = tmp_path / "geometry.cpp"
    source.write_text(PROGRAM)
    binary = tmp_path / "geometry"
    built = subprocess.run([compiler(), "-std=c++17", "-I", str(ROOT / "csrc"), str(source), "-o", str(binary)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    rows = [tuple(map(int, line.split())) for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                                      text=True).stdout.splitlines()]
    assert [b for b, _, _ in rows] == list(SUPPORTED_BITS)
    for bits, e, v in rows:
        assert (e, v) == (codes_per_word(bits), words_per_load(bits)), bits
