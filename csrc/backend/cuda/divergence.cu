// CUDA kernels of the KL / JS divergence (maths: csrc/ops/divergence.h).
//
// KL forward: one block per row, one pass: each thread keeps online (max, sum-exp) for q
// and p plus sum exp(a - max_p)(a - b), rescaled when its maximum grows; the block merges
// the partial states.
//
// JS forward: its terms need both normalizers first, so a row is read twice unless it is
// kept on chip. One cluster of C CTAs per row (C = 1 to 16; js_plan) holds the row's q and
// p in the CTAs' shared memory, each CTA a contiguous slice of 16-byte chunks, the first
// and last of which may be partial (padded with -inf, which has no mass) so that the whole
// chunks are one aligned bulk copy an input for any V and row offset. The work is in base
// 2 so that every exp and log is one MUFU instruction, and it counts instructions (the
// kernel is issue-bound): each CTA takes its slice's maximum m (pass 0, two elements an
// instruction for the half types), then sum 2^d with d = fma(x, log2e, -B), B = m log2e
// rounded (pass 1: one FFMA an exp; the rounding of B is folded back exactly, and rows
// whose m log2e would overflow take x - m first); the CTAs exchange their (m, sum) through
// distributed shared memory; each then sums its slice's terms in p's frame (js_terms:
// P' = 2^dp, Q' = 2^dq, lm = log2 of M there, three MUFU a pair), and rank 0 gathers the C
// partial sums. The half types take js_forward_keep instead (exps kept in shared memory as
// float16 between the passes: three MUFU a pair in all against five here; 2.5-8% faster at
// 8192 x 151,936 bf16 side by side, 2.21-2.37 ms; MLX_TUNER_JS_KEEP=0 takes this kernel),
// at four CTAs an SM with the last kJsRegChunks chunks a thread of each slice in its
// registers (half the clusters' CTAs a row: 2.19-2.22 against 2.27-2.33 ms side by side;
// MLX_TUNER_JS_SPLIT=0 keeps the whole slice in shared memory), loaded by straight runs
// of 16-byte loads, and every warp merging the row's normalizers itself (1.96-2.01 ms;
// twenty-fourth session, bench/results/h200-2026-12-01q).
// Both exchanges push by st.async onto the readers' own mbarriers instead of
// meeting at cluster barriers (whose release fence Nsight put at ~13% of the warps' stalls,
// the barriers at ~16%: forward 2.29-2.40 against 2.57 ms at 8192 x 151,936 bf16). d is
// clamped at about -100 so that a -inf logit weighs a finite term by ~0 (never 0 * inf); a
// NaN logit makes its sum NaN, which the row's result then takes. A row that four CTAs an
// SM cannot hold (float32 above ~110k), or a GPU before Hopper, takes the two-pass kernel
// (the KL kernel's, reading the row twice).
//
// Backward: elementwise given the saved stats, a 2-D grid of (chunks of a row, rows).
// KL, the two-pass JS and the backward load 16-byte vectors when both rows are 16-byte
// aligned (V * sizeof(T) % 16 == 0), scalars otherwise.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "backend/cuda/common.cuh"
#include "backend/cuda/dtype.cuh"
#include "backend/cuda/mbarrier.cuh"
#include "ops/divergence.h"

namespace mlx_tuner {

namespace {

namespace cu = mlx_tuner::cuda;
namespace cg = cooperative_groups;
constexpr float kInf = __builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;
constexpr int kMaxWarps = 32;

using cu::aligned16;
using cu::from_f;
using cu::to_f;

// N consecutive elements from index i of a row: one 16-byte load when VEC.
template <typename T, bool VEC>
struct Vec {
  static constexpr int N = VEC ? 16 / sizeof(T) : 1;
  // A load in two steps (load_raw, unpack_raw), so that several can be in flight before
  // any is unpacked.
  using Raw = std::conditional_t<VEC, uint4, T>;
  __device__ __forceinline__ static void load(const T* row, int64_t i, float* out) {
    unpack_raw(load_raw(row, i), out);
  }
  __device__ __forceinline__ static Raw load_raw(const T* row, int64_t i) {
    if constexpr (VEC) {
      return __ldg(reinterpret_cast<const uint4*>(row + i));
    } else {
      return row[i];
    }
  }
  __device__ __forceinline__ static void unpack_raw(Raw r, float* out) {
    if constexpr (VEC) {
      alignas(16) T v[N];
      *reinterpret_cast<uint4*>(v) = r;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        out[k] = to_f(v[k]);
      }
    } else {
      out[0] = to_f(r);
    }
  }
  __device__ __forceinline__ static void store(T* row, int64_t i, const float* in) {
    if constexpr (VEC) {
      alignas(16) T v[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        v[k] = from_f<T>(in[k]);
      }
      *reinterpret_cast<uint4*>(row + i) = *reinterpret_cast<const uint4*>(v);
    } else {
      row[i] = from_f<T>(in[0]);
    }
  }
};

constexpr float kLog2e = 1.44269504088896341f;

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float safe(float m) {
  return m == -kInf ? 0.f : m; // exp(x - safe(m)) is 0 for masked x even when m = -inf
}

// Online state of one distribution: max m, s = sum exp(x - m), t = sum exp(x - m) w.
struct Online {
  float m = -kInf, s = 0.f, t = 0.f;
  __device__ __forceinline__ void merge(float m2, float s2, float t2) {
    float mn = fmaxf(m, m2);
    float f1 = __expf(m - safe(mn)), f2 = __expf(m2 - safe(mn));
    s = s * f1 + s2 * f2;
    t = t * f1 + t2 * f2;
    m = mn;
  }
};

__device__ __forceinline__ void warp_merge(Online& o) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    float m2 = __shfl_xor_sync(0xffffffffu, o.m, d);
    float s2 = __shfl_xor_sync(0xffffffffu, o.s, d);
    float t2 = __shfl_xor_sync(0xffffffffu, o.t, d);
    o.merge(m2, s2, t2);
  }
}

// Block-wide merge; every thread gets the result. `sm` holds 3 * kMaxWarps floats and
// is used by this call only (no reuse, so no write-after-read hazard).
__device__ __forceinline__ void block_merge(Online& o, float* sm) {
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  warp_merge(o);
  if (lane == 0) {
    sm[warp] = o.m;
    sm[kMaxWarps + warp] = o.s;
    sm[2 * kMaxWarps + warp] = o.t;
  }
  __syncthreads();
  Online r;
  for (int w = 0; w < nw; ++w) {
    r.merge(sm[w], sm[kMaxWarps + w], sm[2 * kMaxWarps + w]);
  }
  o = r;
}

__device__ __forceinline__ float block_sum(float x, float* sm) {
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, d);
  }
  if (lane == 0) {
    sm[warp] = x;
  }
  __syncthreads();
  float r = 0.f;
  for (int w = 0; w < nw; ++w) {
    r += sm[w];
  }
  return r;
}

// lp - lm and lq - lm from u = lp - lq:  ln2 - max(-u, 0) - L,  ln2 - max(u, 0) - L,
// L = log(1 + exp(-|u|)).
__device__ __forceinline__ void js_terms(float u, float& dp, float& dq) {
  float L = __logf(1.f + __expf(-fabsf(u)));
  dp = kLn2 - fmaxf(-u, 0.f) - L;
  dq = kLn2 - fmaxf(u, 0.f) - L;
}

template <typename T, Divergence K, bool VEC>
__global__ void divergence_forward(
    const T* q,
    const T* p,
    T* out,
    float* stats,
    int V) {
  using L = Vec<T, VEC>;
  constexpr int N = L::N;
  __shared__ float sm[4][3 * kMaxWarps];
  const int64_t row = blockIdx.x;
  const T* qr = q + row * V;
  const T* pr = p + row * V;
  const int nvec = V / N; // VEC implies N divides V
  Online oq, op;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float xq[N], xp[N];
    L::load(qr, int64_t(i) * N, xq);
    L::load(pr, int64_t(i) * N, xp);
    float bq = xq[0], bp = xp[0];
#pragma unroll
    for (int k = 1; k < N; ++k) {
      bq = fmaxf(bq, xq[k]);
      bp = fmaxf(bp, xp[k]);
    }
    if (bq > oq.m) {
      oq.s *= __expf(oq.m - bq);
      oq.m = bq;
    }
    if (bp > op.m) {
      float f = __expf(op.m - bp);
      op.s *= f;
      op.t *= f;
      op.m = bp;
    }
    float mq = safe(oq.m), mp = safe(op.m);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float eq = __expf(xq[k] - mq), ep = __expf(xp[k] - mp);
      oq.s += eq;
      op.s += ep;
      if constexpr (K == Divergence::KL) {
        op.t += xp[k] > -kInf ? ep * (xp[k] - xq[k]) : 0.f;
      }
    }
  }
  block_merge(oq, sm[0]);
  block_merge(op, sm[1]);
  const float lsq = __logf(oq.s), lsp = __logf(op.s);
  float s0, s1 = 0.f, div;
  if constexpr (K == Divergence::KL) {
    div = s0 = op.t / op.s + ((oq.m - op.m) + (lsq - lsp));
  } else {
    // A fully masked input (max -inf, sum 0) has no mass: l = -inf everywhere, not NaN.
    const float oqm = safe(oq.m), nq = oq.m == -kInf ? kInf : lsq;
    const float opm = safe(op.m), np = op.m == -kInf ? kInf : lsp;
    float klq = 0.f, klp = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      float xq[N], xp[N];
      L::load(qr, int64_t(i) * N, xq);
      L::load(pr, int64_t(i) * N, xp);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        float lq = (xq[k] - oqm) - nq, lp = (xp[k] - opm) - np;
        float dp, dq;
        js_terms(lp - lq, dp, dq);
        klq += lq > -kInf ? __expf(lq) * dq : 0.f;
        klp += lp > -kInf ? __expf(lp) * dp : 0.f;
      }
    }
    s0 = block_sum(klq, sm[2]);
    s1 = block_sum(klp, sm[3]);
    div = 0.5f * (s0 + s1);
  }
  if (threadIdx.x == 0) {
    float* st = stats + row * kDivStats;
    st[kMaxQ] = oq.m;
    st[kLogSumQ] = lsq;
    st[kMaxP] = op.m;
    st[kLogSumP] = lsp;
    st[kS0] = s0;
    st[kS1] = s1;
    out[row] = from_f<T>(div);
  }
}

