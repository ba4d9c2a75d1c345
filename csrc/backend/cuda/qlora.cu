// CUDA kernels of QLoRA (maths in ops/qlora.h).
//
// qlora_gemm: C = X · op(W) (+ alpha L·R + bias), W dequantized tile by tile into shared
//   memory (never whole), tensor cores (wmma, fp32 accumulate) for bf16/f16, fp32 FMA
//   for float32. Forward: op(W) = Wᵀ (reduce over in_dims), L·R = xa·B. Backward dx:
//   op(W) = W (reduce over out_dims), L·R = g·Aᵀ. The LoRA pair is added in the epilogue
//   in fp32 from shared-memory tiles of L and R.
// lora_skinny: the rank-r products xa = x_d A, g = s dy Bᵀ, dA = x_dᵀ g, dB = s xaᵀ dy,
//   dx_d = g Aᵀ, one generic strided kernel (fp32 accumulate).
// A first, correct version: 64x64x32 tiles, no cp.async pipeline yet (GPU.md: measured
// on the H200 only).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <stdexcept>
#include <type_traits>

#include "backend/cuda/common.cuh"
#include "ops/qlora.h"

namespace mlx_tuner {

namespace {

using namespace nvcuda;

constexpr int BM = 64, BN = 64, BK = 32, NT = 128; // block tile, 4 warps (2 x 2)
constexpr int RC = 16; // rank chunk of the LoRA epilogue

template <typename T>
__device__ inline float to_f(T v) {
  return static_cast<float>(v);
}
template <>
__device__ inline float to_f(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ inline float to_f(__half v) {
  return __half2float(v);
}
template <typename T>
__device__ inline T from_f(float v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(v);
  } else {
    return v;
  }
}

// 8 consecutive codes starting at an element index that is a multiple of 8: BITS bytes
// of the row's little-endian bit stream (csrc/common/quant.h).
template <int BITS>
__device__ inline uint64_t load8(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return *reinterpret_cast<const uint64_t*>(p);
  } else if constexpr (BITS == 4) {
    return *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (BITS == 2) {
    return *reinterpret_cast<const uint16_t*>(p);
  } else {
    uint64_t v = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      v |= uint64_t(p[i]) << (8 * i);
    }
    return v;
  }
}

// Dequantizes W[r0 .. r0+R, c0 .. c0+C) into smem tile[R][LD] (zeros outside W).
template <typename T, int BITS, int R, int C, int LD>
__device__ inline void dequant_tile(
    T* tile, const uint8_t* w, const T* scales, const T* biases, int rows, int cols,
    int group_size, int r0, int c0) {
  const long row_bytes = long(cols) * BITS / 8;
  const int groups = cols / group_size;
  for (int chunk = threadIdx.x; chunk < R * C / 8; chunk += NT) {
    int rr = chunk / (C / 8), cc = (chunk % (C / 8)) * 8;
    int row = r0 + rr, col = c0 + cc;
    T* o = tile + rr * LD + cc;
    if (row < rows && col < cols) {
      uint64_t v = load8<BITS>(w + row * row_bytes + long(col) * BITS / 8);
      float s = to_f(scales[long(row) * groups + col / group_size]);
      float b = to_f(biases[long(row) * groups + col / group_size]);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        o[i] = from_f<T>(s * float((v >> (i * BITS)) & ((1u << BITS) - 1)) + b);
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        o[i] = from_f<T>(0.0f);
      }
    }
  }
}

