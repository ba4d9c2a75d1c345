// KL and JS divergence between two sets of logits, per row, as MLX primitives.
//
// q = student logits, p = teacher logits, rows of length V. With a = p, b = q,
// lp = a - lse(a), lq = b - lse(b), P = exp(lp), Q = exp(lq), lm = log((P + Q) / 2):
//   KL   = sum P (lp - lq)                    dKL/db = Q - P
//                                             dKL/da = P (lp - lq - KL)
//   JS   = (KLp + KLq) / 2,  KLp = sum P (lp - lm),  KLq = sum Q (lq - lm)
//                                             dJS/db = Q (lq - lm - KLq) / 2
//                                             dJS/da = P (lp - lm - KLp) / 2
// The forward saves per row (float32) what the backward needs to be one pass:
// stats[r] = {max_q, log sum exp(b - max_q), max_p, log sum exp(a - max_p), s0, s1}
// with s0 = KL (KL) or KLq (JS), s1 = 0 (KL) or KLp (JS). Keeping max and log-sum apart
// keeps lp - lq exact for huge logits: (a - b) + (max_q - max_p) + (logS_q - logS_p).
// The "max" slots hold the offset the sums were taken from: the row maximum, except in
// the CPU's AVX-512 half-precision JS, which may keep a sampled maximum that did not
// overflow (csrc/backend/cpu/divergence.cpp); the backward only needs an offset.
// Header shared with nvcc: never include mlx/ops.h here (GPU.md).
#pragma once

#include <string>

#include "common/metal_launch.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace mx = mlx::core;

enum class Divergence : int { KL = 0, JS = 1 };

constexpr int kDivStats = 6; // floats of per-row state saved by the forward

// Element order of the saved per-row state.
enum DivStat : int { kMaxQ = 0, kLogSumQ, kMaxP, kLogSumP, kS0, kS1 };

inline const char* divergence_op_name(Divergence k) {
  return k == Divergence::KL ? "kl_div" : "js_div";
}

// Public ops: per-row divergence of shape q.shape[:-1] in the promoted input dtype.
mx::array kl_div(const mx::array& q, const mx::array& p, mx::StreamOrDevice s = {});
mx::array js_div(const mx::array& q, const mx::array& p, mx::StreamOrDevice s = {});
mx::array divergence(
    Divergence kind,
    const mx::array& q,
    const mx::array& p,
    mx::StreamOrDevice s = {});

// Inputs {q, p} (same dtype, row-contiguous); outputs {div (rows...), stats (rows..., 6) f32}.
class DivergenceForward : public mx::Primitive {
 public:
  DivergenceForward(mx::Stream stream, Divergence kind)
      : mx::Primitive(stream), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return kind_ == Divergence::KL ? "KLDivForward" : "JSDivForward";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  Divergence kind() const {
    return kind_;
  }

 private:
  Divergence kind_;
};

// Inputs {q, p, stats, cotangent (rows...) f32}; outputs {dq if grad_q}{dp if grad_p},
// each in the dtype of q, shaped like q. One pass over q and p.
class DivergenceBackward : public mx::Primitive {
 public:
  DivergenceBackward(mx::Stream stream, Divergence kind, bool grad_q, bool grad_p)
      : mx::Primitive(stream), kind_(kind), grad_q_(grad_q), grad_p_(grad_p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return kind_ == Divergence::KL ? "KLDivBackward" : "JSDivBackward";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  Divergence kind() const {
    return kind_;
  }
  bool grad_q() const {
    return grad_q_;
  }
  bool grad_p() const {
    return grad_p_;
  }

 private:
  Divergence kind_;
  bool grad_q_;
  bool grad_p_;
};

// Metal dispatch of the forward / backward for `rows` rows of length V (metal/divergence.h).
MetalLaunch metal_launch_divergence_forward(
    Divergence kind,
    size_t rows,
    int V,
    const std::string& dtype);
MetalLaunch metal_launch_divergence_backward(
    Divergence kind,
    size_t rows,
    int V,
    const std::string& dtype,
    bool grad_q,
    bool grad_p);

// "float32" | "float16" | "bfloat16" for the kernels' instantiation names.
std::string dtype_name(mx::Dtype t);

} // namespace mlx_tuner
