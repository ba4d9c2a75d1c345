// Metal kernels of QLoRA (maths in csrc/ops/qlora.h; same structure as the CUDA ones).
//
// qlora_gemm: out = X · op(W) + alpha L·R + bias, W dequantized a 32x32 tile at a time
//   into threadgroup memory (never whole), simdgroup_matrix 8x8 MMAs accumulating in
//   float. FWD: op(W) = Wᵀ, W (n_out, kred), L·R = xa·B. BWD (dx): op(W) = W,
//   W (kred, n_out), L·R = g·Aᵀ. R[q, j] = lora_r[q * rs_q + j * rs_j].
// lora_skinny: out[i, q] = alpha Σ_t P[i, t] Q[t, q] with strides: the rank-r products.
// Packed layout (csrc/common/quant.h): each W row is a little-endian bit stream; 8 codes
// fill exactly BITS bytes. Tile and threadgroup sizes must match qlora_*_launch in
// csrc/ops/qlora.cpp.
#pragma once

#include <metal_stdlib>
using namespace metal;

#define QL_BM 32
#define QL_BN 32
#define QL_BK 32
#define QL_RC 16
#define QL_THREADS 128 // 4 simdgroups, 2 x 2, each a 16 x 16 block of 8 x 8 tiles

template <int BITS>
inline ulong ql_load8(device const uint8_t* p) {
  ulong v = 0;
  for (int i = 0; i < BITS; ++i) {
    v |= ulong(p[i]) << (8 * i);
  }
  return v;
}

// tile[rr * LD + cc] = dequant(W)[r0 + rr, c0 + cc] for an R x C tile, 0 outside W.
template <typename T, int BITS, int R, int C, int LD>
inline void ql_dequant_tile(threadgroup T* tile, device const uint8_t* w,
                            device const T* scales, device const T* biases, int rows,
                            int cols, int group_size, int r0, int c0, uint tid) {
  const long row_bytes = long(cols) * BITS / 8;
  const int groups = cols / group_size;
  for (int chunk = tid; chunk < R * C / 8; chunk += QL_THREADS) {
    int rr = chunk / (C / 8), cc = (chunk % (C / 8)) * 8;
    int row = r0 + rr, col = c0 + cc;
    if (row < rows && col < cols) {
      ulong v = ql_load8<BITS>(w + row * row_bytes + long(col) * BITS / 8);
      float s = float(scales[long(row) * groups + col / group_size]);
      float b = float(biases[long(row) * groups + col / group_size]);
      for (int i = 0; i < 8; ++i) {
        tile[rr * LD + cc + i] = T(s * float((v >> (i * BITS)) & ((1u << BITS) - 1)) + b);
      }
    } else {
      for (int i = 0; i < 8; ++i) {
        tile[rr * LD + cc + i] = T(0);
      }
    }
  }
}