// out (m x n_out) = X (m x kred) · op(W) + alpha · L (m x r) · R (r x n_out) + bias.
// FWD: op(W)[t, j] = W[j, t], W is (n_out, kred). Else op(W)[t, j] = W[t, j], W (kred, n_out).
// R[q, j] = lora_r[q * rs_q + j * rs_j]. L may be null (no LoRA term).
template <typename T, int BITS, bool FWD>
__global__ void __launch_bounds__(NT) qlora_gemm(
    const T* x, const uint8_t* w, const T* scales, const T* biases, int m, int n_out,
    int kred, int group_size, const float* lora_l, const float* lora_r, int r, long rs_q,
    long rs_j, float alpha, const T* bias, T* out) {
  constexpr int XLD = BK + 8; // pads keep wmma ldm a multiple of 16 bytes
  constexpr int WLD = FWD ? BK + 8 : BN + 8;
  constexpr int WSZ = FWD ? BN * WLD : BK * WLD;
  constexpr int CLD = BN + 4;
  constexpr int TILES = (BM * XLD + WSZ) * sizeof(T);
  constexpr int EPI = (BM * CLD + BM * RC + RC * BN) * sizeof(float);
  __shared__ __align__(32) unsigned char smem[TILES > EPI ? TILES : EPI];
  T* xs = reinterpret_cast<T*>(smem);
  T* ws = xs + BM * XLD;
  float* cs = reinterpret_cast<float*>(smem);
  float* ls = cs + BM * CLD;
  float* rsm = ls + BM * RC;

  const int m0 = blockIdx.y * BM, j0 = blockIdx.x * BN;
  const int wrows = FWD ? n_out : kred, wcols = FWD ? kred : n_out;
  constexpr bool kTensor = !std::is_same_v<T, float>;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  AccFrag acc[2][2];
  float facc[4][8] = {};
  if constexpr (kTensor) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::fill_fragment(acc[i][j], 0.0f);
  }
  for (int t0 = 0; t0 < kred; t0 += BK) {
    for (int e = threadIdx.x; e < BM * BK; e += NT) { // X tile, zero-filled at the edges
      int rr = e / BK, cc = e % BK, row = m0 + rr, col = t0 + cc;
      xs[rr * XLD + cc] = (row < m && col < kred) ? x[long(row) * kred + col] : from_f<T>(0.f);
    }
    if constexpr (FWD) {
      dequant_tile<T, BITS, BN, BK, WLD>(ws, w, scales, biases, wrows, wcols, group_size, j0, t0);
    } else {
      dequant_tile<T, BITS, BK, BN, WLD>(ws, w, scales, biases, wrows, wcols, group_size, t0, j0);
    }
    __syncthreads();
    if constexpr (kTensor) {
      using Tw = std::conditional_t<std::is_same_v<T, __half>, half, __nv_bfloat16>;
      using BLayout = std::conditional_t<FWD, wmma::col_major, wmma::row_major>;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, Tw, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, Tw, BLayout> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], reinterpret_cast<Tw*>(xs + (wm * 32 + i * 16) * XLD + kk), XLD);
          const T* bp = FWD ? ws + (wn * 32 + i * 16) * WLD + kk : ws + kk * WLD + wn * 32 + i * 16;
          wmma::load_matrix_sync(fb[i], reinterpret_cast<const Tw*>(bp), WLD);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    } else { // float32: 4 x 8 outputs per thread
      const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 4
      for (int t = 0; t < BK; ++t) {
        float a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_f(xs[(ty * 4 + i) * XLD + t]);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          int j = tx + 8 * c;
          b[c] = to_f(FWD ? ws[j * WLD + t] : ws[t * WLD + j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int c = 0; c < 8; ++c) facc[i][c] += a[i] * b[c];
      }
    }
    __syncthreads();
  }
  // Epilogue: accumulators -> smem (fp32), then + alpha L R + bias, converted once.
  if constexpr (kTensor) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * CLD + wn * 32 + j * 16, acc[i][j], CLD,
                                wmma::mem_row_major);
  } else {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 8; ++c) cs[(ty * 4 + i) * CLD + tx + 8 * c] = facc[i][c];
  }
  __syncthreads();
  const int rows_here = min(BM, m - m0), cols_here = min(BN, n_out - j0);
  if (lora_l != nullptr) {
    for (int q0 = 0; q0 < r; q0 += RC) {
      for (int e = threadIdx.x; e < BM * RC; e += NT) {
        int rr = e / RC, q = q0 + e % RC;
        ls[e] = (rr < rows_here && q < r) ? lora_l[long(m0 + rr) * r + q] : 0.f;
      }
      for (int e = threadIdx.x; e < RC * BN; e += NT) {
        int q = q0 + e / BN, j = e % BN;
        rsm[e] = (q < r && j < cols_here) ? alpha * lora_r[q * rs_q + (j0 + j) * rs_j] : 0.f;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BN; e += NT) {
        int rr = e / BN, j = e % BN;
        float v = 0.f;
#pragma unroll
        for (int q = 0; q < RC; ++q) v += ls[rr * RC + q] * rsm[q * BN + j];
        cs[rr * CLD + j] += v;
      }
      __syncthreads();
    }
  }
  for (int e = threadIdx.x; e < BM * BN; e += NT) {
    int rr = e / BN, j = e % BN;
    if (rr < rows_here && j < cols_here) {
      float v = cs[rr * CLD + j] + (bias ? to_f(bias[j0 + j]) : 0.f);
      out[long(m0 + rr) * n_out + j0 + j] = from_f<T>(v);
    }
  }
}