// ------------------------------------------------------------------ JS in one read
// (the maths is at the top of this file)

// Chunks of a row of V elements whose first element sits `pad` elements past a 16-byte
// boundary, and the chunks per CTA of a cluster of C (host and kernel agree on these).
__host__ __device__ __forceinline__ int js_chunks(int V, int pad, int N) {
  return (V + pad + N - 1) / N;
}
__host__ __device__ __forceinline__ int js_per_cta(int chunks, int C) {
  return (chunks + C - 1) / C;
}
// Of those, the chunks a side in shared memory when the last reg_chunks are the threads'
// own, in registers (js_forward_keep's K chunks a thread).
__host__ __device__ __forceinline__ int js_shared_per(int chunks, int C, int reg_chunks) {
  const int s = js_per_cta(chunks, C) - reg_chunks;
  return s > 0 ? s : 0;
}

constexpr int kJsMaxThreads = 512;
// js_forward_keep with register chunks runs at exactly this many threads (a compile-time
// stride: its loads and loops take immediate offsets).
constexpr int kJsKeepThreads = 128;

// The kernel needs Hopper (clusters). For older targets of a multi-architecture build its
// body is a trap (the host never launches it there) and these helpers are left out.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

__device__ __forceinline__ float max_nan(float a, float b) {
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
}

// s = sum 2^((x - m) log2e) over a set of elements, m their maximum (or any offset).
struct Sum2 {
  float m = -kInf, s = 0.f;
  // One exp: the sum with the smaller maximum is scaled to the larger one.
  __device__ __forceinline__ void merge(float m2, float s2) {
    const float hi = fmaxf(m, m2), f = ex2((fminf(m, m2) - safe(hi)) * kLog2e);
    s = m >= m2 ? s + s2 * f : s * f + s2;
    m = hi;
  }
  // The saved stat, log sum exp(x - m): -inf where nothing has mass, as before.
  __device__ __forceinline__ float log_sum() const {
    return kLn2 * lg2(s);
  }
};

// Merges two states across lanes [0, W) of a warp (all 32 lanes call it); lane 0 gets
// the result, formed in the same order in every block.
template <int W>
__device__ __forceinline__ void warp_merge2(Sum2& a, Sum2& b) {
#pragma unroll
  for (int d = W / 2; d > 0; d /= 2) {
    float am = __shfl_xor_sync(0xffffffffu, a.m, d);
    float as = __shfl_xor_sync(0xffffffffu, a.s, d);
    float bm = __shfl_xor_sync(0xffffffffu, b.m, d);
    float bs = __shfl_xor_sync(0xffffffffu, b.s, d);
    a.merge(am, as);
    b.merge(bm, bs);
  }
}

// Block-wide NaN-propagating maxima of x and y; every thread gets them. `sm` holds 2 *
// kMaxWarps floats and is used by this call only.
__device__ __forceinline__ void block_max2(float& x, float& y, float* sm) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
    x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, d));
    y = max_nan(y, __shfl_xor_sync(0xffffffffu, y, d));
  }
  if (lane == 0) {
    sm[warp] = x;
    sm[kMaxWarps + warp] = y;
  }
  __syncthreads();
  // A butterfly over the next power of 2 of the warps, each group of `top` lanes holding
  // all nw values, so that every lane ends with the maximum.
  int top = 1;
  while (top < nw) {
    top *= 2;
  }
  const int j = lane & (top - 1);
  x = j < nw ? sm[j] : -kInf;
  y = j < nw ? sm[kMaxWarps + j] : -kInf;
  for (int d = top / 2; d > 0; d /= 2) {
    x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, d));
    y = max_nan(y, __shfl_xor_sync(0xffffffffu, y, d));
  }
}

// Block-wide sums of K values; thread 0 gets them. `sm` holds K * kMaxWarps floats and is
// used by this call only.
template <int K>
__device__ __forceinline__ void block_sums(float (&v)[K], float* sm) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
#pragma unroll
  for (int d = 16; d > 0; d /= 2) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] += __shfl_xor_sync(0xffffffffu, v[i], d);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      sm[i * kMaxWarps + warp] = v[i];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < nw; ++w) {
#pragma unroll
      for (int i = 0; i < K; ++i) {
        v[i] += sm[i * kMaxWarps + w];
      }
    }
  }
}

// Block-wide sums of x and y; thread 0 gets them. `sm` holds 2 * kMaxWarps floats and is
// used by this call only.
__device__ __forceinline__ void block_sum2(float& x, float& y, float* sm) {
  float v[2] = {x, y};
  block_sums<2>(v, sm);
  x = v[0];
  y = v[1];
}

// The 16-byte chunk of a row that starts at element e when it is not whole (e < 0 or past
// V - N): element by element, with -inf (no mass) outside [0, V).
template <typename T>
__device__ __forceinline__ uint4 partial_chunk(const T* row, int e, int V) {
  constexpr int N = 16 / sizeof(T);
  alignas(16) T v[N];
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = e + k >= 0 && e + k < V ? row[e + k] : from_f<T>(-kInf);
  }
  return *reinterpret_cast<const uint4*>(v);
}

// The elements of a chunk as float; the chunk is taken by value (one 16-byte load).
template <typename T>
__device__ __forceinline__ void unpack(uint4 c, float (&x)[16 / sizeof(T)]) {
  const unsigned w[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (std::is_same_v<T, float>) {
      x[k] = __uint_as_float(w[k]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) { // element 2k in the low half
      x[2 * k] = __uint_as_float(w[k] << 16);
      x[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    } else {
      x[2 * k] =
          __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] & 0xffffu)));
      x[2 * k + 1] =
          __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    }
  }
}

template <typename T>
using Half2Of = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;

// Rows whose maximum times log2e would overflow take x - m first (slower, exact).
constexpr float kFmaMax = 1e37f;

// The maxima of this thread's chunks c = first, first + stride, ... < n of q and p (one
// loop for both), NaN where an element is NaN: two elements an instruction for the half
// types.
template <typename T>
__device__ __forceinline__ void chunks_max(const uint4* sq, const uint4* sp, int first,
                                           int stride, int n, float& mq, float& mp) {
  if constexpr (std::is_same_v<T, float>) {
    auto max4 = [](uint4 v) {
      return max_nan(max_nan(__uint_as_float(v.x), __uint_as_float(v.y)),
                     max_nan(__uint_as_float(v.z), __uint_as_float(v.w)));
    };
    mq = mp = -kInf;
    for (int c = first; c < n; c += stride) {
      mq = max_nan(mq, max4(sq[c]));
      mp = max_nan(mp, max4(sp[c]));
    }
  } else {
    using T2 = Half2Of<T>;
    // A running maximum a word of the chunk (no reduction inside the loop: 20 -> 16
    // instructions a chunk pair in SASS), the words merged once after it.
    const T2 lo = T2(from_f<T>(-kInf), from_f<T>(-kInf));
    T2 a[4] = {lo, lo, lo, lo}, b[4] = {lo, lo, lo, lo};
    for (int c = first; c < n; c += stride) {
      const uint4 vq = sq[c], vp = sp[c];
      const T2* wq = reinterpret_cast<const T2*>(&vq);
      const T2* wp = reinterpret_cast<const T2*>(&vp);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        a[k] = __hmax2_nan(a[k], wq[k]);
        b[k] = __hmax2_nan(b[k], wp[k]);
      }
    }
    const T2 ra = __hmax2_nan(__hmax2_nan(a[0], a[1]), __hmax2_nan(a[2], a[3]));
    const T2 rb = __hmax2_nan(__hmax2_nan(b[0], b[1]), __hmax2_nan(b[2], b[3]));
    mq = max_nan(to_f(ra.x), to_f(ra.y));
    mp = max_nan(to_f(rb.x), to_f(rb.y));
  }
}

// The sums of this thread's chunks of q and p (one loop for both), from the CTA's maxima:
// 2^(x log2e - B) with B = m log2e rounded, one FFMA an element (x - m first where m log2e
// would overflow); js_frame converts the CTA's sums to the (x - m) log2e frame. A side
// whose maximum is -inf or NaN sums from 0 instead (js_frame then ignores its sum).
__device__ __forceinline__ float js_offset(float m) {
  return m > -kInf ? m : 0.f;
}

// Whether chunks_sum takes d = fma(x, log2e, -B) on both sides (else x - m first).
__device__ __forceinline__ bool js_fast(float mq, float mp) {
  return fabsf(js_offset(mq)) < kFmaMax && fabsf(js_offset(mp)) < kFmaMax;
}

