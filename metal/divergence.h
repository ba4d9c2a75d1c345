// KL / JS divergence Metal kernels (maths: csrc/ops/divergence.h); divergence.metal
// instantiates them. One threadgroup per row. Forward: each thread streams kReads
// consecutive elements per sweep keeping online (max, sum-exp) states, merged through
// simdgroup shuffles and then threadgroup memory; every phase has its own threadgroup
// array, written once and read after a barrier, so there is no write-after-read race
// (mlx-lm's kernel reuses one array without a barrier). Backward: elementwise.
// Masked (-inf) logits are detected by comparison with -FLT_MAX and maxima start at
// -FLT_MAX, so nothing relies on infinities surviving the Metal compiler's fast math.
#pragma once

// Shared with the host (csrc/ops/divergence.cpp computes the launch from these).
namespace divergence_metal {
constexpr int kReads = 4; // consecutive elements per thread per sweep
constexpr int kSimd = 32; // simdgroup width
constexpr int kMaxThreads = 1024; // threads per threadgroup (one row per threadgroup)
} // namespace divergence_metal

#ifdef __METAL_VERSION__

#include <metal_stdlib>

using namespace metal;

namespace divergence_metal {

constant constexpr float kLow = -3.402823466e38f; // -FLT_MAX: the start of every maximum
constant constexpr float kLn2 = 0.693147180559945309f;
constant constexpr int kStats = 6; // = kDivStats in csrc/ops/divergence.h

inline bool live(float x) {
  return x > kLow;
}

// Online state: max m, s = sum exp(x - m), t = sum exp(x - m) w.
struct Online {
  float m;
  float s;
  float t;
  void merge(float m2, float s2, float t2) {
    float mn = max(m, m2);
    float f1 = exp(m - mn), f2 = exp(m2 - mn);
    s = s * f1 + s2 * f2;
    t = t * f1 + t2 * f2;
    m = mn;
  }
};

// Threadgroup-wide merge; `sm` (3 * kSimd floats) is used by this call only.
inline Online group_merge(Online o, threadgroup float* sm, uint lane, uint sg, uint nsg) {
  for (ushort d = kSimd / 2; d > 0; d /= 2) {
    o.merge(simd_shuffle_xor(o.m, d), simd_shuffle_xor(o.s, d), simd_shuffle_xor(o.t, d));
  }
  if (lane == 0) {
    sm[sg] = o.m;
    sm[kSimd + sg] = o.s;
    sm[2 * kSimd + sg] = o.t;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  Online r = {kLow, 0.0f, 0.0f};
  for (uint w = 0; w < nsg; ++w) {
    r.merge(sm[w], sm[kSimd + w], sm[2 * kSimd + w]);
  }
  return r;
}

inline float group_sum(float x, threadgroup float* sm, uint lane, uint sg, uint nsg) {
  x = simd_sum(x);
  if (lane == 0) {
    sm[sg] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = 0.0f;
  for (uint w = 0; w < nsg; ++w) {
    r += sm[w];
  }
  return r;
}

// lp - lm and lq - lm from u = lp - lq (see the CPU kernel). Masked log-probs are
// clamped to -1e30 first so that no infinity enters the arithmetic.
inline void js_terms(float lp, float lq, thread float& dp, thread float& dq) {
  float u = max(lp, -1e30f) - max(lq, -1e30f);
  float L = log(1.0f + exp(-abs(u)));
  dp = kLn2 - max(-u, 0.0f) - L;
  dq = kLn2 - max(u, 0.0f) - L;
}

// kReads elements from index i, -FLT_MAX past the end.
template <typename T>
inline void load(const device T* row, int i, int V, thread float* x) {
  for (int k = 0; k < kReads; ++k) {
    x[k] = i + k < V ? float(row[i + k]) : kLow;
  }
}

} // namespace divergence_metal

using namespace divergence_metal;

template <typename T, int KIND> // KIND: 0 = KL, 1 = JS
[[kernel]] void divergence_forward(
    const device T* q [[buffer(0)]],
    const device T* p [[buffer(1)]],
    device T* out [[buffer(2)]],
    device float* stats [[buffer(3)]],
    constant int& V [[buffer(4)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint3 tid3 [[thread_position_in_threadgroup]],
    uint3 ntg3 [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float sm_q[3 * kSimd];
  threadgroup float sm_p[3 * kSimd];
  threadgroup float sm_kq[kSimd];
  threadgroup float sm_kp[kSimd];
  const uint tid = tid3.x, ntg = ntg3.x, nsg = (ntg + kSimd - 1) / kSimd;
  const size_t row = tg.x;
  const device T* qr = q + row * size_t(V);
  const device T* pr = p + row * size_t(V);
  Online oq = {kLow, 0.0f, 0.0f}, op = {kLow, 0.0f, 0.0f};
  for (int i = int(tid) * kReads; i < V; i += int(ntg) * kReads) {
    float xq[kReads], xp[kReads];
    load(qr, i, V, xq);
    load(pr, i, V, xp);
    float bq = xq[0], bp = xp[0];
    for (int k = 1; k < kReads; ++k) {
      bq = max(bq, xq[k]);
      bp = max(bp, xp[k]);
    }
    if (bq > oq.m) {
      oq.s *= exp(oq.m - bq);
      oq.m = bq;
    }
    if (bp > op.m) {
      float f = exp(op.m - bp);
      op.s *= f;
      op.t *= f;
      op.m = bp;
    }
    for (int k = 0; k < kReads; ++k) {
      float eq = live(xq[k]) ? exp(xq[k] - oq.m) : 0.0f;
      float ep = live(xp[k]) ? exp(xp[k] - op.m) : 0.0f;
      oq.s += eq;
      op.s += ep;
      if (KIND == 0) {
        op.t += live(xp[k]) ? ep * (xp[k] - xq[k]) : 0.0f;
      }
    }
  }
  oq = group_merge(oq, sm_q, lane, sg, nsg);
  op = group_merge(op, sm_p, lane, sg, nsg);
  const float lsq = log(oq.s), lsp = log(op.s);
  float s0, s1 = 0.0f, div;
  if (KIND == 0) {
    s0 = op.t / op.s + ((oq.m - op.m) + (lsq - lsp));
    div = s0;
  } else {
    float klq = 0.0f, klp = 0.0f;
    for (int i = int(tid) * kReads; i < V; i += int(ntg) * kReads) {
      float xq[kReads], xp[kReads];
      load(qr, i, V, xq);
      load(pr, i, V, xp);
      for (int k = 0; k < kReads; ++k) {
        float lq = (xq[k] - oq.m) - lsq, lp = (xp[k] - op.m) - lsp;
        float dp, dq;
        js_terms(lp, lq, dp, dq);
        klq += live(xq[k]) ? exp(lq) * dq : 0.0f;
        klp += live(xp[k]) ? exp(lp) * dp : 0.0f;
      }
    }
    s0 = group_sum(klq, sm_kq, lane, sg, nsg);
    s1 = group_sum(klp, sm_kp, lane, sg, nsg);
    div = 0.5f * (s0 + s1);
  }
  if (tid == 0) {
    device float* st = stats + row * kStats;
    st[0] = oq.m;
    st[1] = lsq;
    st[2] = op.m;
    st[3] = lsp;
    st[4] = s0;
    st[5] = s1;
    out[row] = T(div);
  }
}

// dq / dp (only those requested) of one row per threadgroup, given the forward's stats.
template <typename T, int KIND, bool GQ, bool GP>
[[kernel]] void divergence_backward(
    const device T* q [[buffer(0)]],
    const device T* p [[buffer(1)]],
    const device float* stats [[buffer(2)]],
    const device float* cot [[buffer(3)]],
    device T* dq [[buffer(4)]],
    device T* dp [[buffer(5)]],
    constant int& V [[buffer(6)]],
    uint3 tg [[threadgroup_position_in_grid]],
    uint3 tid3 [[thread_position_in_threadgroup]],
    uint3 ntg3 [[threads_per_threadgroup]]) {
  const size_t row = tg.x;
  const device float* st = stats + row * kStats;
  const float mq = st[0], lsq = st[1], mp = st[2], lsp = st[3], s0 = st[4], s1 = st[5];
  const float c = cot[row];
  const float hc = KIND == 1 ? 0.5f * c : c;
  const size_t off = row * size_t(V);
  for (int i = int(tid3.x); i < V; i += int(ntg3.x)) {
    float xq = float(q[off + i]), xp = float(p[off + i]);
    float lq = (xq - mq) - lsq, lp = (xp - mp) - lsp;
    float P = live(xp) ? exp(lp) : 0.0f;
    float Q = live(xq) ? exp(lq) : 0.0f;
    float gq, gp;
    if (KIND == 0) {
      gq = c * (Q - P);
      gp = live(xp) ? c * P * ((lp - lq) - s0) : 0.0f;
    } else {
      float tp, tq;
      js_terms(lp, lq, tp, tq);
      gq = live(xq) ? hc * Q * (tq - s0) : 0.0f;
      gp = live(xp) ? hc * P * (tp - s1) : 0.0f;
    }
    if (c == 0.0f) { // a masked padding row, whose logits may be all -inf
      gq = 0.0f;
      gp = 0.0f;
    }
    if (GQ) {
      dq[off + i] = T(gq);
    }
    if (GP) {
      dp[off + i] = T(gp);
    }
  }
}

#endif // __METAL_VERSION__
