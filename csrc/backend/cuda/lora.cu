// CUDA kernels of the fused LoRA linear (maths in csrc/ops/lora.h). On Hopper, for
// bfloat16, y = x W^T + s xa B and dx = dy W + s g A^T are each one GEMM of ours
// (lora_gemm.cuh) in which the rank-r term is one more k step of the main loop, and xa or
// g is made by the same GEMM (without dropout: from the x or dy it reads). Elsewhere
// the big products are cuBLASLt matmuls captured into MLX's CUDA graph (the encoder's
// capture context); the rank-r term is written first and the base GEMM accumulates into it
// (beta = 1), so there is no (N, out) temporary and no separate add pass. cuBLASLt needs
// matching input types: one small kernel narrows A and B to the compute dtype T, and
// xa = x_d A and g = dy B^T are written in T directly (float32 accumulation inside the
// GEMM); gradients of float32 LoRA parameters come out in float32.
// x, W, bias, x_d arrive in T (the op casts them on the GPU); A, B in T or float32.
#include <tuple>

#include "backend/cuda/gemm.cuh"
#include "backend/cuda/lora.cuh"
#include "backend/cuda/lowrank.cuh"
#include "ops/lora.h"

namespace mlx_tuner {

namespace {

using cuda::as_dtype;
using cuda::check;
using cuda::gemm;
using cuda::scratch;

void alloc(mx::array& a, mx::cu::CommandEncoder& enc) {
  cuda::alloc_output(a, enc);
}

} // namespace

void LoRALinear::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cuda::HostTimer timer("lora_linear");
  auto& enc = mx::cu::get_command_encoder(stream());
  const mx::array* bias = has_bias_ ? &inputs[4] : nullptr;
  const mx::array* xd = has_xd_ ? &inputs[has_bias_ ? 5 : 4] : nullptr;
  alloc(outputs[0], enc);
  alloc(outputs[1], enc);
  cuda::lora_forward(enc, inputs[0], inputs[1], inputs[2], inputs[3], bias, xd, scale_,
                     outputs[0], outputs[1]);
}

namespace cuda {

void lora_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                  const mx::array& a, const mx::array& b, const mx::array* bias,
                  const mx::array* xd_in, float s, mx::array& y, mx::array& xa) {
  const auto& xd = xd_in ? *xd_in : x;
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  if (n == 0) return;
  auto T = x.dtype();
  if (cuda::lowrank_fits(r, T, {in, out}, {&xd})) { // the rank-r products as kernels of ours
    if (cuda::lora_gemm_fits(enc, T, in, out, {&x, &w, &y})) {
      // Hopper: the rank-r term as one more k step of our own GEMM (lora_gemm.cuh): no
      // pass writes s xa B into y for the base GEMM to read back.
      lora_gemm_forward(enc, x, w, xd_in, lora_gemm_pack(enc, T, a, b, s), bias, nullptr, y, xa);
      return;
    }
    // A (in, r) and B (r, out) packed for them in one launch.
    auto m = cuda::lowrank_pack(enc, T, {{a, r, 1, in, r, true}, {b, out, 1, r, out, false}});
    cuda::lowrank_project(enc, xd, m[0], r, 1.0f, xa);
    cuda::lowrank_expand(enc, xa, m[1], s, bias, y);
    gemm(enc, {false, true, n, out, in, T, T, T}, 1.0f, x, w, 1.0f, y);
    return;
  }
  auto [a_t, b_t] = as_dtype(enc, a, b, T);
  // xa = x_d A, saved in T (the op gives it T's dtype on CUDA): the backward's products
  // take it in T anyway.
  cuda::GemmBatch batch(enc); // the three GEMMs as one graph node
  gemm(enc, {false, false, n, r, in, T, T, T}, 1.0f, xd, a_t, 0.0f, xa);
  // y = s xa B (+ bias) first, then the base GEMM accumulates into it (beta = 1): the
  // compute-bound GEMM reads the rank-r term in its epilogue almost for free.
  gemm(enc, {false, false, n, out, r, T, T, T}, s, xa, b_t, 0.0f, y, bias);
  gemm(enc, {false, true, n, out, in, T, T, T}, 1.0f, x, w, 1.0f, y);
}

