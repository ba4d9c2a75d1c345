// Unpacking MLX's affine quantization (shared by the qlora, dora and lora_switch
// families on the CPU, and by the CUDA qlora kernel). Layout, as mx.quantize writes it
// and as the tests check against mx.dequantize: each row of `weight` (uint32,
// (out, in * bits / 32)) is a little-endian bit stream in which element k occupies bits
// [k*bits, (k+1)*bits).
// So every run of 8 elements fills exactly `bits` bytes, byte aligned, for every bits
// in {2, 3, 4, 5, 6, 8} (3, 5, 6 straddle uint32 words, never bytes of a run of 8).
// Element k of row n is  w = scales[n, k / group] * q + biases[n, k / group].
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace mlx_tuner::quant {

inline bool valid_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

inline bool valid_group_size(int group_size) {
  return group_size == 32 || group_size == 64 || group_size == 128;
}

// Bytes one packed row of `in_dims` elements takes.
inline int64_t row_bytes(int64_t in_dims, int bits) {
  return in_dims * bits / 8;
}

// Dequantizes elements [k0, k1) of one row into out[0 .. k1-k0), in float32.
// k0 and k1 must be multiples of 8 (any group boundary or the row end is).
// S is the scale / bias element type (float, float16_t or bfloat16_t: anything that
// converts to float).
template <int BITS, typename S>
inline void dequantize_span(
    const uint8_t* row,
    const S* scales,
    const S* biases,
    int group_size,
    int64_t k0,
    int64_t k1,
    float* out) {
  constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
  int64_t k = k0;
  while (k < k1) {
    int64_t g = k / group_size;
    int64_t g_end = std::min<int64_t>(k1, (g + 1) * group_size);
    const float s = static_cast<float>(scales[g]);
    const float b = static_cast<float>(biases[g]);
    for (; k < g_end; k += 8) {
      uint64_t v = 0;
      std::memcpy(&v, row + k * BITS / 8, BITS); // 8 elements = BITS bytes
      float* o = out + (k - k0);
#if !defined(__CUDACC__) // the CPU kernels' loop (nvcc includes this header for its helpers)
#pragma GCC unroll 8
#endif
      for (int i = 0; i < 8; ++i) {
        o[i] = s * static_cast<float>((v >> (i * BITS)) & mask) + b;
      }
    }
  }
}

// Runtime bits -> compile-time BITS.
template <typename F>
inline void dispatch_bits(int bits, F&& f) {
  switch (bits) {
    case 2:
      f.template operator()<2>();
      break;
    case 3:
      f.template operator()<3>();
      break;
    case 4:
      f.template operator()<4>();
      break;
    case 5:
      f.template operator()<5>();
      break;
    case 6:
      f.template operator()<6>();
      break;
    case 8:
      f.template operator()<8>();
      break;
    default:
      throw std::invalid_argument(
          "[quant] bits must be one of 2, 3, 4, 5, 6, 8 but got " + std::to_string(bits) +
          ".");
  }
}

} // namespace mlx_tuner::quant