template <typename T, int BITS, bool FWD>
[[kernel]] void qlora_gemm(
    device const T* x [[buffer(0)]],
    device const uint8_t* w [[buffer(1)]],
    device const T* scales [[buffer(2)]],
    device const T* biases [[buffer(3)]],
    device const float* lora_l [[buffer(4)]],
    device const float* lora_r [[buffer(5)]],
    device const T* bias [[buffer(6)]],
    device T* out [[buffer(7)]],
    constant int& m [[buffer(8)]],
    constant int& n_out [[buffer(9)]],
    constant int& kred [[buffer(10)]],
    constant int& group_size [[buffer(11)]],
    constant int& r [[buffer(12)]],
    constant int& rs_q [[buffer(13)]],
    constant int& rs_j [[buffer(14)]],
    constant float& alpha [[buffer(15)]],
    constant int& use_lora [[buffer(16)]],
    constant int& use_bias [[buffer(17)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup T xs[QL_BM * QL_BK];
  threadgroup T ws[QL_BN * QL_BK]; // FWD: [j][t]; else [t][j]
  threadgroup float cs[QL_BM * QL_BN];
  threadgroup float ls[QL_BM * QL_RC];
  threadgroup float rsm[QL_RC * QL_BN];
  const int m0 = tg.y * QL_BM, j0 = tg.x * QL_BN;
  const int wrows = FWD ? n_out : kred, wcols = FWD ? kred : n_out;
  const int sm = sg / 2, sn = sg % 2;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (int t0 = 0; t0 < kred; t0 += QL_BK) {
    for (int e = tid; e < QL_BM * QL_BK; e += QL_THREADS) {
      int rr = e / QL_BK, cc = e % QL_BK, row = m0 + rr, col = t0 + cc;
      xs[e] = (row < m && col < kred) ? x[long(row) * kred + col] : T(0);
    }
    if (FWD) {
      ql_dequant_tile<T, BITS, QL_BN, QL_BK, QL_BK>(ws, w, scales, biases, wrows, wcols,
                                                   group_size, j0, t0, tid);
    } else {
      ql_dequant_tile<T, BITS, QL_BK, QL_BN, QL_BN>(ws, w, scales, biases, wrows, wcols,
                                                   group_size, t0, j0, tid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < QL_BK; kk += 8) {
      simdgroup_matrix<T, 8, 8> a[2], b[2];
      for (int i = 0; i < 2; ++i) {
        simdgroup_load(a[i], xs, QL_BK, ulong2(kk, sm * 16 + i * 8));
        if (FWD) {
          simdgroup_load(b[i], ws, QL_BK, ulong2(kk, sn * 16 + i * 8), true);
        } else {
          simdgroup_load(b[i], ws, QL_BN, ulong2(sn * 16 + i * 8, kk));
        }
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j)
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // tiles are overwritten next
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      simdgroup_store(acc[i][j], cs, QL_BN, ulong2(sn * 16 + j * 8, sm * 16 + i * 8));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int rows_here = min(QL_BM, m - m0), cols_here = min(QL_BN, n_out - j0);
  if (use_lora != 0) {
    for (int q0 = 0; q0 < r; q0 += QL_RC) {
      for (int e = tid; e < QL_BM * QL_RC; e += QL_THREADS) {
        int rr = e / QL_RC, q = q0 + e % QL_RC;
        ls[e] = (rr < rows_here && q < r) ? lora_l[long(m0 + rr) * r + q] : 0.0f;
      }
      for (int e = tid; e < QL_RC * QL_BN; e += QL_THREADS) {
        int q = q0 + e / QL_BN, j = e % QL_BN;
        rsm[e] = (q < r && j < cols_here) ? alpha * lora_r[long(q) * rs_q + long(j0 + j) * rs_j]
                                          : 0.0f;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (int e = tid; e < QL_BM * QL_BN; e += QL_THREADS) {
        int rr = e / QL_BN, j = e % QL_BN;
        float v = 0.0f;
        for (int q = 0; q < QL_RC; ++q) {
          v += ls[rr * QL_RC + q] * rsm[q * QL_BN + j];
        }
        cs[e] += v;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup); // ls / rsm are refilled next
    }
  }
  for (int e = tid; e < QL_BM * QL_BN; e += QL_THREADS) {
    int rr = e / QL_BN, j = e % QL_BN;
    if (rr < rows_here && j < cols_here) {
      float v = cs[e] + (use_bias != 0 ? float(bias[j0 + j]) : 0.0f);
      out[long(m0 + rr) * n_out + j0 + j] = T(v);
    }
  }
}

#define QL_SI 64
#define QL_SQ 16
#define QL_ST 32

// out[i * os_i + q * os_q] = alpha Σ_t P[i * ps_i + t * ps_t] Q[t * qs_t + q * qs_q].
template <typename P, typename O>
[[kernel]] void qlora_skinny(
    device const P* p [[buffer(0)]],
    device const float* qm [[buffer(1)]],
    device O* out [[buffer(2)]],
    constant long& ps_i [[buffer(3)]],
    constant long& ps_t [[buffer(4)]],
    constant long& qs_t [[buffer(5)]],
    constant long& qs_q [[buffer(6)]],
    constant long& os_i [[buffer(7)]],
    constant long& os_q [[buffer(8)]],
    constant int& ni [[buffer(9)]],
    constant int& nq [[buffer(10)]],
    constant int& nt [[buffer(11)]],
    constant float& alpha [[buffer(12)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float pt[QL_SI * (QL_ST + 1)];
  threadgroup float qt[QL_ST * QL_SQ];
  const int i0 = tg.x * QL_SI, q0 = tg.y * QL_SQ;
  const int il = tid % QL_SI, qh = tid / QL_SI; // 8 q per thread
  float acc[QL_SQ / 2];
  for (int c = 0; c < QL_SQ / 2; ++c) {
    acc[c] = 0.0f;
  }
  for (int t0 = 0; t0 < nt; t0 += QL_ST) {
    for (int e = tid; e < QL_SI * QL_ST; e += QL_THREADS) {
      int ii = e % QL_SI, tt = e / QL_SI, i = i0 + ii, t = t0 + tt;
      pt[ii * (QL_ST + 1) + tt] = (i < ni && t < nt) ? float(p[i * ps_i + t * ps_t]) : 0.0f;
    }
    for (int e = tid; e < QL_ST * QL_SQ; e += QL_THREADS) {
      int tt = e / QL_SQ, qq = e % QL_SQ, t = t0 + tt, q = q0 + qq;
      qt[e] = (t < nt && q < nq) ? qm[t * qs_t + q * qs_q] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int tt = 0; tt < QL_ST; ++tt) {
      float a = pt[il * (QL_ST + 1) + tt];
      for (int c = 0; c < QL_SQ / 2; ++c) {
        acc[c] += a * qt[tt * QL_SQ + qh * (QL_SQ / 2) + c];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  int i = i0 + il;
  if (i < ni) {
    for (int c = 0; c < QL_SQ / 2; ++c) {
      int q = q0 + qh * (QL_SQ / 2) + c;
      if (q < nq) {
        out[i * os_i + q * os_q] = O(alpha * acc[c]);
      }
    }
  }
}
