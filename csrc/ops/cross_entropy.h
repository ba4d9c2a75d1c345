// Fused linear cross-entropy: the loss of logits = h·Wᵀ (+ b) against targets, computed
// blockwise over the vocabulary so that the (N, V) logits are never stored.
//
//   z_nv   = h_n · W_v + b_v                      (recomputed tile by tile)
//   lse_n  = log Σ_v exp(z_nv)                     (online max and sum over vocab blocks)
//   loss_n = lse_n − z_{n, y_n}   if 0 <= y_n < V, else 0 (an ignored token)
// Backward, with the per-token cotangent g_n and p_nv = exp(z_nv − lse_n):
//   G_nv = g_n (p_nv − [v = y_n])                  (0 for ignored tokens)
//   dh   = G · W      dW = Gᵀ · h      db = Σ_n G_nv
// The forward saves lse (N floats) for the backward, which recomputes each logit tile.
// With grad_in_forward (CUDA only), the forward also accumulates, flash-attention style,
//   dh_unit_n = Σ_v p_nv W_v − W_{y_n} = ∂loss_n/∂h_n      (0 for ignored tokens)
// so that dh = g · dh_unit needs no third GEMM when only dh is asked (a frozen head).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common/metal_launch.h"
#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace mx = mlx::core;

// A quantized head (affine mode, as mx.quantize makes it): weight is uint32-packed.
struct QuantSpec {
  bool quantized = false;
  int group_size = 64;
  int bits = 4;
  bool operator==(const QuantSpec&) const = default;
};

// Threads per threadgroup of the Metal kernels (= LCE_THREADS in metal/cross_entropy.h).
constexpr int kLceMetalThreads = 256;

// The Metal dispatch of one kernel ("forward", "backward_dh": one threadgroup per token;
// "backward_dw": one per vocabulary row) for `rows` threadgroups and dtype
// ("float32", "float16", "bfloat16"). Used by the Metal host code and the emulator tests.
MetalLaunch metal_launch_linear_cross_entropy(
    const std::string& kernel,
    int rows,
    const std::string& dtype);

// Per-token loss (float32, shape (N,)) of h (N, d) against targets (N,) int.
// bias: (V,) or none. For a quantized head pass weight (V, d·bits/32) uint32 with
// scales and biases (V, d / group_size); mode must be "affine" for the kernels, other
// modes are dequantized first (the logits are still never stored).
// grad_in_forward is a speed hint for training: where a kernel computes dh_unit in the
// forward (CUDA, a dense head) the backward of dh costs no GEMM; elsewhere it is ignored.
mx::array linear_cross_entropy(
    const mx::array& h,
    const mx::array& weight,
    const mx::array& targets,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    bool grad_in_forward = false,
    mx::StreamOrDevice s = {});

// Inputs: h, weight, targets[, bias][, scales, qbiases].
// Outputs: loss (N,) float32, lse (N,) float32 [, dh_unit (N, d) float32 when
// grad_in_forward is honored].
class LinearCrossEntropy : public mx::Primitive {
 public:
  LinearCrossEntropy(
      mx::Stream stream,
      bool has_bias,
      QuantSpec q,
      bool grad_in_forward = false)
      : mx::Primitive(stream),
        has_bias_(has_bias),
        q_(q),
        grad_in_forward_(grad_in_forward) {}

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
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "LinearCrossEntropy";
  }

  bool has_bias() const {
    return has_bias_;
  }
  const QuantSpec& quant() const {
    return q_;
  }
  bool grad_in_forward() const {
    return grad_in_forward_;
  }

 private:
  bool has_bias_;
  QuantSpec q_;
  bool grad_in_forward_;
};

// Inputs: h, weight, targets, lse, g[, bias][, scales, qbiases].
// Outputs, in this order, those asked for: dh (N, d), dW (V, d), db (V,).
class LinearCrossEntropyVJP : public mx::Primitive {
 public:
  LinearCrossEntropyVJP(
      mx::Stream stream,
      bool has_bias,
      QuantSpec q,
      bool need_dh,
      bool need_dw,
      bool need_db)
      : mx::Primitive(stream),
        has_bias_(has_bias),
        q_(q),
        need_dh_(need_dh),
        need_dw_(need_dw),
        need_db_(need_db) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  bool is_equivalent(const mx::Primitive& other) const override;
  const char* name() const override {
    return "LinearCrossEntropyVJP";
  }

  bool has_bias() const {
    return has_bias_;
  }
  const QuantSpec& quant() const {
    return q_;
  }
  bool need_dh() const {
    return need_dh_;
  }
  bool need_dw() const {
    return need_dw_;
  }
  bool need_db() const {
    return need_db_;
  }

 private:
  bool has_bias_;
  QuantSpec q_;
  bool need_dh_, need_dw_, need_db_;
};

} // namespace mlx_tuner
