// Metal kernels of the fused LoRA linear (maths in csrc/ops/lora.h):
//   lora_xa:     xa = x_d A                            (N, r) float32, saved for the backward
//   lora_linear: y  = x W^T + s xa B (+ bias)          one GEMM whose main loop runs over
//                two operand pairs, (x, W^T) then (s xa, B), into the same simdgroup_matrix
//                accumulators: the rank-r term never leaves the registers.
// Backward:
//   lora_g:      g  = dy B^T                           (N, r) float32
//   lora_dx:     dx = dy W + s g A^T                   the same two-pair GEMM, (dy, W)
//                then (s g, A^T); dy W alone when x_dropped is given, s g A^T alone for
//                dx_d
//   lora_da:     dA = s x_d^T g                        sums over the N rows, a thread per
//   lora_db:     dB = s xa^T dy                        element, in the LoRA params' dtype
// Tiles are staged in threadgroup memory as float (operands of mixed dtype: T activations,
// float32 xa, g, LoRA parameters) and multiplied by 8x8 simdgroup matrices in float.
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
constexpr int G_ROWS = 4; // lora_g: rows of g per threadgroup (one per simdgroup)
constexpr int G_COLS = 8; // lora_g: columns of g summed per pass over a row of dy
constexpr int PG_THREADS = 128; // lora_da / lora_db: threads per threadgroup
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

// One operand pair of the GEMM: acc += (mul L) op(R) over k_total, for the BM x BN tile
// (r0, c0). L is row-major (rows, k_total); op(R) as stage_cols reads it.
template <typename SL, typename SR>
inline void accumulate_pair(thread simdgroup_matrix<float, 8, 8> (&acc)[2][2],
                            threadgroup float* as, threadgroup float* bs,
                            const device SL* l, int rows, int k_total, float mul,
                            const device SR* rm, bool transposed, int cols_total,
                            int r0, int c0, uint t, int sm, int sn) {
  using namespace mlx_tuner_lora;
  for (int k0 = 0; k0 < k_total; k0 += BK) {
    stage_rows(as, l, rows, k_total, r0, k0, mul, t);
    stage_cols(bs, rm, transposed, k_total, cols_total, k0, c0, t);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mma_tile(acc, as, bs, sm, sn);
    threadgroup_barrier(mem_flags::mem_threadgroup); // before the next stage overwrites
  }
}

