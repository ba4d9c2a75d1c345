// DoRA's Metal kernels (maths in csrc/ops/dora.h; the GEMMs of the GPU path are MLX's own
// and the fused LoRA / QLoRA primitive's, csrc/ops/dora.cpp compose_gpu):
//   dora_row_sq:    c_i = ||W_i||^2 in float32 (DoRARowSqNorm), W dense or affine-quantized
//                   (mx.quantize's little-endian bit stream of BITS-bit codes per row); a
//                   threadgroup per row: simd_sum, then one threadgroup stage.
//   dora_gram:      G = A^T A (r x r, float32, r <= MAX_RANK); a threadgroup per row k of G,
//                   each thread sums its share of A's rows for all l, then two stages.
//   dora_inv_norm:  1 / n_i = 1 / sqrt(max(c_i + 2 s B[:,i].P[i,:] + s^2 B[:,i]^T G B[:,i], 0))
//                   (DoRAInvNorm), a thread per column i; P (out, r) or P^T (r, out) in T.
//                   A zero norm gives +inf, as the CUDA kernel and MLX's divide do.
//   dora_scale:     y = z * sv (+ bias) (DoRAScale), and dz = dy * sv alone; a thread per
//                   column of a block of rows.
//   dora_scale_vjp: dz = dy * sv, and per block of rows the column sums of dy * z and of
//                   dy as float32 partial rows (DoRAScaleVJP); dora_scale_colsum adds the
//                   partial rows in a fixed order: dsv = sum_rows dy z, dbias = sum_rows dy.
// All maths in float32, each output rounded to its dtype once; the product z * sv is
// rounded to float32 before the bias is added (MLX's multiply then add, bit for bit in
// float32; DoRAScale's eval_cpu and the CUDA kernel do the same). No atomics: every output
// has one writer, and every sum runs in one fixed order (the same bits on every run).
//
// The constants below are shared with the host (csrc/ops/dora.cpp includes this file with
// MLX_TUNER_DORA_PARAMS_ONLY defined, so that it sees the constants only).
#pragma once

namespace mlx_tuner_dora {
constexpr int ROW_THREADS = 256; // dora_row_sq: threads per row of W
constexpr int MAX_RANK = 32; // = kInvNormMaxRank (csrc/ops/dora.h)
constexpr int GRAM_THREADS = 256; // dora_gram: threads per row of G
constexpr int NORM_THREADS = 256; // dora_inv_norm: columns per threadgroup
constexpr int SCALE_COLS = 256; // dora_scale: columns per threadgroup (a thread each)
constexpr int SCALE_ROWS = 4; // dora_scale: rows per threadgroup (looped by each thread)
constexpr int VJP_TX = 32; // dora_scale_vjp: columns per tile (a simdgroup across them)
constexpr int VJP_TY = 8; // dora_scale_vjp: thread rows per tile (a simdgroup each)
constexpr int VJP_MIN_TILE_ROWS = 64; // rows of a tile at least this many ...
constexpr int VJP_TARGET_TILES = 1024; // ... and only as many row tiles as fill the GPU
constexpr int COLSUM_THREADS = 256; // dora_scale_colsum: columns per threadgroup
} // namespace mlx_tuner_dora

#ifndef MLX_TUNER_DORA_PARAMS_ONLY
#include <metal_stdlib>
using namespace metal;

// ---------------------------------------------------------------- DoRARowSqNorm

inline void dora_store_row_sum(
    float acc, device float* c, uint row, uint lid, uint lane, uint sg,
    threadgroup float* partial) {
  using namespace mlx_tuner_dora;
  acc = simd_sum(acc);
  if (lane == 0) {
    partial[sg] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    acc = simd_sum(lane < ROW_THREADS / 32 ? partial[lane] : 0.0f);
    if (lane == 0) {
      c[row] = acc;
    }
  }
}