// out[i * os_i + q * os_q] = alpha Σ_t P[i * ps_i + t * ps_t] Q[t * qs_t + q * qs_q].
constexpr int SI = 64, SQ = 16, ST = 32;
template <typename P, typename O>
__global__ void __launch_bounds__(NT) lora_skinny(
    const P* p, long ps_i, long ps_t, const float* qm, long qs_t, long qs_q, O* out,
    long os_i, long os_q, int ni, int nq, int nt, float alpha) {
  __shared__ float pt[SI][ST + 1];
  __shared__ float qt[ST][SQ];
  const int i0 = blockIdx.x * SI, q0 = blockIdx.y * SQ;
  const int il = threadIdx.x % SI, qh = threadIdx.x / SI; // 8 q per thread
  float acc[SQ / 2] = {};
  for (int t0 = 0; t0 < nt; t0 += ST) {
    for (int e = threadIdx.x; e < SI * ST; e += NT) {
      int ii = e % SI, tt = e / SI, i = i0 + ii, t = t0 + tt;
      pt[ii][tt] = (i < ni && t < nt) ? to_f(p[i * ps_i + t * ps_t]) : 0.f;
    }
    for (int e = threadIdx.x; e < ST * SQ; e += NT) {
      int tt = e / SQ, qq = e % SQ, t = t0 + tt, q = q0 + qq;
      qt[tt][qq] = (t < nt && q < nq) ? qm[t * qs_t + q * qs_q] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int tt = 0; tt < ST; ++tt) {
      float a = pt[il][tt];
#pragma unroll
      for (int c = 0; c < SQ / 2; ++c) acc[c] += a * qt[tt][qh * (SQ / 2) + c];
    }
    __syncthreads();
  }
  int i = i0 + il;
  if (i < ni) {
#pragma unroll
    for (int c = 0; c < SQ / 2; ++c) {
      int q = q0 + qh * (SQ / 2) + c;
      if (q < nq) out[i * os_i + q * os_q] = from_f<O>(alpha * acc[c]);
    }
  }
}

template <typename P, typename O>
void skinny(mx::cu::CommandEncoder& enc, const P* p, long ps_i, long ps_t, const float* q,
            long qs_t, long qs_q, O* out, long os_i, long os_q, int ni, int nq, int nt,
            float alpha) {
  if (ni == 0 || nq == 0) {
    return;
  }
  dim3 grid((ni + SI - 1) / SI, (nq + SQ - 1) / SQ);
  cuda::launch(enc, reinterpret_cast<const void*>(&lora_skinny<P, O>), grid, dim3(NT), 0u,
               p, ps_i, ps_t, q, qs_t, qs_q, out, os_i, os_q, ni, nq, nt, alpha);
}

template <typename T, int BITS, bool FWD>
void gemm(mx::cu::CommandEncoder& enc, const T* x, const mx::array& w, const mx::array& sc,
          const mx::array& bi, int m, int n_out, int kred, int group_size, const float* l,
          const float* rr, int r, long rs_q, long rs_j, float alpha, const T* bias, T* out) {
  if (m == 0 || n_out == 0) {
    return;
  }
  dim3 grid((n_out + BN - 1) / BN, (m + BM - 1) / BM);
  cuda::launch(enc, reinterpret_cast<const void*>(&qlora_gemm<T, BITS, FWD>), grid, dim3(NT),
               0u, x, mx::gpu_ptr<uint8_t>(w), mx::gpu_ptr<T>(sc), mx::gpu_ptr<T>(bi), m,
               n_out, kred, group_size, l, rr, r, rs_q, rs_j, alpha, bias, out);
}

template <typename F>
void dispatch_types(mx::Dtype dt, int bits, F&& f) {
  auto with_bits = [&]<typename T>() {
    switch (bits) {
      case 2: f.template operator()<T, 2>(); break;
      case 3: f.template operator()<T, 3>(); break;
      case 4: f.template operator()<T, 4>(); break;
      case 5: f.template operator()<T, 5>(); break;
      case 6: f.template operator()<T, 6>(); break;
      case 8: f.template operator()<T, 8>(); break;
      default: throw std::invalid_argument("[qlora_linear] unsupported bits");
    }
  };
  if (dt == mx::float32) {
    with_bits.template operator()<float>();
  } else if (dt == mx::float16) {
    with_bits.template operator()<__half>();
  } else {
    with_bits.template operator()<__nv_bfloat16>();
  }
}

} // namespace