template <typename T>
__device__ __forceinline__ void chunks_sum(const uint4* sq, const uint4* sp, int first,
                                           int stride, int n, float mq, float mp, float& zq,
                                           float& zp) {
  constexpr int N = 16 / sizeof(T);
  const float oq = js_offset(mq), op = js_offset(mp);
  zq = zp = 0.f;
  auto fold = [&](auto d) { // d(x, offset): the exponent of 2 an element adds
    for (int c = first; c < n; c += stride) {
      float xq[N], xp[N];
      unpack<T>(sq[c], xq);
      unpack<T>(sp[c], xp);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        zq += ex2(d(xq[k], oq));
        zp += ex2(d(xp[k], op));
      }
    }
  };
  if (js_fast(mq, mp)) {
    fold([](float x, float o) { return fmaf(x, kLog2e, -(o * kLog2e)); });
  } else {
    fold([](float x, float o) { return (x - o) * kLog2e; });
  }
}

// A CTA's (maximum, sum) as chunks_sum left them (`fast`: js_fast), in the (x - m) log2e
// frame (the rounding of B is exact in r = m log2e - B); a NaN maximum makes the sum NaN.
__device__ __forceinline__ Sum2 js_frame(float m, float sum, bool fast) {
  if (isnan(m)) {
    return Sum2{0.f, m};
  }
  if (m == -kInf) {
    return Sum2{};
  }
  return Sum2{m, fast ? sum * ex2(-fmaf(m, kLog2e, -m * kLog2e)) : sum};
}

// A row's constants for the terms pass (see js_finish_row): per side the offset m and B =
// m log2e (d = fma(x, log2e, -B), or (x - m) log2e where B would overflow), M's weight w of
// Q' and the frame change delta; for bfloat16 rows with |m| < kPackedMax the raw logit
// below which d < -100, rounded down (d >= -103 there: bfloat16's spacing is <= 2).
struct JsRow {
  float mq, mp, Bq, Bp, w, delta, Bqp; // Bqp = Bq - delta: q's offset in p's frame
  __nv_bfloat162 lowq, lowp;
};

// How js_terms forms d: (x - m) log2e, one FFMA, or one FFMA after the packed clamp.
enum class JsMode { kExact, kFma, kPacked };
constexpr float kPackedMax = 512.f;

// One chunk pair's terms in base 2 in p's frame: with dq, dp clamped at about -100 (a -inf
// logit weighs ~2^-100 of the maximum, never 0 * inf), Q' = 2^dq, P' = 2^dp, lm = log2 of M
// in p's frame, kp += P' (dp - lm) and kq += Q' (dq + delta - lm): three MUFU a pair.

template <typename T, JsMode MODE>
__device__ __forceinline__ void js_terms(uint4 cq, uint4 cp, const JsRow& r, float& kq,
                                         float& kp) {
  constexpr int N = 16 / sizeof(T);
  constexpr bool FAST = MODE != JsMode::kExact;
  constexpr bool kPacked = MODE == JsMode::kPacked && std::is_same_v<T, __nv_bfloat16>;
  if constexpr (kPacked) { // the clamp on the raw logits, two an instruction
    __nv_bfloat162* wq = reinterpret_cast<__nv_bfloat162*>(&cq);
    __nv_bfloat162* wp = reinterpret_cast<__nv_bfloat162*>(&cp);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      wq[k] = __hmax2(wq[k], r.lowq);
      wp[k] = __hmax2(wp[k], r.lowp);
    }
  }
  float xq[N], xp[N];
  unpack<T>(cq, xq);
  unpack<T>(cp, xp);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if constexpr (kPacked) {
      // Both sides in p's frame from the start: a = log2 Q + cp (delta rounded into Bqp,
      // within 3e-5 at |Bq| < 740, below bfloat16's resolution), b = log2 P + cp, lm =
      // log2(2^a + 2^b): kq += 2^a (a - lm), kp += 2^b (b - lm), the +1 of log2(. / M) added
      // once a row (the sums of P and Q are 1). Two instructions a pair fewer.
      const float a = fmaf(xq[k], kLog2e, -r.Bqp), b = fmaf(xp[k], kLog2e, -r.Bp);
      const float A = ex2(a), P = ex2(b);
      const float lm = lg2(A + P);
      kq = fmaf(A, a - lm, kq);
      kp = fmaf(P, b - lm, kp);
    } else {
      const float dq = fmaxf(FAST ? fmaf(xq[k], kLog2e, -r.Bq) : (xq[k] - r.mq) * kLog2e, -100.f);
      const float dp = fmaxf(FAST ? fmaf(xp[k], kLog2e, -r.Bp) : (xp[k] - r.mp) * kLog2e, -100.f);
      const float Q = ex2(dq), P = ex2(dp);
      const float lm = lg2(fmaf(P, 0.5f, Q * r.w));
      kp = fmaf(P, dp - lm, kp);
      kq = fmaf(Q, (dq + r.delta) - lm, kq);
    }
  }
}

#endif // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Where a CTA's slice of a row lies: chunk c of the row starts at element c * N - pad; the
// CTA of rank r holds chunks [lo, lo + cnt). `per` is the row's chunks per CTA.
struct JsSlice {
  int pad, lo, cnt;
};

template <typename T, int C>
__device__ __forceinline__ JsSlice js_slice(const T* qr, int V, int rank) {
  constexpr int N = 16 / sizeof(T);
  // p - q is a multiple of 16 bytes (host), so both rows have the same pad.
  const int pad = static_cast<int>(reinterpret_cast<uintptr_t>(qr) % 16 / sizeof(T));
  const int chunks = js_chunks(V, pad, N);
  const int per = js_per_cta(chunks, C);
  const int lo = rank * per;
  return {pad, lo, max(0, min(per, chunks - lo))};
}

// The slice's chunks into sq / sp: its whole chunks by one bulk copy an input (thread 0,
// counted on `bar`), a partial first or last chunk of the row by the thread that reads it
// (local index j by thread j % nt), so that only `bar` has to be waited on. Ends with a
// block barrier (the initialized `bar` is visible to every thread).
template <typename T>
__device__ __forceinline__ void js_load_slice(const T* qr, const T* pr, int V, JsSlice sl,
                                              uint4* sq, uint4* sp, uint64_t* bar) {
  constexpr int N = 16 / sizeof(T);
  const int end = sl.lo + sl.cnt;
  int c0 = sl.lo, c1 = end; // whole chunks [c0, c1); chunk c starts at c * N - pad
  if (c0 < c1 && c0 * N - sl.pad < 0) {
    ++c0;
  }
  if (c0 < c1 && (c1 - 1) * N - sl.pad + N > V) {
    --c1;
  }
  if (threadIdx.x == 0) {
    cu::mbar_init(bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    const uint32_t bytes = static_cast<uint32_t>(c1 - c0) * 16;
    cu::mbar_expect(bar, 2 * bytes);
    if (bytes > 0) {
      cu::bulk_copy_g2s(sq + (c0 - sl.lo), qr + (c0 * N - sl.pad), bytes, bar);
      cu::bulk_copy_g2s(sp + (c0 - sl.lo), pr + (c0 * N - sl.pad), bytes, bar);
    }
  }
  auto partial = [&](int c) { // the first and last chunks are the only ones that can be
    const int j = c - sl.lo;
    if (j >= 0 && c < end && (c < c0 || c >= c1) && threadIdx.x == j % blockDim.x) {
      sq[j] = partial_chunk(qr, c * N - sl.pad, V);
      sp[j] = partial_chunk(pr, c * N - sl.pad, V);
    }
  };
  partial(sl.lo);
  partial(end - 1);
  __syncthreads();
}

// The cluster's exchanges without cluster barriers: each value is pushed into the shared
// memory of the CTAs that read it by st.async, counted on their own mbarrier, which they
// wait on locally (no CTA reads another's shared memory, so none has to wait for the others
// before it exits). One relaxed cluster arrive after the barriers' init, and its wait just
// before the first push, make the init visible cluster-wide (the wait is long passed then).
__device__ __forceinline__ uint32_t cluster_addr(const void* local, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
               : "=r"(out) : "r"(cu::smem_u32(local)), "r"(rank));
  return out;
}
__device__ __forceinline__ void push4(float* dst, uint64_t* bar, int rank, float a, float b,
                                      float c, float d) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
      ::"r"(cluster_addr(dst, rank)), "f"(a), "f"(b), "f"(c), "f"(d),
      "r"(cluster_addr(bar, rank)) : "memory");
}
__device__ __forceinline__ void push2(float* dst, uint64_t* bar, int rank, float a, float b) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];"
      ::"r"(cluster_addr(dst, rank)), "f"(a), "f"(b), "r"(cluster_addr(bar, rank)) : "memory");
}

// The cluster's second exchange: each CTA's two term sums (thread 0's a, b) into rank 0's
// `sums`, counted on its bar. False on the other ranks, which may then exit (nothing reads
// their shared memory); on rank 0, thread 0 gets the totals over the cluster.
template <int C>
__device__ __forceinline__ bool js_gather(float& a, float& b, float* sums, uint64_t* bar,
                                          int rank) {
  if constexpr (C > 1) {
    if (threadIdx.x == 0) push2(sums + 2 * rank, bar, 0, a, b);
    if (rank != 0) {
      return false;
    }
    if (threadIdx.x == 0) { // only thread 0 uses the row's sums, and only it waits for them
      cu::mbar_wait_sleep(bar, 0);
      a = 0.f;
      b = 0.f;
      for (int r = 0; r < C; ++r) {
        a += sums[2 * r];
        b += sums[2 * r + 1];
      }
    }
  }
  return true;
}

