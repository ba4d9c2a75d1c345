// Metal kernels of the fused LoRA linear (maths in csrc/ops/lora.h):
//   lora_xa:     xa = x_d A                            (N, r) float32, saved for the backward
//   lora_linear: y  = x W^T + s xa B (+ bias)          one GEMM whose main loop runs over
//                two operand pairs, (x, W^T) then (s xa, B), into the same simdgroup_matrix
//                accumulators: the rank-r term never leaves the registers.
// Tiles are staged in threadgroup memory as float (operands of mixed dtype: T activations,
// float32 xa / LoRA parameters) and multiplied by 8x8 simdgroup matrices in float.
//
// The tile constants below are shared with the host (csrc/ops/lora.cpp includes this file
// with MLX_TUNER_LORA_PARAMS_ONLY defined, so that it sees the constants only).
#pragma once

namespace mlx_tuner_lora {
constexpr int BM = 32; // rows of y per threadgroup
constexpr int BN = 32; // columns of y per threadgroup
constexpr int BK = 16; // reduction step staged in threadgroup memory
constexpr int SIMDGROUPS = 4; // 2 x 2, each owning a 16 x 16 quarter of the tile
constexpr int THREADS = 32 * SIMDGROUPS;
constexpr int XA_COLS = 32; // lora_xa: columns of xa per threadgroup (one per lane)
constexpr int XA_ROWS = 4; // lora_xa: rows of xa per threadgroup (one per simdgroup)
} // namespace mlx_tuner_lora

#ifndef MLX_TUNER_LORA_PARAMS_ONLY
#include <metal_stdlib>

using namespace metal;

