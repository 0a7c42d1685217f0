// The packed B-bit layout of P̃, shared by the CPU and CUDA code (see twa_kernels/packing.py, which
// defines it): per layer a row-major stream of codes (code k = row * n + col) in little-endian 32-bit
// words, first code in the lowest bits; layer l starts at word word_off[l]. Dequantization is affine
// per (layer, column): value = scale * code + zero.
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

// Pointers and sizes of one call; every offset is 64-bit (streams pass 2^31 bytes at ~1B params).
struct Tables {
  const int32_t* words;
  const int64_t* word_off;    // [L]
  const int64_t* param_off;   // [L]
  const int64_t* sizes;       // [L]
  const int64_t* prog_layer;  // [P]
  const int64_t* prog_row;    // [P]
  const int64_t* layer_prog;  // [L + 1]
  const float* scale;         // [L, n]
  const float* zero;          // [L, n]
  int64_t num_programs;
  int64_t num_layers;
  int64_t rows_per_program;
  int n;
  int bits;
  bool vectorized = true;  // CPU: the AVX2 kernels where the CPU and the shape allow; false: portable only
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace twa
