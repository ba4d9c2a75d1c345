// Dequantizing a panel of an affine-quantized matrix into float32 on the CPU, for the
// kernels that feed BLAS a slice of W at a time (qlora, lora_switch). CPU-only: nvcc
// never sees it (the bit layout itself is in quant.h, which it does).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/parallel.h"
#include "common/quant.h"
#include "mlx/array.h"

namespace mlx_tuner::quant {

// One quantized (rows, in_dims) matrix: packed rows `wq` (row_bytes(in_dims, bits) each)
// and its (rows, in_dims / group_size) scales and biases, both of dtype `sdtype`.
struct QMatrix {
  const uint8_t* wq;
  const void* scales;
  const void* biases;
  mlx::core::Dtype sdtype;
  int64_t in_dims;
  int bits;
  int group_size;
};

// panel[i, :] = dequant(W)[n0 + i, k0 : k1] for i < rows, row stride k1 - k0; k0 and k1
// multiples of 8. Rows split across our threads (inline when called from one of them).
inline void dequantize_panel(const QMatrix& w, int64_t n0, int64_t rows, int64_t k0,
                             int64_t k1, float* panel) {
  namespace mx = mlx::core;
  const int64_t rb = row_bytes(w.in_dims, w.bits);
  const int64_t groups = w.in_dims / w.group_size;
  auto run = [&](auto* s, auto* b) {
    dispatch_bits(w.bits, [&]<int BITS>() {
      parallel_for(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(k1 - k0, 1)),
                   [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          int64_t n = n0 + i;
          dequantize_span<BITS>(w.wq + n * rb, s + n * groups, b + n * groups, w.group_size,
                                k0, k1, panel + i * (k1 - k0));
        }
      });
    });
  };
  switch (w.sdtype) {
    case mx::float32:
      run(static_cast<const float*>(w.scales), static_cast<const float*>(w.biases));
      break;
    case mx::float16:
      run(static_cast<const mx::float16_t*>(w.scales),
          static_cast<const mx::float16_t*>(w.biases));
      break;
    default:
      run(static_cast<const mx::bfloat16_t*>(w.scales),
          static_cast<const mx::bfloat16_t*>(w.biases));
      break;
  }
}

} // namespace mlx_tuner::quant