// xa[i, j] = sum_k x_d[i, k] A[k, j]; a lane per (i, j): lanes of a simdgroup share row i
// (one broadcast read of x_d) and read consecutive A columns.
template <typename T, typename U>
[[kernel]] void lora_xa(
    const device T* xd [[buffer(0)]],
    const device U* a [[buffer(1)]],
    device float* xa [[buffer(2)]],
    constant int& n [[buffer(3)]],
    constant int& in_dims [[buffer(4)]],
    constant int& r [[buffer(5)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint3 tid [[thread_position_in_threadgroup]]) {
  int j = int(tg.x) * mlx_tuner_lora::XA_COLS + int(tid.x);
  int i = int(tg.y) * mlx_tuner_lora::XA_ROWS + int(tid.y);
  if (i >= n || j >= r) {
    return;
  }
  const device T* row = xd + long(i) * in_dims;
  float acc = 0.0f;
  for (int k = 0; k < in_dims; ++k) {
    acc += float(row[k]) * float(a[long(k) * r + j]);
  }
  xa[long(i) * r + j] = acc;
}

// Stages a BM x BK tile of a row-major (rows, cols) matrix at (r0, k0), times `mul`, into
// `dst` (row-major BM x BK); zeros outside the matrix.
template <typename S>
inline void stage_rows(threadgroup float* dst, const device S* src, int rows, int cols,
                       int r0, int k0, float mul, uint t) {
  using namespace mlx_tuner_lora;
  for (int e = int(t); e < BM * BK; e += THREADS) {
    int i = e / BK, k = e % BK;
    int gi = r0 + i, gk = k0 + k;
    dst[e] = (gi < rows && gk < cols) ? mul * float(src[long(gi) * cols + gk]) : 0.0f;
  }
}

// Stages the BK x BN tile (k0, c0) of op(M) into `dst` (row-major BK x BN), where op(M)
// is M^T for a row-major (cols_total, k_total) matrix when `transposed`, else M itself,
// a row-major (k_total, cols_total) matrix; zeros outside.
template <typename S>
inline void stage_cols(threadgroup float* dst, const device S* src, bool transposed,
                       int k_total, int cols_total, int k0, int c0, uint t) {
  using namespace mlx_tuner_lora;
  for (int e = int(t); e < BK * BN; e += THREADS) {
    int k = e / BN, c = e % BN;
    int gk = k0 + k, gc = c0 + c;
    float v = 0.0f;
    if (gk < k_total && gc < cols_total) {
      v = float(transposed ? src[long(gc) * k_total + gk] : src[long(gk) * cols_total + gc]);
    }
    dst[e] = v;
  }
}

// The 16 x 16 quarter of a simdgroup: acc[a][b] += As[rows 8a..] * Bs[cols 8b..] over BK.
inline void mma_tile(thread simdgroup_matrix<float, 8, 8> (&acc)[2][2],
                     const threadgroup float* as, const threadgroup float* bs,
                     int sm, int sn) {
  using namespace mlx_tuner_lora;
  for (int kk = 0; kk < BK; kk += 8) {
    simdgroup_matrix<float, 8, 8> fa[2], fb[2];
    for (int u = 0; u < 2; ++u) {
      simdgroup_load(fa[u], as + (sm * 16 + u * 8) * BK + kk, BK);
      simdgroup_load(fb[u], bs + kk * BN + sn * 16 + u * 8, BN);
    }
    for (int u = 0; u < 2; ++u) {
      for (int v = 0; v < 2; ++v) {
        simdgroup_multiply_accumulate(acc[u][v], fa[u], fb[v], acc[u][v]);
      }
    }
  }
}

// y = x W^T + s xa B (+ bias). Grid: (ceil(out / BN), ceil(N / BM)) threadgroups of
// THREADS threads (lora_linear_launch on the host computes it).
template <typename T, typename U, bool HAS_BIAS>
[[kernel]] void lora_linear(
    const device T* x [[buffer(0)]],
    const device T* w [[buffer(1)]],
    const device float* xa [[buffer(2)]],
    const device U* b [[buffer(3)]],
    const device T* bias [[buffer(4)]],
    device T* y [[buffer(5)]],
    constant int& n [[buffer(6)]],
    constant int& in_dims [[buffer(7)]],
    constant int& out_dims [[buffer(8)]],
    constant int& r [[buffer(9)]],
    constant float& scale [[buffer(10)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint t [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  using namespace mlx_tuner_lora;
  threadgroup float as[BM * BK];
  threadgroup float bs[BK * BN];
  threadgroup float cs[BM * BN];
  int r0 = int(tg.y) * BM, c0 = int(tg.x) * BN;
  int sm = int(sg) / 2, sn = int(sg) % 2;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int u = 0; u < 2; ++u) {
    for (int v = 0; v < 2; ++v) {
      acc[u][v] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
  // Pair 1: (x, W^T) over in_dims.
  for (int k0 = 0; k0 < in_dims; k0 += BK) {
    stage_rows(as, x, n, in_dims, r0, k0, 1.0f, t);
    stage_cols(bs, w, true, in_dims, out_dims, k0, c0, t);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mma_tile(acc, as, bs, sm, sn);
    threadgroup_barrier(mem_flags::mem_threadgroup); // before the next stage overwrites
  }
  // Pair 2: (s xa, B) over the rank, into the same accumulators.
  for (int k0 = 0; k0 < r; k0 += BK) {
    stage_rows(as, xa, n, r, r0, k0, scale, t);
    stage_cols(bs, b, false, r, out_dims, k0, c0, t);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mma_tile(acc, as, bs, sm, sn);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int u = 0; u < 2; ++u) {
    for (int v = 0; v < 2; ++v) {
      simdgroup_store(acc[u][v], cs + (sm * 16 + u * 8) * BN + sn * 16 + v * 8, BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(t); e < BM * BN; e += THREADS) {
    int i = r0 + e / BN, j = c0 + e % BN;
    if (i < n && j < out_dims) {
      float v = cs[e];
      if (HAS_BIAS) {
        v += float(bias[j]);
      }
      y[long(i) * out_dims + j] = T(v);
    }
  }
}
#endif // MLX_TUNER_LORA_PARAMS_ONLY
