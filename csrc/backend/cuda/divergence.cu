// CUDA kernels of the KL / JS divergence (maths: csrc/ops/divergence.h).
//
// Forward: one block per row. KL is one pass over the row: each thread keeps online
// (max, sum-exp) for q and p plus sum exp(a - max_p)(a - b), rescaled when its maximum
// grows; the block merges the partial states. JS needs the normalizers before its
// terms, so it reads the row twice. Backward: elementwise given the saved stats, a 2-D
// grid of (chunks of a row, rows). Loads are 16-byte vectors when both rows are
// 16-byte aligned (V * sizeof(T) % 16 == 0), scalar otherwise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/cuda/common.cuh"
#include "ops/divergence.h"

namespace mlx_tuner {

namespace {

namespace cu = mlx_tuner::cuda;
constexpr float kInf = __builtin_huge_valf();
constexpr float kLn2 = 0.693147180559945309f;
constexpr int kMaxWarps = 32;

__device__ __forceinline__ float to_f(float x) {
  return x;
}
__device__ __forceinline__ float to_f(__half x) {
  return __half2float(x);
}
__device__ __forceinline__ float to_f(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// N consecutive elements from index i of a row: one 16-byte load when VEC.
template <typename T, bool VEC>
struct Vec {
  static constexpr int N = VEC ? 16 / sizeof(T) : 1;
  __device__ __forceinline__ static void load(const T* row, int64_t i, float* out) {
    if constexpr (VEC) {
      alignas(16) T v[N];
      *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(row + i));
#pragma unroll
      for (int k = 0; k < N; ++k) {
        out[k] = to_f(v[k]);
      }
    } else {
      out[0] = to_f(row[i]);
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
  constexpr int N = L::N;
  const int nvec = V / N;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nvec) {
    return;
  }
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float* st = stats + row * kDivStats;
    float mq = st[kMaxQ], lsq = st[kLogSumQ], mp = st[kMaxP], lsp = st[kLogSumP];
    if constexpr (K == Divergence::JS) { // a fully masked input: l = -inf (no mass), not NaN
      lsq = mq == -kInf ? kInf : lsq;
      lsp = mp == -kInf ? kInf : lsp;
      mq = safe(mq);
      mp = safe(mp);
    }
    const float c = cot[row];
    const float hc = K == Divergence::JS ? 0.5f * c : c;
    float xq[N], xp[N], gq[N], gp[N];
    L::load(q + row * V, int64_t(i) * N, xq);
    L::load(p + row * V, int64_t(i) * N, xp);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      float lq = (xq[k] - mq) - lsq, lp = (xp[k] - mp) - lsp;
      float P = __expf(lp);
      if constexpr (K == Divergence::KL) {
        gq[k] = c * (__expf(lq) - P);
        gp[k] = lp > -kInf ? c * P * ((lp - lq) - st[kS0]) : 0.f;
      } else {
        float tp, tq;
        js_terms(lp - lq, tp, tq);
        gq[k] = lq > -kInf ? hc * __expf(lq) * (tq - st[kS0]) : 0.f;
        gp[k] = lp > -kInf ? hc * P * (tp - st[kS1]) : 0.f;
      }
      if (c == 0.f) { // a masked padding row, whose logits may be all -inf
        gq[k] = 0.f;
        gp[k] = 0.f;
      }
    }
    if constexpr (GQ) {
      L::store(dq + row * V, int64_t(i) * N, gq);
    }
    if constexpr (GP) {
      L::store(dp + row * V, int64_t(i) * N, gp);
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

bool aligned16(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
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
  dim3 grid(static_cast<unsigned>(rows)), block(forward_threads(nvec));
  auto k = kind == Divergence::KL ? divergence_forward<T, Divergence::KL, VEC>
                                  : divergence_forward<T, Divergence::JS, VEC>;
  cu::launch(enc, reinterpret_cast<const void*>(k), grid, block, 0u, q, p, out, stats, V);
}

template <typename T, Divergence K, bool VEC>
void launch_backward(mx::cu::CommandEncoder& enc, bool gq, bool gp, const T* q, const T* p,
                     const float* stats, const float* cot, T* dq, T* dp, int V,
                     int64_t rows) {
  int nvec = V / Vec<T, VEC>::N;
  constexpr int threads = 256;
  dim3 grid((nvec + threads - 1) / threads, static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
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