// A row's JS from its slice's partials (oq, op, in thread 0): the cluster merges the
// normalizers, each CTA sums its slice's terms, rank 0 gathers them and writes out / stats.
// Every CTA of the cluster calls it for the same row; `red`, `norm`, `part` and `sums` are
// the CTA's shared scratch. On return no CTA touches another's shared memory for this row.
template <typename T, int C>
__device__ __forceinline__ void js_finish_row(Sum2 oq, Sum2 op, const uint4* sq,
                                              const uint4* sp, int cnt, int rank, int64_t row,
                                              T* out, float* stats, float* red, float* norm,
                                              float* part, float* sums, uint64_t* xbar) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if constexpr (C == 1) {
    if (tid == 0) {
      norm[0] = oq.m;
      norm[1] = oq.s;
      norm[2] = op.m;
      norm[3] = op.s;
    }
  } else {
    // This CTA's partial into every CTA's part[rank] (part holds 4 C floats), once the
    // cluster wait shows every CTA's xbar initialized.
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    if (tid == 0) {
      for (int r = 0; r < C; ++r) push4(part + 4 * rank, &xbar[0], r, oq.m, oq.s, op.m, op.s);
    }
    if (tid < 32) { // lane r takes rank r's part; every CTA merges them alike
      Sum2 gq, gp;
      cu::mbar_wait_sleep(&xbar[0], 0); // all C parts have landed here
      if (tid < C) {
        const float* rp = part + 4 * tid;
        gq = Sum2{rp[0], rp[1]};
        gp = Sum2{rp[2], rp[3]};
      }
      warp_merge2<C>(gq, gp);
      if (tid == 0) {
        norm[0] = gq.m;
        norm[1] = gq.s;
        norm[2] = gp.m;
        norm[3] = gp.s;
      }
    }
  }
  __syncthreads();
  oq = Sum2{norm[0], norm[1]};
  op = Sum2{norm[2], norm[3]};
  // The terms in p's frame: log2 P = dp - cp and log2 Q = dq - cq with c = r + log2 s (r
  // = m log2e - B on the fast path, else 0), so M = (P + Q) / 2 = 2^-cp (P' + Q' 2^delta) / 2
  // with delta = cp - cq: log2(P / M) = dp - lm and log2(Q / M) = dq + delta - lm. A side
  // with no mass (maximum -inf) has KL 0 there and 1 bit on the other side (M = half of it).
  const bool live = oq.m != -kInf && op.m != -kInf;
  const bool fast = fabsf(oq.m) < kFmaMax && fabsf(op.m) < kFmaMax;
  JsRow rw{};
  float cq = 0.f, cp = 0.f;
  if (live) {
    rw.mq = oq.m;
    rw.mp = op.m;
    rw.Bq = oq.m * kLog2e;
    rw.Bp = op.m * kLog2e;
    cq = (fast ? fmaf(oq.m, kLog2e, -rw.Bq) : 0.f) + lg2(oq.s);
    cp = (fast ? fmaf(op.m, kLog2e, -rw.Bp) : 0.f) + lg2(op.s);
    rw.delta = cp - cq;
    rw.w = 0.5f * ex2(rw.delta);
    rw.Bqp = rw.Bq - rw.delta;
    // d < -100 below these (rounded down: d >= -103 at them).
    rw.lowq = __bfloat162bfloat162(__float2bfloat16_rd((rw.Bq - 100.f) * kLn2));
    rw.lowp = __bfloat162bfloat162(__float2bfloat16_rd((rw.Bp - 100.f) * kLn2));
  }
  const bool packed = std::is_same_v<T, __nv_bfloat16> && fabsf(oq.m) < kPackedMax &&
                      fabsf(op.m) < kPackedMax;
  float kq = 0.f, kp = 0.f;
  if (live && packed) {
    for (int c = tid; c < cnt; c += nt) {
      js_terms<T, JsMode::kPacked>(sq[c], sp[c], rw, kq, kp);
    }
  } else if (live && fast) {
    for (int c = tid; c < cnt; c += nt) {
      js_terms<T, JsMode::kFma>(sq[c], sp[c], rw, kq, kp);
    }
  } else if (live) {
    for (int c = tid; c < cnt; c += nt) {
      js_terms<T, JsMode::kExact>(sq[c], sp[c], rw, kq, kp);
    }
  }
  block_sum2(kq, kp, red + 4 * kMaxWarps);
  if (!js_gather<C>(kq, kp, sums, &xbar[1], rank)) { // each CTA's (KLq, KLp) in base 2
    return;
  }
  if (tid == 0) {
    // A NaN logit made its sum NaN, while the clamps in js_terms drop NaN terms.
    const bool nan = isnan(oq.s) || isnan(op.s);
    const bool q_only = oq.m != -kInf && op.m == -kInf, p_only = op.m != -kInf && oq.m == -kInf;
    const float klq = !live ? (q_only ? 1.f : 0.f) // bits
                      : packed ? fmaf(kq, ex2(-cp), 1.f) : kq * ex2(-cq);
    const float klp = !live ? (p_only ? 1.f : 0.f)
                      : packed ? fmaf(kp, ex2(-cp), 1.f) : kp * ex2(-cp);
    const float s0 = nan ? __int_as_float(0x7fc00000) : kLn2 * klq;
    const float s1 = nan ? __int_as_float(0x7fc00000) : kLn2 * klp;
    float* st = stats + row * kDivStats;
    st[kMaxQ] = oq.m;
    st[kLogSumQ] = oq.log_sum();
    st[kMaxP] = op.m;
    st[kLogSumP] = op.log_sum();
    st[kS0] = s0;
    st[kS1] = s1;
    out[row] = from_f<T>(0.5f * (s0 + s1));
  }
}

template <int C>
__device__ __forceinline__ int cluster_rank() {
  if constexpr (C > 1) {
    if (cg::this_cluster().num_blocks() != C) {
      __trap(); // launched with another cluster size: fail loudly, never a wrong answer
    }
    return static_cast<int>(cg::this_cluster().block_rank());
  }
  return 0;
}

#endif // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// A one-read CTA's start (both JS kernels): the cluster's exchange barriers initialized
// (xbar[0] expecting `part_bytes` from every rank, rank 0's xbar[1] 8 bytes from every
// rank; made visible cluster-wide by js_load_slice's fence and the relaxed arrive), its
// slice of the row loaded into shared memory (q's chunks at sq, p's at sp) and landed.
struct JsStart {
  int rank;
  int64_t row;
  JsSlice sl;     // the whole slice
  int ns;         // its chunks in shared memory (the first ns)
  uint4 *sq, *sp;
};

template <typename T, int C>
__device__ __forceinline__ JsStart js_start(const T* q, const T* p, int V, uint4* rows,
                                            uint64_t* bar, uint64_t* xbar,
                                            uint32_t part_bytes, int reg_chunks = 0) {
  constexpr int N = 16 / sizeof(T);
  JsStart st;
  st.rank = cluster_rank<C>();
  if (C > 1 && threadIdx.x == 0) {
    cu::mbar_init(&xbar[0], 1);
    cu::mbar_init(&xbar[1], 1);
    cu::mbar_expect(&xbar[0], part_bytes * C);
    if (st.rank == 0) cu::mbar_expect(&xbar[1], 8 * C);
  }
  st.row = blockIdx.x / C;
  const T* qr = q + st.row * V;
  const T* pr = p + st.row * V;
  st.sl = js_slice<T, C>(qr, V, st.rank);
  // The last reg_chunks of a slice's `per` chunks are the threads' own, in registers.
  const int shared = js_shared_per(js_chunks(V, st.sl.pad, N), C, reg_chunks);
  st.ns = min(st.sl.cnt, shared);
  st.sq = rows;
  st.sp = rows + shared;
  js_load_slice(qr, pr, V, JsSlice{st.sl.pad, st.sl.lo, st.ns}, st.sq, st.sp, bar);
  if constexpr (C > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
  cu::mbar_wait_sleep(bar, 0); // the bulk copies have landed
  return st;
}

// JS forward reading q and p once: cluster of C CTAs per row (blockIdx.x / C), each CTA
// holding its slice of both rows in dynamic shared memory (q's chunks, then p's, `per`
// each), loaded by bulk copies: the CTA's maximum (pass 0), its sums from that maximum
// (pass 1), then the row's terms (js_finish_row).
// Each thread reads the chunks j = tid, tid + nt, ... in every pass.
template <typename T, int C>
__global__ void __launch_bounds__(kJsMaxThreads, 2)
    js_forward_cluster(const T* q, const T* p, T* out, float* stats, int V) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap(); // the host launches this on compute capability 9.0 and later only
#else
  extern __shared__ uint4 js_rows[];
  __shared__ float red[6 * kMaxWarps], norm[4];
  __shared__ __align__(16) float part[4 * C];
  __shared__ __align__(8) float sums[2 * C];
  __shared__ uint64_t bar, xbar[2];
  // Every rank's part (m, s) a side into xbar[0] (js_finish_row).
  const JsStart js = js_start<T, C>(q, p, V, js_rows, &bar, xbar, 16);
  const int rank = js.rank;
  const int64_t row = js.row;
  uint4 *sq = js.sq, *sp = js.sp;
  const int t = threadIdx.x, nt = blockDim.x, n = js.sl.cnt;
  float mq, mp, sq_sum, sp_sum;
  chunks_max<T>(sq, sp, t, nt, n, mq, mp);
  block_max2(mq, mp, red);
  chunks_sum<T>(sq, sp, t, nt, n, mq, mp, sq_sum, sp_sum);
  block_sum2(sq_sum, sp_sum, red + 2 * kMaxWarps);
  const bool fast = js_fast(mq, mp);
  const Sum2 oq = js_frame(mq, sq_sum, fast), op = js_frame(mp, sp_sum, fast); // thread 0's
  js_finish_row<T, C>(oq, op, sq, sp, n, rank, row, out, stats, red, norm, part, sums, xbar);
#endif
}