void QLoRA::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& a : in) {
    enc.set_input_array(a);
  }
  for (auto& o : outs) {
    cuda::alloc_output(o, enc);
  }
  const auto &x = in[0], &w = in[1];
  const int n = w.shape(0), k = x.shape(-1), r = in[4].shape(1);
  const int m = k == 0 ? 0 : x.size() / k;
  const auto& xd = p_.has_xd ? in[6] : x;
  const mx::array* bias = p_.has_bias ? &in[p_.has_xd ? 7 : 6] : nullptr;
  const float* a = mx::gpu_ptr<float>(in[4]);
  const float* b = mx::gpu_ptr<float>(in[5]);
  float* xa = mx::gpu_ptr<float>(outs[1]);
  dispatch_types(x.dtype(), p_.bits, [&]<typename T, int BITS>() {
    skinny<T, float>(enc, mx::gpu_ptr<T>(xd), k, 1, a, r, 1, xa, r, 1, m, r, k, 1.0f);
    gemm<T, BITS, true>(enc, mx::gpu_ptr<T>(x), w, in[2], in[3], m, n, k, p_.group_size,
                        r > 0 ? xa : nullptr, b, r, n, 1, p_.scale,
                        bias ? mx::gpu_ptr<T>(*bias) : nullptr, mx::gpu_ptr<T>(outs[0]));
  });
}

void QLoRAVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& a : in) {
    enc.set_input_array(a);
  }
  for (auto& o : outs) {
    cuda::alloc_output(o, enc);
  }
  const auto &dy = in[0], &w = in[1], &xd = in[6];
  const int n = w.shape(0), k = xd.shape(-1), r = in[4].shape(1);
  const int m = k == 0 ? 0 : xd.size() / k;
  const float* a = mx::gpu_ptr<float>(in[4]);
  const float* b = mx::gpu_ptr<float>(in[5]);
  const float* xa = mx::gpu_ptr<float>(in[7]);
  int o = 0;
  mx::array* dx = g_.dx ? &outs[o++] : nullptr;
  mx::array* dxd = g_.dxd ? &outs[o++] : nullptr;
  mx::array* da = g_.da ? &outs[o++] : nullptr;
  mx::array* db = g_.db ? &outs[o++] : nullptr;
  // g = s dy Bᵀ (m x r, fp32), a temporary of this call.
  mx::array g({m, r}, mx::float32, nullptr, {});
  g.set_data(cuda::malloc_device(g.nbytes(), enc));
  enc.add_temporary(g);
  float* gp = mx::gpu_ptr<float>(g);
  dispatch_types(dy.dtype(), p_.bits, [&]<typename T, int BITS>() {
    const T* dyp = mx::gpu_ptr<T>(dy);
    skinny<T, float>(enc, dyp, n, 1, b, 1, n, gp, r, 1, m, r, n, p_.scale);
    if (da) { // dA[k, q] = Σ_m x_d[m, k] g[m, q]
      skinny<T, float>(enc, mx::gpu_ptr<T>(xd), 1, k, gp, r, 1, mx::gpu_ptr<float>(*da), r,
                       1, k, r, m, 1.0f);
    }
    if (db) { // dB[q, n] = s Σ_m dy[m, n] xa[m, q]
      skinny<T, float>(enc, dyp, 1, n, xa, r, 1, mx::gpu_ptr<float>(*db), 1, n, n, r, m,
                       p_.scale);
    }
    if (dxd) { // dx_d[m, k] = Σ_q g[m, q] A[k, q]
      skinny<float, T>(enc, gp, r, 1, a, 1, r, mx::gpu_ptr<T>(*dxd), k, 1, m, k, r, 1.0f);
    }
    if (dx) { // dy W (+ g Aᵀ), R[q, j] = A[j, q]
      gemm<T, BITS, false>(enc, dyp, w, in[2], in[3], m, k, n, p_.group_size,
                           (!p_.has_xd && r > 0) ? gp : nullptr, a, r, 1, r, 1.0f, nullptr,
                           mx::gpu_ptr<T>(*dx));
    }
  });
}

} // namespace mlx_tuner