std::vector<mx::array> lora_gemm_pack(mx::cu::CommandEncoder& enc, mx::Dtype t,
                                      const mx::array& a, const mx::array& b, float s) {
  int in = a.shape(0), r = a.shape(1), out = b.shape(1);
  return lowrank_pack(enc, t, {{a, r, 1, in, r, true}, {b, out, 1, r, out, false, kLowRankPad, s}});
}

void lora_gemm_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                       const mx::array* xd, const std::vector<mx::array>& packed,
                       const mx::array* bias, const mx::array* col_scale, mx::array& y,
                       mx::array& xa) {
  if (!xd && rank_in_gemm()) { // xa = x A made by the GEMM itself
    lora_gemm(enc, x, w, {packed[0], &xa}, packed[1], bias, y, false, col_scale);
    return;
  }
  auto xa_pad = scratch(enc, {x.shape(0), kLowRankPad}, x.dtype());
  lowrank_project(enc, xd ? *xd : x, packed[0], xa.shape(1), 1.0f, xa, &xa_pad);
  lora_gemm(enc, x, w, {xa_pad}, packed[1], bias, y, false, col_scale);
}

void lora_backward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                   const mx::array& a, const mx::array& b, const mx::array& xa,
                   const mx::array& dy, const mx::array* xd_in, float s,
                   const LoRAGradOut& grads) {
  const bool has_xd = xd_in != nullptr;
  const auto& xd = has_xd ? *xd_in : x;
  mx::array *dx = grads.x, *da = grads.a, *db = grads.b, *dxd = grads.x_dropped;
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  auto T = x.dtype();
  if (n == 0) { // empty batch: the parameter gradients are zeros
    for (auto* o : {da, db}) {
      if (o) check(cudaMemsetAsync(gpu_ptr<void>(*o), 0, o->nbytes(), enc.stream()), "memset");
    }
    return;
  }
  bool lora_into_dx = dx && !has_xd;
  bool need_g = da || dxd || lora_into_dx;
  // dA = s x_d^T g (in, r); dB = s xa^T dy (r, out): one reduce launch for both, and a
  // finish launch unless a pack came first to zero the reduce's counters.
  // g is read for dA only (it is computed whenever dA is asked for).
  auto reduce = [&](const mx::array* g, mx::array* counters) {
    std::vector<cuda::ReduceJob> jobs;
    if (da) jobs.push_back({xd, *g, *da, r, 1, s});
    if (db) jobs.push_back({dy, xa, *db, 1, out, s});
    cuda::lowrank_reduce(enc, jobs, counters);
  };
  if (cuda::lowrank_fits(r, T, {in, out}, {&dy, &xd})) { // rank-r products as kernels of ours
    std::optional<mx::array> g_t, counters;
    std::vector<mx::array> m;
    if (need_g && (da || db)) { // zeroed by the pack below
      counters = cuda::reduce_counters(enc, std::max(in, out));
    }
    mx::array* cnt = counters ? &*counters : nullptr;
    if (lora_into_dx && cuda::lora_gemm_fits(enc, T, in, out, {&dy, &w, dx})) {
      // Hopper: dx = dy W + s g A^T as one GEMM of ours with the rank-r k step (as the
      // forward); g = dy B^T made by that GEMM, or by project (also into g_pad for it).
      m = cuda::lowrank_pack(enc, T, {{b, 1, out, out, r, true},
                                      {a, 1, r, r, in, false, cuda::kLowRankPad, s}}, cnt);
      g_t = scratch(enc, {n, r}, T);
      if (cuda::rank_in_gemm()) { // g = dy B^T made by the GEMM itself
        cuda::lora_gemm(enc, dy, w, {m[0], &*g_t}, m[1], nullptr, *dx, true);
      } else {
        auto g_pad = scratch(enc, {n, cuda::kLowRankPad}, T);
        cuda::lowrank_project(enc, dy, m[0], r, 1.0f, *g_t, &g_pad);
        cuda::lora_gemm(enc, dy, w, {g_pad}, m[1], nullptr, *dx, true);
      }
      reduce(&*g_t, cnt);
      return;
    }
    if (need_g) { // g = dy B^T, B^T (out, r) and A^T (r, in) packed in one launch
      if (lora_into_dx || dxd) {
        m = cuda::lowrank_pack(enc, T, {{b, 1, out, out, r, true}, {a, 1, r, r, in, false}}, cnt);
      } else {
        m = cuda::lowrank_pack(enc, T, {{b, 1, out, out, r, true}}, cnt);
      }
      g_t = scratch(enc, {n, r}, T);
      cuda::lowrank_project(enc, dy, m[0], r, 1.0f, *g_t);
    }
    if (dx) { // dx = s g A^T first, then dy W accumulated into it
      if (lora_into_dx) cuda::lowrank_expand(enc, *g_t, m[1], s, nullptr, *dx);
      gemm(enc, {false, false, n, in, out, T, T, T}, 1.0f, dy, w, lora_into_dx ? 1.0f : 0.0f, *dx);
    }
    if (dxd) cuda::lowrank_expand(enc, *g_t, m[1], s, nullptr, *dxd);
    reduce(g_t ? &*g_t : nullptr, cnt);
    return;
  }
  std::optional<mx::array> g_t, a_t, b_t;
  if (need_g) {
    std::tie(a_t, b_t) = as_dtype(enc, a, b, T);
    g_t = scratch(enc, {n, r}, T);
  }
  cuda::GemmBatch batch(enc); // every GEMM below as one graph node
  if (need_g) { // g = dy B^T (float32 accumulate, stored in T for the next products)
    gemm(enc, {false, true, n, r, out, T, T, T}, 1.0f, dy, *b_t, 0.0f, *g_t);
  }
  if (dx) { // dx = s g A^T first, then dy W accumulated into the same buffer
    if (lora_into_dx) {
      gemm(enc, {false, true, n, in, r, T, T, T}, s, *g_t, *a_t, 0.0f, *dx);
    }
    gemm(enc, {false, false, n, in, out, T, T, T}, 1.0f, dy, w, lora_into_dx ? 1.0f : 0.0f, *dx);
  }
  if (dxd) {
    gemm(enc, {false, true, n, in, r, T, T, T}, s, *g_t, *a_t, 0.0f, *dxd);
  }
  if (da) { // dA = s x_d^T g, in A's dtype (float32 for mlx-lm's LoRA parameters)
    gemm(enc, {true, false, in, r, n, T, T, da->dtype()}, s, xd, *g_t, 0.0f, *da);
  }
  if (db) { // dB = s xa^T dy (xa is saved in T)
    gemm(enc, {true, false, r, out, n, T, T, db->dtype()}, s, xa, dy, 0.0f, *db);
  }
}

} // namespace cuda

void LoRALinearVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cuda::HostTimer timer("lora_linear_vjp");
  auto& enc = mx::cu::get_command_encoder(stream());
  if (grads_.weight || grads_.bias) {
    throw std::logic_error("[lora_linear] dW and dbias are plain MLX ops on the GPU");
  }
  for (auto& o : outputs) alloc(o, enc);
  auto g = grads_.pointers(outputs);
  cuda::lora_backward(enc, inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5],
                      has_xd_ ? &inputs[6] : nullptr, scale_,
                      {g.x, g.x_dropped, g.lora_a, g.lora_b});
}

} // namespace mlx_tuner