// ------------------------------------------------------- JS in one read, exps kept
// The half types' one-read kernel with each exp taken once (js_forward_keep; the maths:
// tools/js_store_precision.py). After the slice's maximum (pass 0 as above), pass 1
// overwrites each bf16 / f16 logit in shared memory with its exp as float16, e~ =
// 2^(x log2e - f) with f = m log2e - 15 (2^15 e^(x - m): normal down to ~20 nats below
// the maximum; the clamp d >= -20 keeps every e~ >= 2^-23, so no log below meets 0 and a
// -inf logit weighs ~2^-35 of the maximum). From the rounded values it sums Z = sum e~
// and A = sum e~ lg e~, to first order in the rounding as sum e~ d + (e~ - e') log2e with
// e' the unrounded exp (whose sum E gives the saved stats exactly); so sum P = 1 and sum
// P lg P hold for the values pass 2 reads. Pass 2 takes one log a pair: with P = a e~p,
// Q = b e~q (a, b from the row's normalizers) and the larger of a, b as g, S = P + Q = g T
// with T = e~u + beta e~v (u the side of g), KL(P || M) = sum P lg P - sum P lg S + 1 and
// the same for Q: two FFMA accumulations of lg T a pair. Three MUFU a pair in all,
// against five when pass 2 recomputes both exps (js_forward_cluster).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

constexpr float kKeepShift = 15.f; // e~ = 2^15 at the maximum
constexpr float kKeepFloor = -20.f; // d >= -20 - (one spacing of T below the bound)

// A side's frame in one CTA: d = fma(x, log2e, -f) (packed: the clamp on the raw logits,
// two an instruction, at `low`), else d = max(fma(x - m, log2e, 15), -20); rho = the
// rounding of f folded back (e~ = 2^(15 + rho) e^(x - m)).
template <typename T>
struct KeepFrame {
  float m, f, rho;
  Half2Of<T> low;
};

// `packed` is the CTA's (both sides' maxima within kPackedMax), so that one loop serves both.
template <typename T>
__device__ __forceinline__ KeepFrame<T> keep_frame(float m, bool packed) {
  KeepFrame<T> fr{};
  fr.m = js_offset(m); // a slice with no mass: any finite frame (weighted by 0)
  if (packed) {
    fr.f = fr.m * kLog2e - kKeepShift;
    fr.rho = fmaf(fr.m, kLog2e, -fr.f) - kKeepShift;
    const float lo = (fr.f + kKeepFloor) * kLn2; // d = -20 there, rounded down in T
    if constexpr (std::is_same_v<T, __half>) {
      fr.low = __half2half2(__float2half_rd(lo));
    } else {
      fr.low = __bfloat162bfloat162(__float2bfloat16_rd(lo));
    }
  } else {
    fr.f = 0.f;
    fr.rho = 0.f;
  }
  return fr;
}

// One side's sums over a CTA's slice: Z = sum e~, A = sum e~ d, E = sum e'.
struct KeepSums {
  float z = 0.f, a = 0.f, e = 0.f;
};

// Pass 1 on one chunk of one side: exps into `c` (in place, float16), sums into s.
template <typename T, bool PACKED>
__device__ __forceinline__ void keep_chunk(uint4& c, const KeepFrame<T>& fr, KeepSums& s0,
                                           KeepSums& s1) {
  Half2Of<T>* w = reinterpret_cast<Half2Of<T>*>(&c);
  if constexpr (PACKED) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = __hmax2(w[k], fr.low);
    }
  }
  float x[8];
  unpack<T>(c, x);
  __half2* h = reinterpret_cast<__half2*>(&c);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float d0, d1;
    if constexpr (PACKED) {
      d0 = fmaf(x[2 * k], kLog2e, -fr.f);
      d1 = fmaf(x[2 * k + 1], kLog2e, -fr.f);
    } else {
      d0 = fmaxf(fmaf(x[2 * k] - fr.m, kLog2e, kKeepShift), kKeepFloor);
      d1 = fmaxf(fmaf(x[2 * k + 1] - fr.m, kLog2e, kKeepShift), kKeepFloor);
    }
    const float e0 = ex2(d0), e1 = ex2(d1);
    h[k] = __floats2half2_rn(e0, e1); // element 2k in the low half, as unpack reads
    const float t0 = __low2float(h[k]), t1 = __high2float(h[k]);
    s0.z += t0;
    s1.z += t1;
    s0.a = fmaf(t0, d0, s0.a);
    s1.a = fmaf(t1, d1, s1.a);
    s0.e += e0;
    s1.e += e1;
  }
}

// A side's row sums, merged over the cluster from each CTA's (m, Z, A, E) in the exact
// frame 2^(15 + (x - m) log2e) (rho folded in by the sender): in the row's frame (its
// maximum M) each CTA's values are scaled by k = 2^((m - M) log2e), lg k added to lg e~.
struct KeepRow {
  float m, z, h, e; // M, Z, sum e~ lg e~ (row frame), E
};

template <int C>
__device__ __forceinline__ KeepRow keep_merge(float m, float z, float a, float e) {
  float M = m;
#pragma unroll
  for (int d = C / 2; d > 0; d /= 2) {
    M = max_nan(M, __shfl_xor_sync(0xffffffffu, M, d));
  }
  const float lk = (m - M) * kLog2e;
  const float k = M > -kInf && m > -kInf ? ex2(lk) : 0.f;
  float zk = k * z, hk = k > 0.f ? k * fmaf(lk, z, a) : 0.f, ek = k * e;
#pragma unroll
  for (int d = C / 2; d > 0; d /= 2) {
    zk += __shfl_xor_sync(0xffffffffu, zk, d);
    hk += __shfl_xor_sync(0xffffffffu, hk, d);
    ek += __shfl_xor_sync(0xffffffffu, ek, d);
  }
  return {M, zk, hk, ek};
}

#endif // !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

// Pass 2 on one chunk pair: u, v the exps of the sides of scales g and g beta. Two
// accumulators a side (even and odd elements) halve the FFMA chains.
__device__ __forceinline__ void keep_terms(uint4 cu_, uint4 cv, float beta, float (&au)[2],
                                           float (&av)[2]) {
  const __half2* hu = reinterpret_cast<const __half2*>(&cu_);
  const __half2* hv = reinterpret_cast<const __half2*>(&cv);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float u0 = __low2float(hu[k]), u1 = __high2float(hu[k]);
    const float v0 = __low2float(hv[k]), v1 = __high2float(hv[k]);
    const float l0 = lg2(fmaf(v0, beta, u0)), l1 = lg2(fmaf(v1, beta, u1));
    au[0] = fmaf(u0, l0, au[0]);
    av[0] = fmaf(v0, l0, av[0]);
    au[1] = fmaf(u1, l1, au[1]);
    av[1] = fmaf(v1, l1, av[1]);
  }
}

// A chunk of a row from global memory into registers: one 16-byte load when whole, else
// partial_chunk.
template <typename T>
__device__ __forceinline__ uint4 row_chunk(const T* row, int e, int V) {
  constexpr int N = 16 / sizeof(T);
  if (e >= 0 && e + N <= V) {
    return __ldg(reinterpret_cast<const uint4*>(row + e));
  }
  return partial_chunk(row, e, V);
}

// The maxima of K chunks in registers (NaN-propagating), merged into mq / mp.
template <typename T, int K>
__device__ __forceinline__ void regs_max(const uint4 (&rq)[K], const uint4 (&rp)[K], float& mq,
                                         float& mp) {
  using T2 = Half2Of<T>;
  const T2 lo = T2(from_f<T>(-kInf), from_f<T>(-kInf));
  T2 a = lo, b = lo;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T2* wq = reinterpret_cast<const T2*>(&rq[k]);
    const T2* wp = reinterpret_cast<const T2*>(&rp[k]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      a = __hmax2_nan(a, wq[j]);
      b = __hmax2_nan(b, wp[j]);
    }
  }
  mq = max_nan(mq, max_nan(to_f(a.x), to_f(a.y)));
  mp = max_nan(mp, max_nan(to_f(b.x), to_f(b.y)));
}

// JS forward of the half types reading q and p once with each exp taken once (above):
// the slice loaded as js_forward_cluster loads it, its maxima (pass 0), exps kept and
// summed (pass 1), the cluster's row sums, one log a pair (pass 2), rank 0's result.
// K > 0: the last K chunks a thread of each CTA's slice (a side) live in its registers
// (loaded by the thread while the bulk copy brings the rest), so that a CTA holds twice
// the slice at four CTAs an SM: half the clusters' CTAs a row, and each warp's fixed cost a
// row (its reductions, frames, the merge) spread over twice the pairs.
template <typename T, int C, int K = 0>
__global__ void __launch_bounds__(K > 0 ? kJsKeepThreads : kJsMaxThreads, K > 0 ? 4 : 2)
    js_forward_keep(const T* q, const T* p, T* out, float* stats, int V) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap(); // the host launches this on compute capability 9.0 and later only