// Writes the accumulated tile (r0, c0) (+ bias[j]) into the row-major (rows, cols) `out`,
// through `cs` (BM x BN threadgroup floats).
template <typename T, bool HAS_BIAS>
inline void store_tile(thread simdgroup_matrix<float, 8, 8> (&acc)[2][2],
                       threadgroup float* cs, device T* out, const device T* bias,
                       int rows, int cols, int r0, int c0, uint t, int sm, int sn) {
  using namespace mlx_tuner_lora;
  for (int u = 0; u < 2; ++u) {
    for (int v = 0; v < 2; ++v) {
      simdgroup_store(acc[u][v], cs + (sm * 16 + u * 8) * BN + sn * 16 + v * 8, BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(t); e < BM * BN; e += THREADS) {
    int i = r0 + e / BN, j = c0 + e % BN;
    if (i < rows && j < cols) {
      float v = cs[e];
      if (HAS_BIAS) {
        v += float(bias[j]);
      }
      out[long(i) * cols + j] = T(v);
    }
  }
}

// The BM x BN tile tg of out (rows x cols) = l1 op(r1) + mul2 l2 op(r2) (+ bias), both
// pairs into the same accumulators; a pair whose reduction length (k1, k2) is 0 is never
// read. as / bs / cs: the kernel's threadgroup arrays (BM x BK, BK x BN, BM x BN).
template <typename T, bool HAS_BIAS, typename L1, typename R1, typename L2, typename R2>
inline void two_pair_tile(threadgroup float* as, threadgroup float* bs, threadgroup float* cs,
                          const device L1* l1, int k1, const device R1* r1, bool t1,
                          const device L2* l2, int k2, float mul2, const device R2* r2, bool t2,
                          const device T* bias, device T* out, int rows, int cols, uint3 tg,
                          uint t, uint sg) {
  using namespace mlx_tuner_lora;
  int r0 = int(tg.y) * BM, c0 = int(tg.x) * BN;
  int sm = int(sg) / 2, sn = int(sg) % 2;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int u = 0; u < 2; ++u) {
    for (int v = 0; v < 2; ++v) {
      acc[u][v] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }
  accumulate_pair(acc, as, bs, l1, rows, k1, 1.0f, r1, t1, cols, r0, c0, t, sm, sn);
  accumulate_pair(acc, as, bs, l2, rows, k2, mul2, r2, t2, cols, r0, c0, t, sm, sn);
  store_tile<T, HAS_BIAS>(acc, cs, out, bias, rows, cols, r0, c0, t, sm, sn);
}

// y = x W^T + s xa B (+ bias). Grid: (ceil(out / BN), ceil(N / BM)) threadgroups of
// THREADS threads (metal_launch_lora_linear on the host computes it).
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
  // (x, W^T) over in_dims, then (s xa, B) over the rank.
  two_pair_tile<T, HAS_BIAS>(as, bs, cs, x, in_dims, w, true, xa, r, scale, b, false, bias, y,
                             n, out_dims, tg, t, sg);
}

// g[i, j] = sum_k dy[i, k] B[j, k]: a simdgroup per row i, its lanes striding over k
// (both reads contiguous), G_COLS columns of g per pass over the row, then a simd_sum
// per column.
// Grid: (1, ceil(N / G_ROWS)) threadgroups of 32 G_ROWS threads.
template <typename T, typename U>
[[kernel]] void lora_g(
    const device T* dy [[buffer(0)]],
    const device U* b [[buffer(1)]],
    device float* g [[buffer(2)]],
    constant int& n [[buffer(3)]],
    constant int& out_dims [[buffer(4)]],
    constant int& r [[buffer(5)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  using namespace mlx_tuner_lora;
  int i = int(tg.y) * G_ROWS + int(sg);
  if (i >= n) { // the whole simdgroup leaves: no simd_sum below runs short of lanes
    return;
  }
  const device T* row = dy + long(i) * out_dims;
  for (int j0 = 0; j0 < r; j0 += G_COLS) {
    int m = min(G_COLS, r - j0);
    float acc[G_COLS];
    for (int jj = 0; jj < G_COLS; ++jj) {
      acc[jj] = 0.0f;
    }
    for (int k = int(lane); k < out_dims; k += 32) {
      float d = float(row[k]);
      for (int jj = 0; jj < G_COLS; ++jj) { // constant bounds: acc stays in registers
        if (jj < m) {
          acc[jj] += d * float(b[long(j0 + jj) * out_dims + k]);
        }
      }
    }
    for (int jj = 0; jj < G_COLS; ++jj) {
      if (jj < m) { // the same for every lane: simd_sum sees the whole simdgroup
        float v = simd_sum(acc[jj]);
        if (int(lane) == jj) {
          g[long(i) * r + j0 + jj] = v;
        }
      }
    }
  }
}

// dx = dy W + s g A^T: the forward's two-pair GEMM with (dy, W) over out_dims, then
// (s g, A^T) over the rank. BASE && !LORA: dy W alone (x_dropped given: the LoRA term
// goes to dx_d); !BASE && LORA: dx_d = s g A^T. Unused operands are never read.
// Grid: (ceil(in / BN), ceil(N / BM)) threadgroups of THREADS threads.
template <typename T, typename U, bool BASE, bool LORA>
[[kernel]] void lora_dx(
    const device T* dy [[buffer(0)]],
    const device T* w [[buffer(1)]],
    const device float* g [[buffer(2)]],
    const device U* a [[buffer(3)]],
    device T* dx [[buffer(4)]],
    constant int& n [[buffer(5)]],
    constant int& in_dims [[buffer(6)]],
    constant int& out_dims [[buffer(7)]],
    constant int& r [[buffer(8)]],
    constant float& scale [[buffer(9)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint t [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  using namespace mlx_tuner_lora;
  threadgroup float as[BM * BK];
  threadgroup float bs[BK * BN];
  threadgroup float cs[BM * BN];
  // W is (out, in) row-major: op(W) = W itself; A is (in, r): op(A) = A^T.
  two_pair_tile<T, false>(as, bs, cs, dy, BASE ? out_dims : 0, w, false, g, LORA ? r : 0, scale,
                          a, true, dy, dx, n, in_dims, tg, t, sg);
}

// out[p, q] = s sum_i L[i, p] R[i, q] over the N rows (zeros when N = 0), accumulated in
// float: a thread per output element, adjacent threads on adjacent q (contiguous reads of
// R's rows and writes of out's). Any grid covering (q, p) with its threads.
template <typename TL, typename TR, typename U>
inline void param_grad(const device TL* l, const device TR* rm, device U* out, int n,
                       int p_dims, int q_dims, float scale, uint3 pos) {
  int q = int(pos.x), p = int(pos.y);
  if (p >= p_dims || q >= q_dims) {
    return;
  }
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) {
    acc += float(l[long(i) * p_dims + p]) * float(rm[long(i) * q_dims + q]);
  }
  out[long(p) * q_dims + q] = U(scale * acc);
}

// dA = s x_d^T g: (in, r) in A's dtype U.
template <typename T, typename U>
[[kernel]] void lora_da(
    const device T* xd [[buffer(0)]],
    const device float* g [[buffer(1)]],
    device U* da [[buffer(2)]],
    constant int& n [[buffer(3)]],
    constant int& in_dims [[buffer(4)]],
    constant int& r [[buffer(5)]],
    constant float& scale [[buffer(6)]],
    uint3 pos [[thread_position_in_grid]]) {
  param_grad(xd, g, da, n, in_dims, r, scale, pos);
}

// dB = s xa^T dy: (r, out) in B's dtype U.
template <typename T, typename U>
[[kernel]] void lora_db(
    const device float* xa [[buffer(0)]],
    const device T* dy [[buffer(1)]],
    device U* db [[buffer(2)]],
    constant int& n [[buffer(3)]],
    constant int& r [[buffer(4)]],
    constant int& out_dims [[buffer(5)]],
    constant float& scale [[buffer(6)]],
    uint3 pos [[thread_position_in_grid]]) {
  param_grad(xa, dy, db, n, r, out_dims, scale, pos);
}
#endif // MLX_TUNER_LORA_PARAMS_ONLY