template <typename T>
[[kernel]] void dora_row_sq_dense(
    device const T* w [[buffer(0)]],
    device float* c [[buffer(1)]],
    constant int& in [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  threadgroup float partial[ROW_THREADS / 32];
  device const T* wr = w + size_t(row) * in;
  float acc = 0.0f;
  for (int j = lid; j < in; j += ROW_THREADS) {
    float v = float(wr[j]);
    acc += v * v;
  }
  dora_store_row_sum(acc, c, row, lid, lane, sg, partial);
}

template <typename S, int BITS>
[[kernel]] void dora_row_sq_quant(
    device const uint8_t* q [[buffer(0)]],
    device const S* scales [[buffer(1)]],
    device const S* biases [[buffer(2)]],
    device float* c [[buffer(3)]],
    constant int& in [[buffer(4)]],
    constant int& group_size [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  threadgroup float partial[ROW_THREADS / 32];
  device const uint8_t* qr = q + size_t(row) * (size_t(in) * BITS / 8);
  device const S* sr = scales + size_t(row) * (in / group_size);
  device const S* br = biases + size_t(row) * (in / group_size);
  float acc = 0.0f;
  for (int j = lid; j < in; j += ROW_THREADS) {
    int bit = j * BITS;
    uint v = qr[bit >> 3];
    if ((bit & 7) + BITS > 8) {
      v |= uint(qr[(bit >> 3) + 1]) << 8;
    }
    float code = float((v >> (bit & 7)) & ((1u << BITS) - 1));
    float wv = float(sr[j / group_size]) * code + float(br[j / group_size]);
    acc += wv * wv;
  }
  dora_store_row_sum(acc, c, row, lid, lane, sg, partial);
}

// ---------------------------------------------------------------- DoRAInvNorm

// g[k r + l] = sum_j A[j,k] A[j,l] for the row k of this threadgroup: a thread per row j of
// A at a time (adjacent threads read adjacent rows), r sums each; then simd_sum per l and
// the simdgroups' sums added in order by lanes l of the first simdgroup.
[[kernel]] void dora_gram(
    device const float* a [[buffer(0)]],
    device float* g [[buffer(1)]],
    constant int& rows [[buffer(2)]],
    constant int& r [[buffer(3)]],
    uint k [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  threadgroup float partial[GRAM_THREADS / 32][MAX_RANK];
  float acc[MAX_RANK];
  for (int l = 0; l < r; ++l) {
    acc[l] = 0.0f;
  }
  for (int j = lid; j < rows; j += GRAM_THREADS) {
    device const float* aj = a + size_t(j) * r;
    float ak = aj[k];
    for (int l = 0; l < r; ++l) {
      acc[l] += ak * aj[l];
    }
  }
  for (int l = 0; l < r; ++l) {
    float v = simd_sum(acc[l]);
    if (lane == 0) {
      partial[sg][l] = v;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (int(lid) < r) {
    float t = 0.0f;
    for (int w = 0; w < GRAM_THREADS / 32; ++w) {
      t += partial[w][lid];
    }
    g[k * r + lid] = t;
  }
}

// inv_n[i] for a column i per thread; G (from dora_gram) staged in threadgroup memory.
template <typename T>
[[kernel]] void dora_inv_norm(
    device const T* p [[buffer(0)]],
    device const float* b [[buffer(1)]],
    device const float* gram [[buffer(2)]],
    device const float* c [[buffer(3)]],
    device float* inv_n [[buffer(4)]],
    constant int& out [[buffer(5)]],
    constant int& r [[buffer(6)]],
    constant float& s [[buffer(7)]],
    constant int& p_transposed [[buffer(8)]],
    uint tg [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  threadgroup float g[MAX_RANK * MAX_RANK];
  for (int e = lid; e < r * r; e += NORM_THREADS) {
    g[e] = gram[e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  int i = tg * NORM_THREADS + lid;
  if (i >= out) {
    return;
  }
  float bc[MAX_RANK];
  float cross = 0.0f;
  for (int k = 0; k < r; ++k) {
    bc[k] = b[size_t(k) * out + i];
    float pk = float(p_transposed ? p[size_t(k) * out + i] : p[size_t(i) * r + k]);
    cross += bc[k] * pk;
  }
  float quad = 0.0f;
  for (int k = 0; k < r; ++k) {
    float t = 0.0f;
    for (int l = 0; l < r; ++l) {
      t += g[k * r + l] * bc[l];
    }
    quad += bc[k] * t;
  }
  float n2 = c[i] + 2.0f * s * cross + s * s * quad;
  inv_n[i] = 1.0f / sqrt(max(n2, 0.0f));
}

// ---------------------------------------------------------------- DoRAScale

// y[i, j] = z[i, j] sv[j] (+ bias[j]) for the column j of this thread over the
// threadgroup's SCALE_ROWS rows. The product is rounded to float32 first (its own
// statement: no fused multiply-add), then the bias added, then one rounding to T.
template <typename T, bool BIAS>
[[kernel]] void dora_scale(
    device const T* z [[buffer(0)]],
    device const float* sv [[buffer(1)]],
    device const T* bias [[buffer(2)]],
    device T* y [[buffer(3)]],
    constant int& rows [[buffer(4)]],
    constant int& cols [[buffer(5)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  int j = tg.x * SCALE_COLS + lid;
  if (j >= cols) {
    return;
  }
  float s = sv[j];
  float bj = BIAS ? float(bias[j]) : 0.0f;
  int i1 = min(rows, int(tg.y + 1) * SCALE_ROWS);
  for (int i = tg.y * SCALE_ROWS; i < i1; ++i) {
    size_t o = size_t(i) * cols + j;
    float v = float(z[o]) * s;
    if (BIAS) {
      v = v + bj;
    }
    y[o] = static_cast<T>(v);
  }
}

// One tile: rows [r0, r1) (the grid's y-th share of the rows) x columns [c0, c0 + VJP_TX),
// a column per lane, VJP_TY thread rows. Writes dz = dy * sv (want_dz) and the tile's
// column sums of dy * z (want_sv; z is read only then) and of dy (want_bias) into row
// tg.y of the (row tiles x cols) float32 partials. Buffers of unwanted outputs are unused.
template <typename T>
[[kernel]] void dora_scale_vjp(
    device const T* dy [[buffer(0)]],
    device const float* sv [[buffer(1)]],
    device const T* z [[buffer(2)]],
    device T* dz [[buffer(3)]],
    device float* part_sv [[buffer(4)]],
    device float* part_b [[buffer(5)]],
    constant int& rows [[buffer(6)]],
    constant int& cols [[buffer(7)]],
    constant int& want_dz [[buffer(8)]],
    constant int& want_sv [[buffer(9)]],
    constant int& want_bias [[buffer(10)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 tiles [[threadgroups_per_grid]],
    uint2 tid [[thread_position_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  threadgroup float red[2][VJP_TY][VJP_TX];
  int j = tg.x * VJP_TX + tid.x;
  int per_tile = (rows + int(tiles.y) - 1) / int(tiles.y);
  int r0 = tg.y * per_tile;
  int r1 = min(rows, r0 + per_tile);
  float acc_sv = 0.0f, acc_b = 0.0f;
  if (j < cols) {
    float s = sv[j];
    for (int i = r0 + tid.y; i < r1; i += VJP_TY) {
      size_t o = size_t(i) * cols + j;
      float g = float(dy[o]);
      if (want_sv) {
        acc_sv += g * float(z[o]);
      }
      acc_b += g;
      if (want_dz) {
        dz[o] = static_cast<T>(g * s);
      }
    }
  }
  red[0][tid.y][tid.x] = acc_sv;
  red[1][tid.y][tid.x] = acc_b;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid.y == 0 && j < cols) {
    float a = 0.0f, b = 0.0f;
    for (int t = 0; t < VJP_TY; ++t) {
      a += red[0][t][tid.x];
      b += red[1][t][tid.x];
    }
    size_t o = size_t(tg.y) * cols + j;
    if (want_sv) {
      part_sv[o] = a;
    }
    if (want_bias) {
      part_b[o] = b;
    }
  }
}

// dsv[j] / dbias[j] = the row_tiles partial rows of column j added in order (zeros for an
// empty batch, row_tiles = 0). Buffers of unwanted outputs are unused.
template <typename T>
[[kernel]] void dora_scale_colsum(
    device const float* part_sv [[buffer(0)]],
    device const float* part_b [[buffer(1)]],
    device float* dsv [[buffer(2)]],
    device T* dbias [[buffer(3)]],
    constant int& row_tiles [[buffer(4)]],
    constant int& cols [[buffer(5)]],
    constant int& want_sv [[buffer(6)]],
    constant int& want_bias [[buffer(7)]],
    uint tg [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]]) {
  using namespace mlx_tuner_dora;
  int j = tg * COLSUM_THREADS + lid;
  if (j >= cols) {
    return;
  }
  if (want_sv) {
    float a = 0.0f;
    for (int t = 0; t < row_tiles; ++t) {
      a += part_sv[size_t(t) * cols + j];
    }
    dsv[j] = a;
  }
  if (want_bias) {
    float b = 0.0f;
    for (int t = 0; t < row_tiles; ++t) {
      b += part_b[size_t(t) * cols + j];
    }
    dbias[j] = static_cast<T>(b);
  }
}
#endif // MLX_TUNER_DORA_PARAMS_ONLY