#else
  static_assert(!std::is_same_v<T, float>, "float32 rows keep js_forward_cluster");
  constexpr int KR = K > 0 ? K : 1; // register arrays of size K (unused when K = 0)
  constexpr int N = 16 / sizeof(T);
  extern __shared__ uint4 js_rows[];
  __shared__ float red[10 * kMaxWarps];
  __shared__ __align__(16) float part[8 * C];
  __shared__ __align__(8) float sums[2 * C];
  __shared__ uint64_t bar, xbar[2];
  const int tid = threadIdx.x, nt = K > 0 ? kJsKeepThreads : blockDim.x;
  if (K > 0 && blockDim.x != kJsKeepThreads) {
    __trap(); // launched with another block size: fail loudly, never a wrong answer
  }
  uint4 regq[KR], regp[KR];
  int rfirst = 0, rcnt = 0; // the register chunks' first local index, the slice's count
  if constexpr (K > 0) { // issued before the bulk copy is waited for
    const int64_t r = blockIdx.x / C;
    const T* qr = q + r * V;
    const T* pr = p + r * V;
    const JsSlice sl = js_slice<T, C>(qr, V, cluster_rank<C>());
    rfirst = js_shared_per(js_chunks(V, sl.pad, N), C, K * nt);
    rcnt = sl.cnt;
    const uint32_t ninf = std::is_same_v<T, __half> ? 0xfc00fc00u : 0xff80ff80u;
    const uint4 none = make_uint4(ninf, ninf, ninf, ninf);
    // Only a row's first and last chunks can be partial, and only the last rank's threads
    // can run past the slice: every other thread loads its K chunks from one address at
    // immediate offsets, with no test or select a chunk, so that the hot prologue stays
    // short (the element-wise loads of row_chunk, inlined K times into every thread's path,
    // once made it ~20 KB and a source of instruction-fetch stalls).
    const int e0 = (sl.lo + rfirst + tid) * N - sl.pad;
    const int last = rfirst + tid + (K - 1) * nt;
    if (e0 >= 0 && last < rcnt && (sl.lo + last) * N - sl.pad + N <= V) {
      const uint4* aq = reinterpret_cast<const uint4*>(qr + e0);
      const uint4* ap = reinterpret_cast<const uint4*>(pr + e0);
#pragma unroll
      for (int k = 0; k < K; ++k) {
        regq[k] = __ldg(aq + k * nt);
        regp[k] = __ldg(ap + k * nt);
      }
    } else {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int j = rfirst + tid + k * nt;
        const int e = (sl.lo + j) * N - sl.pad;
        regq[k] = j < rcnt ? row_chunk(qr, e, V) : none;
        regp[k] = j < rcnt ? row_chunk(pr, e, V) : none;
      }
    }
  }
  // Every rank's two parts (m, Z, A, E) a side into xbar[0].
  const JsStart js = js_start<T, C>(q, p, V, js_rows, &bar, xbar, 32, K * nt);
  const int rank = js.rank;
  const int64_t row = js.row;
  uint4 *sq = js.sq, *sp = js.sp;
  const int n = js.ns;
  float mq, mp;
  chunks_max<T>(sq, sp, tid, nt, n, mq, mp);
  if constexpr (K > 0) regs_max<T, K>(regq, regp, mq, mp);
  block_max2(mq, mp, red);
  // Pass 1: the exps, kept; each thread later reads back only the chunks it wrote.
  const bool packed =
      fabsf(js_offset(mq)) < kPackedMax && fabsf(js_offset(mp)) < kPackedMax;
  const KeepFrame<T> fq = keep_frame<T>(mq, packed), fp = keep_frame<T>(mp, packed);
  KeepSums q0, q1, p0, p1;
  auto pass1 = [&](auto packed) { // the frame's mode is the CTA's, hoisted out of the loop
    constexpr bool P = decltype(packed)::value;
    int c = tid;
    for (; c + nt < n; c += 2 * nt) { // two chunk pairs a step: half the loop's overhead
      uint4 cq = sq[c], cp = sp[c], dq = sq[c + nt], dp = sp[c + nt];
      keep_chunk<T, P>(cq, fq, q0, q1);
      keep_chunk<T, P>(cp, fp, p0, p1);
      keep_chunk<T, P>(dq, fq, q0, q1);
      keep_chunk<T, P>(dp, fp, p0, p1);
      sq[c] = cq;
      sp[c] = cp;
      sq[c + nt] = dq;
      sp[c + nt] = dp;
    }
    if (c < n) {
      uint4 cq = sq[c], cp = sp[c];
      keep_chunk<T, P>(cq, fq, q0, q1);
      keep_chunk<T, P>(cp, fp, p0, p1);
      sq[c] = cq;
      sp[c] = cp;
    }
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (rfirst + tid + k * nt < rcnt) {
          keep_chunk<T, P>(regq[k], fq, q0, q1);
          keep_chunk<T, P>(regp[k], fp, p0, p1);
        }
      }
    }
  };
  if (packed) {
    pass1(std::true_type{});
  } else {
    pass1(std::false_type{});
  }
  float v[6] = {q0.z + q1.z, q0.a + q1.a, q0.e + q1.e, p0.z + p1.z, p0.a + p1.a, p0.e + p1.e};
  block_sums<6>(v, red + 2 * kMaxWarps);
  // Thread 0: the CTA's sums in the exact frame (A to first order in the rounding); warp 0
  // sends them to every rank (C > 1: lane r to rank r).
  const float zq_raw = v[0], zp_raw = v[3];
  if constexpr (C > 1) asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  if (tid < 32) {
    float pv[8];
    if (tid == 0) {
      const float gq = ex2(-fq.rho), gp = ex2(-fp.rho);
      const float aq = fmaf(v[0] - v[2], kLog2e, v[1]), ap = fmaf(v[3] - v[5], kLog2e, v[4]);
      pv[0] = mq;
      pv[1] = gq * v[0];
      pv[2] = gq * fmaf(-fq.rho, v[0], aq);
      pv[3] = gq * v[2];
      pv[4] = mp;
      pv[5] = gp * v[3];
      pv[6] = gp * fmaf(-fp.rho, v[3], ap);
      pv[7] = gp * v[5];
    }
    if constexpr (C == 1) {
      if (tid == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          part[i] = pv[i];
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        pv[i] = __shfl_sync(0xffffffffu, pv[i], 0);
      }
      if (tid < C) {
        push4(part + 8 * rank, &xbar[0], tid, pv[0], pv[1], pv[2], pv[3]);
        push4(part + 8 * rank + 4, &xbar[0], tid, pv[4], pv[5], pv[6], pv[7]);
      }
    }
  }
  // Every warp merges the row itself once all C parts have landed (each group of C lanes
  // holds all of them), so that no warp waits for another's merge: on the H200 the block
  // barrier after warp 0's merge held the other warps for ~13% of the kernel's samples.
  if constexpr (C == 1) {
    __syncthreads();
  } else {
    cu::mbar_wait_sleep(&xbar[0], 0);
  }
  const float* pr_ = part + 8 * (tid % C);
  const KeepRow rq = keep_merge<C>(pr_[0], pr_[1], pr_[2], pr_[3]);
  const KeepRow rp = keep_merge<C>(pr_[4], pr_[5], pr_[6], pr_[7]);
  // This CTA's scales a = kp / Zp and b = kq / Zq of its raw e~ (Z >= 2^14: a fast
  // division is safe), the side u of g = max(a, b) and beta = min / max.
  const bool live = rq.m > -kInf && rp.m > -kInf;
  const float a = live && mp > -kInf ? __fdividef(ex2((mp - rp.m) * kLog2e - fp.rho), rp.z) : 0.f;
  const float b = live && mq > -kInf ? __fdividef(ex2((mq - rq.m) * kLog2e - fq.rho), rq.z) : 0.f;
  const float g = fmaxf(a, b);
  float au2[2] = {0.f, 0.f}, av2[2] = {0.f, 0.f};
  if (g > 0.f) {
    const float beta = fminf(a, b) / g;
    const bool u_is_p = a >= b;
    const uint4* su = u_is_p ? sp : sq;
    const uint4* sv = u_is_p ? sq : sp;
    for (int c = tid; c < n; c += nt) {
      keep_terms(su[c], sv[c], beta, au2, av2);
    }
    if constexpr (K > 0) {
      auto regs = [&](const uint4 (&u)[KR], const uint4 (&w)[KR]) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (rfirst + tid + k * nt < rcnt) {
            keep_terms(u[k], w[k], beta, au2, av2);
          }
        }
      };
      if (u_is_p) {
        regs(regp, regq);
      } else {
        regs(regq, regp);
      }
    }
  }
  float au = au2[0] + au2[1], av = av2[0] + av2[1];
  block_sum2(au, av, red + 8 * kMaxWarps);
  // This CTA's sum P lg S and sum Q lg S (bits): a (lg g Zp + sum e~p lg T), the same for q.
  float up = 0.f, uq = 0.f;
  if (tid == 0 && g > 0.f) {
    const bool u_is_p = a >= b;
    const float lgg = lg2(g);
    const float ap_ = u_is_p ? au : av, aq_ = u_is_p ? av : au;
    up = a * fmaf(lgg, zp_raw, ap_);
    uq = b * fmaf(lgg, zq_raw, aq_);
  }
  if (!js_gather<C>(uq, up, sums, &xbar[1], rank)) {
    return;
  }
  if (tid == 0) {
    // KL(Q || M) = sum Q lg Q - sum Q lg S + 1 bits, sum Q lg Q = h / Z - lg Z; a side with
    // no mass: 0 there and 1 bit on the other side. NaN or +inf logits: NaN.
    const bool nan = isnan(rq.m) || isnan(rp.m) || rq.m == kInf || rp.m == kInf ||
                     isnan(rq.e) || isnan(rp.e);
    const bool q_only = rq.m != -kInf && rp.m == -kInf, p_only = rp.m != -kInf && rq.m == -kInf;
    const float klq = !live ? (q_only ? 1.f : 0.f) : rq.h / rq.z - lg2(rq.z) - uq + 1.f;
    const float klp = !live ? (p_only ? 1.f : 0.f) : rp.h / rp.z - lg2(rp.z) - up + 1.f;
    const float qnan = __int_as_float(0x7fc00000);
    const float s0 = nan ? qnan : kLn2 * klq;
    const float s1 = nan ? qnan : kLn2 * klp;
    float* st = stats + row * kDivStats;
    st[kMaxQ] = rq.m;
    st[kLogSumQ] = nan ? qnan : kLn2 * (lg2(rq.e) - kKeepShift);
    st[kMaxP] = rp.m;
    st[kLogSumP] = nan ? qnan : kLn2 * (lg2(rp.e) - kKeepShift);
    st[kS0] = s0;
    st[kS1] = s1;
    out[row] = from_f<T>(0.5f * (s0 + s1));
  }
