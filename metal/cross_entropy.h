// Metal kernels of linear_cross_entropy (maths: csrc/ops/cross_entropy.h). One threadgroup
// of LCE_THREADS threads per token (forward, dh) or per vocabulary row (dW, db); logits are
// recomputed on the fly as dot products and never stored beyond one threadgroup's slice.
//   forward: each thread keeps an online (max, sum) over its vocabulary rows, merged by
//            simdgroup then threadgroup reductions; the target logit is picked on the way.
//   dh     : per block of LCE_THREADS vocabulary rows, G = g (softmax − onehot) goes to
//            threadgroup memory, then each thread adds G · W into its columns of dh.
//   dW, db : the same over blocks of tokens, per vocabulary row.
// Accumulation in float32 (acc buffers), the last block writes the T outputs.
#pragma once

#include <metal_stdlib>

using namespace metal;

// Must equal kLceMetalThreads in csrc/ops/cross_entropy.h (the host's launch).
constant constexpr int LCE_THREADS = 256;
constant constexpr int LCE_SIMDS = LCE_THREADS / 32;

// Both reductions end with a barrier so that `buf` can be reused right away.
inline float lce_tg_sum(float x, threadgroup float* buf, uint sg, uint lane) {
  x = simd_sum(x);
  if (lane == 0) {
    buf[sg] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = 0.0f;
  for (int i = 0; i < LCE_SIMDS; ++i) {
    r += buf[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

inline float lce_tg_max(float x, threadgroup float* buf, uint sg, uint lane) {
  x = simd_max(x);
  if (lane == 0) {
    buf[sg] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = buf[0];
  for (int i = 1; i < LCE_SIMDS; ++i) {
    r = max(r, buf[i]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

template <typename T>
inline float lce_logit(device const T* h, device const T* W, device const T* bias,
                       int has_bias, int n, int v, int d) {
  device const T* hn = h + size_t(n) * d;
  device const T* wv = W + size_t(v) * d;
  float z = 0.0f;
  for (int k = 0; k < d; ++k) {
    z += float(hn[k]) * float(wv[k]);
  }
  return has_bias ? z + float(bias[v]) : z;
}

template <typename T>
[[kernel]] void lce_forward(
    device const T* h [[buffer(0)]],
    device const T* W [[buffer(1)]],
    device const T* bias [[buffer(2)]],
    device const int* y [[buffer(3)]],
    device float* loss [[buffer(4)]],
    device float* lse [[buffer(5)]],
    constant int& d [[buffer(6)]],
    constant int& V [[buffer(7)]],
    constant int& has_bias [[buffer(8)]],
    uint n [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float buf[LCE_SIMDS];
  const int target = y[n];
  float m = -INFINITY, s = 0.0f, t = 0.0f;
  for (int v = tid; v < V; v += LCE_THREADS) {
    float z = lce_logit(h, W, bias, has_bias, n, v, d);
    if (z > m) {
      s = s * exp(m - z) + 1.0f;
      m = z;
    } else {
      s += exp(z - m);
    }
    if (v == target) {
      t = z;
    }
  }
  const float M = lce_tg_max(m, buf, sg, lane);
  const float S = lce_tg_sum(m == -INFINITY ? 0.0f : s * exp(m - M), buf, sg, lane);
  const float zt = lce_tg_sum(t, buf, sg, lane);
  if (tid == 0) {
    float l = M + log(S);
    lse[n] = l;
    loss[n] = (target >= 0 && target < V) ? l - zt : 0.0f;
  }
}

template <typename T>
[[kernel]] void lce_backward_dh(
    device const T* h [[buffer(0)]],
    device const T* W [[buffer(1)]],
    device const T* bias [[buffer(2)]],
    device const int* y [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* g [[buffer(5)]],
    device float* acc [[buffer(6)]],
    device T* dh [[buffer(7)]],
    constant int& d [[buffer(8)]],
    constant int& V [[buffer(9)]],
    constant int& has_bias [[buffer(10)]],
    uint n [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float G[LCE_THREADS];
  const int target = y[n];
  const float gn = (target >= 0 && target < V) ? g[n] : 0.0f;
  device float* an = acc + size_t(n) * d;
  device T* out = dh + size_t(n) * d;
  if (gn == 0.0f) { // masked or ignored token: uniform over the threadgroup
    for (int c = tid; c < d; c += LCE_THREADS) {
      out[c] = T(0.0f);
    }
    return;
  }
  const float l = lse[n];
  for (int v0 = 0; v0 < V; v0 += LCE_THREADS) {
    const int v = v0 + tid;
    float gv = 0.0f;
    if (v < V) {
      gv = gn * exp(lce_logit(h, W, bias, has_bias, n, v, d) - l) - (v == target ? gn : 0.0f);
    }
    G[tid] = gv;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int vb = min(LCE_THREADS, V - v0);
    const bool last = v0 + LCE_THREADS >= V;
    for (int c = tid; c < d; c += LCE_THREADS) {
      float a = v0 == 0 ? 0.0f : an[c];
      for (int j = 0; j < vb; ++j) {
        a += G[j] * float(W[size_t(v0 + j) * d + c]);
      }
      if (last) {
        out[c] = T(a);
      } else {
        an[c] = a;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup); // G is rewritten next block
  }
}

template <typename T>
[[kernel]] void lce_backward_dw(
    device const T* h [[buffer(0)]],
    device const T* W [[buffer(1)]],
    device const T* bias [[buffer(2)]],
    device const int* y [[buffer(3)]],
    device const float* lse [[buffer(4)]],
    device const float* g [[buffer(5)]],
    device float* acc [[buffer(6)]],
    device T* dw [[buffer(7)]],
    device T* db [[buffer(8)]],
    constant int& N [[buffer(9)]],
    constant int& d [[buffer(10)]],
    constant int& V [[buffer(11)]],
    constant int& has_bias [[buffer(12)]],
    constant int& want_dw [[buffer(13)]],
    constant int& want_db [[buffer(14)]],
    uint v [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float G[LCE_THREADS];
  threadgroup float buf[LCE_SIMDS];
  device float* av = acc + size_t(v) * d;
  device T* out = dw + size_t(v) * d;
  float bsum = 0.0f;
  for (int n0 = 0; n0 < N; n0 += LCE_THREADS) {
    const int n = n0 + tid;
    float gv = 0.0f;
    if (n < N) {
      const int target = y[n];
      const float gn = (target >= 0 && target < V) ? g[n] : 0.0f;
      if (gn != 0.0f) {
        float z = lce_logit(h, W, bias, has_bias, n, int(v), d);
        gv = gn * exp(z - lse[n]) - (int(v) == target ? gn : 0.0f);
      }
    }
    G[tid] = gv;
    bsum += gv;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const int nb = min(LCE_THREADS, N - n0);
    const bool last = n0 + LCE_THREADS >= N;
    for (int c = tid; want_dw && c < d; c += LCE_THREADS) {
      float a = n0 == 0 ? 0.0f : av[c];
      for (int j = 0; j < nb; ++j) {
        a += G[j] * float(h[size_t(n0 + j) * d + c]);
      }
      if (last) {
        out[c] = T(a);
      } else {
        av[c] = a;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float total = lce_tg_sum(bsum, buf, sg, lane);
  if (want_db && tid == 0) {
    db[v] = T(total);
  }
}
