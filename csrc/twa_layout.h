// The packed B-bit layout of P̃ and the kernel contract, shared by the CPU and CUDA code.
//
// Layout (twa_kernels/packing.py defines it): per layer a row-major stream of codes (code k = row * n +
// col) in little-endian 32-bit words, first code in the lowest bits; layer l starts at word word_off[l].
//
// Contract (twa_kernels/backends/contract.py; the rows family's KernelTables in backends/rows/engine.py):
// the vectors are lists of segments, the consecutive pieces of each layer's rows, found through a table
// of their addresses; a rows program owns at most rows_per_program rows of one segment. The rows kernels
// (rows/) see codes only: project returns qᵀg and Σg per layer, expand adds q·u + s to every row
// (u = scale∘Δβ, s = Σ zero∘Δβ: the engine's fold). The plane kernels (plane/) fold in their reduce.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define TWA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TWA_HOST_DEVICE inline
#endif

namespace twa {

template <int BITS>
TWA_HOST_DEVICE uint32_t code_at(const int32_t* layer_words, int64_t k) {
  constexpr int kPerWord = 32 / BITS;
  const uint32_t word = static_cast<uint32_t>(layer_words[k / kPerWord]);
  return (word >> ((k % kPerWord) * BITS)) & ((1u << BITS) - 1u);
}

// Pointers and sizes of one engine's tables; every offset is 64-bit (streams pass 2^31 bytes at ~1B
// params). The field names are KernelTables' own.
struct Tables {
  const int32_t* words;
  const int64_t* word_off;    // [L]
  const int64_t* seg_layer;   // [S]
  const int64_t* seg_row;     // [S] first row of the segment inside its layer
  const int64_t* seg_size;    // [S]
  const int64_t* prog_seg;    // [P]
  const int64_t* prog_row;    // [P] first row of the program inside its segment
  const int64_t* layer_prog;  // [L + 1]
  int64_t num_programs;
  int64_t num_layers;
  int64_t num_segments;
  int64_t rows_per_program;
  int n;
  int bits;
  bool vectorized = true;  // CPU: the AVX2 kernels where the CPU and the shape allow; false: portable only
};

// What a program works on, from three table loads.
struct Program {
  int64_t seg;
  int64_t layer;
  int64_t row0;        // first row inside the segment
  int64_t rows;        // rows of this program
  int64_t layer_row0;  // first row inside the layer: the code row
};

TWA_HOST_DEVICE Program program_at(const Tables& t, int64_t p) {
  Program g;
  g.seg = t.prog_seg[p];
  g.layer = t.seg_layer[g.seg];
  g.row0 = t.prog_row[p];
  const int64_t left = t.seg_size[g.seg] - g.row0;
  g.rows = left < t.rows_per_program ? left : t.rows_per_program;
  g.layer_row0 = t.seg_row[g.seg] + g.row0;
  return g;
}

// The element a segment address table points to: row `row` of segment `seg`.
template <typename T>
TWA_HOST_DEVICE T* segment_row(const int64_t* addr, int64_t seg, int64_t row) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addr[seg])) + row;
}

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace twa