#endif
}

// The backward reads q and p once and writes the requested gradients: memory-bound, so each
// thread loads kBwdChunks chunks of a row (of each input) before it computes any, to keep
// enough bytes in flight, and the maths is in base 2 (one MUFU an exp or log, no scaling):
// l2 = (x - m) log2e - ls log2e = log2 of the softmax. JS: with u = lp2 - lq2,
// log2(Q / M) = 1 - max(u, 0) - lg2(1 + 2^-|u|) and log2(P / M) the same with -u, so
// dq = (c / 2) ln2 Q (log2(Q / M) - S0 log2e), dp likewise with S1 (S0, S1 in nats).
// KL: dq = c (Q - P), dp = c P (lp - lq - S0) in nats (see there). On the H200 at 8192 x
// 151,936 bf16 (bench_divergence's backward rows, side by side): JS 1.91 ms (92% of copy
// for its 3 arrays) against 2.06-2.11 ms for one chunk a thread in natural units; KL
// 1.88-1.92 against 1.90-1.91, unchanged.
constexpr int kBwdChunks = 4;

template <typename T, Divergence K, bool VEC, bool GQ, bool GP>
__global__ void divergence_backward(
    const T* q,
    const T* p,
    const float* stats,
    const float* cot,
    T* dq,
    T* dp,
    int V,
    int64_t rows) {
  using L = Vec<T, VEC>;
  constexpr int N = L::N, U = kBwdChunks;
  const int nvec = V / N;
  const int first = blockIdx.x * blockDim.x * U + threadIdx.x;
  if (first >= nvec) {
    return;
  }
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float* st = stats + row * kDivStats;
    float mq = st[kMaxQ], lsq = st[kLogSumQ], mp = st[kMaxP], lsp = st[kLogSumP];
    if constexpr (K == Divergence::JS) { // a fully masked input: l = -inf, not NaN
      lsq = mq == -kInf ? kInf : lsq;
      lsp = mp == -kInf ? kInf : lsp;
      mq = safe(mq);
      mp = safe(mp);
    }
    const float c = cot[row];
    const T* qr = q + row * V;
    const T* pr = p + row * V;
    T* dqr = GQ ? dq + row * V : nullptr;
    T* dpr = GP ? dp + row * V : nullptr;
    if (c == 0.f) { // a masked padding row, whose logits may be all -inf
      const float zero[N] = {};
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int i = first + u * blockDim.x;
        if (i < nvec) {
          if constexpr (GQ) L::store(dqr, int64_t(i) * N, zero);
          if constexpr (GP) L::store(dpr, int64_t(i) * N, zero);
        }
      }
      continue;
    }
    typename L::Raw rq[U], rp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = first + u * blockDim.x;
      if (i < nvec) {
        rq[u] = L::load_raw(qr, int64_t(i) * N);
        rp[u] = L::load_raw(pr, int64_t(i) * N);
      }
    }
    const float Lq = lsq * kLog2e, Lp = lsp * kLog2e;
    const float s0 = st[kS0] * kLog2e, s1 = st[kS1] * kLog2e;
    const float a = (K == Divergence::JS ? 0.5f : 1.f) * c * kLn2;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = first + u * blockDim.x;
      if (i >= nvec) {
        continue; // past the row's end: nothing loaded, nothing stored
      }
      float xq[N], xp[N], gq[N], gp[N];
      L::unpack_raw(rq[u], xq);
      L::unpack_raw(rp[u], xp);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        if constexpr (K == Divergence::KL) {
          // lp - lq in nats from the exact differences x - m: dp's (lp - lq) - S0 cancels
          // where the logits are huge, and a base-2 rounding of each would show there.
          const float lq = (xq[k] - mq) - lsq, lp = (xp[k] - mp) - lsp;
          const float Q = ex2(lq * kLog2e), P = ex2(lp * kLog2e);
          gq[k] = c * (Q - P);
          gp[k] = lp > -kInf ? c * P * ((lp - lq) - st[kS0]) : 0.f;
        } else {
          const float lq = fmaf(xq[k] - mq, kLog2e, -Lq);
          const float lp = fmaf(xp[k] - mp, kLog2e, -Lp);
          const float Q = ex2(lq), P = ex2(lp);
          const float d = lp - lq;
          const float l = lg2(1.f + ex2(-fabsf(d)));
          gq[k] = lq > -kInf ? a * Q * ((1.f - s0) - fmaxf(d, 0.f) - l) : 0.f;
          gp[k] = lp > -kInf ? a * P * ((1.f - s1) - fmaxf(-d, 0.f) - l) : 0.f;
        }
      }
      if constexpr (GQ) L::store(dqr, int64_t(i) * N, gq);
      if constexpr (GP) L::store(dpr, int64_t(i) * N, gp);
    }
  }
}

template <typename F>
void with_type(mx::Dtype t, F&& f) {
  if (t == mx::float32) {
    f(float{});
  } else if (t == mx::float16) {
    f(__half{});
  } else if (t == mx::bfloat16) {
    f(__nv_bfloat16{});
  } else {
    throw std::invalid_argument("[divergence] unsupported dtype " + dtype_name(t));
  }
}

int forward_threads(int nvec) {
  int t = 32;
  while (t < 512 && t * 4 < nvec) {
    t *= 2;
  }
  return t;
}

template <typename T, bool VEC>
void launch_forward(Divergence kind, mx::cu::CommandEncoder& enc, const T* q, const T* p,
                    T* out, float* stats, int V, int64_t rows) {
  int nvec = V / Vec<T, VEC>::N;
  // At most 256 threads a row: measured on the H200 at 8192 x 151,936 bf16, KL forward
  // 1.48 ms against 1.57-1.61 ms with 512 and 2.25 ms with 1024 (JS: no difference).
  dim3 grid(static_cast<unsigned>(rows)), block(std::min(forward_threads(nvec), 256));
  auto k = kind == Divergence::KL ? divergence_forward<T, Divergence::KL, VEC>
                                  : divergence_forward<T, Divergence::JS, VEC>;
  cu::launch(enc, reinterpret_cast<const void*>(k), grid, block, 0u, q, p, out, stats, V);
}

// How a JS forward reads its rows once: clusters of `cluster` CTAs (0: the row does not
// fit, use the two-pass kernel), `threads` each, `smem` bytes of dynamic shared memory.
struct JsPlan {
  int cluster = 0;
  int threads = 0;
  unsigned smem = 0;
  int regs = 0; // chunks a thread a side in registers (js_forward_keep's K), 0: none
};

// js_forward_keep's register chunks: 72 registers of logits a thread at 128 threads.
constexpr int kJsRegChunks = 9;

// The half types keep their exps (js_forward_keep) unless MLX_TUNER_JS_KEEP=0 (read at
// every launch, as js_plan reads its settings).
bool js_keep() {
  const char* e = std::getenv("MLX_TUNER_JS_KEEP");
  return !(e && std::string(e) == "0");
}

// Dynamic shared memory a block may opt into, and a multiprocessor's, per device.
std::pair<int, int> smem_limits(int device) {
  static std::mutex mu;
  static std::map<int, std::pair<int, int>> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = cache.find(device); it != cache.end()) {
    return it->second;
  }
  int block = 0, sm = 0;
  cu::check(
      cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
      "cudaDeviceGetAttribute");
  cu::check(
      cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
      "cudaDeviceGetAttribute");
  return cache[device] = {block, sm};
}

// The smallest cluster whose CTAs each hold at most 1/k of a multiprocessor's shared
// memory (k CTAs per SM, so that some load while others compute), else the smallest within
// kJsSmemMax (one CTA per SM), else none (the two-pass kernel). C <= 16 (above 8, Hopper's
// non-portable sizes). The bound on a row's chunks holds for any offset.
// MLX_TUNER_JS_CTAS_PER_SM sets k (1 to 5; 4 and 5 also cap a CTA at 128 threads, so that
// they fit), 0 takes the two-pass kernel. Unset: k = 4 without the one-CTA-an-SM fallback,
// which measured slower than the two-pass kernel (float32 at 151,936: 7.2 against 4.6 ms on
// the H200). With four an SM, at 8192 rows of bfloat16 on the H200 (seventeenth session):
// 2.56 against 3.31 ms at V = 151,936 side by side; 0.69 and 2.25 ms at 32,000 and 131,072,
// where the two-pass kernel took 0.89 and 2.82 one call earlier; 2.29-2.40 ms at 151,936
// since the exchanges push (eighteenth). MLX_TUNER_JS_THREADS caps the threads of a
// CTA (a multiple of 32, at most kJsMaxThreads).
JsPlan js_plan(int V, int elem_bytes, int64_t rows, int device) {
  constexpr int64_t kJsSmemMax = 200 * 1024;
  constexpr int64_t kMargin = 4 * 1024; // static shared memory and the per-block reserve
  const char* env = std::getenv("MLX_TUNER_JS_CTAS_PER_SM");
  const int k = env ? std::min(std::atoi(env), 5) : 4;
  if (k <= 0 || 2 * int64_t(V) * elem_bytes > 16 * kJsSmemMax) {
    return {}; // the size test also keeps the int sums below safe
  }
  auto [block_limit, sm_limit] = smem_limits(device);
  const int N = 16 / elem_bytes;
  const int chunks = js_chunks(V, N - 1, N); // pad < N
  const int64_t hard = std::min<int64_t>(kJsSmemMax, block_limit - kMargin);
  const int64_t soft = std::min<int64_t>(hard, sm_limit / k - kMargin);
  // Four CTAs an SM: 128 threads (the fixed costs of a CTA's row spread over more pairs a
  // warp: 2.71 against 2.99 ms with 256 at 8192 x 151,936 bf16; 96 threads 2.97, 64
  // threads 3.31), else up to the kernel's launch bound.
  int max_threads = k >= 4 ? 128 : kJsMaxThreads;
  if (const char* e = std::getenv("MLX_TUNER_JS_THREADS")) {
    max_threads = std::clamp(std::atoi(e) / 32 * 32, 32, kJsMaxThreads);
  }
  // The half types' kept exps with part of each slice in registers (MLX_TUNER_JS_SPLIT=0:
  // all in shared memory): the smallest cluster whose shared part fits `soft`.
  const char* split = std::getenv("MLX_TUNER_JS_SPLIT");
  if (elem_bytes == 2 && max_threads == kJsKeepThreads && js_keep() &&
      !(split && std::string(split) == "0")) {
    for (int c : {1, 2, 4, 8, 16}) {
      const int regs = kJsRegChunks * kJsKeepThreads;
      const int64_t bytes = int64_t(2) * js_shared_per(chunks, c, regs) * 16;
      if (bytes <= soft && rows * c <= INT_MAX) {
        return {c, kJsKeepThreads, static_cast<unsigned>(bytes), kJsRegChunks};
      }
    }
  }
  for (int64_t limit : {soft, hard}) {
    for (int c : {1, 2, 4, 8, 16}) {
      const int per = js_per_cta(chunks, c);
      const int64_t bytes = int64_t(2) * per * 16;
      if (bytes <= limit && rows * c <= INT_MAX) {
        return {c, std::min(forward_threads(per), max_threads), static_cast<unsigned>(bytes)};
      }
    }
    if (!env) {
      break;
    }
  }
  return {};
}


// pick(std::integral_constant<int, C>) for the cluster size c (1, 2, 4, 8 or 16): the
// kernels are instantiated per C.
template <typename F>
const void* by_cluster(int c, F pick) {
  using std::integral_constant;
  return c == 1 ? pick(integral_constant<int, 1>{})
      : c == 2  ? pick(integral_constant<int, 2>{})
      : c == 4  ? pick(integral_constant<int, 4>{})
      : c == 8  ? pick(integral_constant<int, 8>{})
                : pick(integral_constant<int, 16>{});
}

template <typename T>
const void* js_kernel(int c, int regs) {
  if constexpr (!std::is_same_v<T, float>) {
    if (regs > 0) {
      return by_cluster(c, [](auto C) {
        return reinterpret_cast<const void*>(js_forward_keep<T, decltype(C)::value, kJsRegChunks>);
      });
    }
    if (js_keep()) {
      return by_cluster(c, [](auto C) {
        return reinterpret_cast<const void*>(js_forward_keep<T, decltype(C)::value>);
      });
    }
  }
  return by_cluster(c, [](auto C) {
    return reinterpret_cast<const void*>(js_forward_cluster<T, decltype(C)::value>);
  });
}

template <typename T>
void launch_js_cluster(
    mx::cu::CommandEncoder& enc,
    const JsPlan& plan,
    const T* q,
    const T* p,
    T* out,
    float* stats,
    int V,
    int64_t rows) {
  const int c = plan.cluster;
  const void* k = js_kernel<T>(c, plan.regs);
  dim3 grid(static_cast<unsigned>(rows * c)), block(plan.threads);
  cu::launch_cluster(enc, k, grid, block, dim3(c, 1, 1), plan.smem, q, p, out, stats, V);
}

template <typename T, Divergence K, bool VEC>
void launch_backward(mx::cu::CommandEncoder& enc, bool gq, bool gp, const T* q, const T* p,
                     const float* stats, const float* cot, T* dq, T* dp, int V,
                     int64_t rows) {
  int nvec = V / Vec<T, VEC>::N;
  constexpr int threads = 256;
  constexpr int per_block = threads * kBwdChunks;
  dim3 grid((nvec + per_block - 1) / per_block,
            static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  const void* k = gq && gp ? reinterpret_cast<const void*>(divergence_backward<T, K, VEC, true, true>)
      : gq ? reinterpret_cast<const void*>(divergence_backward<T, K, VEC, true, false>)
           : reinterpret_cast<const void*>(divergence_backward<T, K, VEC, false, true>);
  cu::launch(enc, k, grid, dim3(threads), 0u, q, p, stats, cot, dq, dp, V, rows);
}

} // namespace

void DivergenceForward::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  auto& enc = mx::cu::get_command_encoder(stream());
  enc.set_input_array(q);
  enc.set_input_array(p);
  cu::alloc_output(outputs[0], enc);
  cu::alloc_output(outputs[1], enc);
  int64_t rows = outputs[0].size();
  int V = q.shape(-1);
  if (rows == 0) {
    return;
  }
  with_type(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = gpu_ptr<T>(q);
    const T* pp = gpu_ptr<T>(p);
    T* out = gpu_ptr<T>(outputs[0]);
    float* st = gpu_ptr<float>(outputs[1]);
    if (kind_ == Divergence::JS && enc.device().compute_capability_major() >= 9 &&
        (reinterpret_cast<uintptr_t>(qp) - reinterpret_cast<uintptr_t>(pp)) % 16 == 0) {
      JsPlan plan = js_plan(V, sizeof(T), rows, enc.device().cuda_device());
      if (plan.cluster > 0) {
        launch_js_cluster<T>(enc, plan, qp, pp, out, st, V, rows);
        return;
      }
    }
    bool vec = (size_t(V) * sizeof(T)) % 16 == 0 && aligned16(qp) && aligned16(pp);
    if (vec) {
      launch_forward<T, true>(kind_, enc, qp, pp, out, st, V, rows);
    } else {
      launch_forward<T, false>(kind_, enc, qp, pp, out, st, V, rows);
    }
  });
}

void DivergenceBackward::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  const auto& stats = inputs[2];
  const auto& cot = inputs[3];
  auto& enc = mx::cu::get_command_encoder(stream());
  for (const auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& o : outputs) {
    cu::alloc_output(o, enc);
  }
  int64_t rows = cot.size();
  int V = q.shape(-1);
  if (rows == 0) {
    return;
  }
  with_type(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = gpu_ptr<T>(q);
    const T* pp = gpu_ptr<T>(p);
    T* dq = grad_q_ ? gpu_ptr<T>(outputs[0]) : nullptr;
    T* dp = grad_p_ ? gpu_ptr<T>(outputs[grad_q_ ? 1 : 0]) : nullptr;
    const float* st = gpu_ptr<float>(stats);
    const float* c = gpu_ptr<float>(cot);
    bool vec = (size_t(V) * sizeof(T)) % 16 == 0 && aligned16(qp) && aligned16(pp);
    auto go = [&](auto kind_tag, auto vec_tag) {
      constexpr Divergence K = decltype(kind_tag)::value;
      constexpr bool VEC = decltype(vec_tag)::value;
      launch_backward<T, K, VEC>(enc, grad_q_, grad_p_, qp, pp, st, c, dq, dp, V, rows);
    };
    using KL = std::integral_constant<Divergence, Divergence::KL>;
    using JS = std::integral_constant<Divergence, Divergence::JS>;
    if (kind_ == Divergence::KL) {
      vec ? go(KL{}, std::true_type{}) : go(KL{}, std::false_type{});
    } else {
      vec ? go(JS{}, std::true_type{}) : go(JS{}, std::false_type{});
    }
  });
}

} // namespace mlx_tuner
