// Fused LoRA over a mixture-of-experts switch layer: the op and its two primitives.
//
//   x (X, M, in) [x's batch dims flattened], P (token, slot) pairs: pair p multiplies the
//   M rows of x block lhs[p] by expert e = rhs[p] (mx.gather_mm's broadcasting, with the
//   index arrays broadcast and flattened by the op). W (E, out, in), A (E, r, in),
//   B (E, out, r) (mlx-lm's layout), bias (E, out), x_d = dropout(x) (x when not given):
//     xa_p = x_d,p A_e^T                       (M, r), float32, saved for the backward
//     y_p  = x_p W_e^T + bias_e + s xa_p B_e^T (M, out)
//   backward, g_p = dy_p B_e (M, r):
//     dx[lhs[p]] += dy_p W_e + s g_p A_e       (s g_p A_e goes to dx_d when x_dropped)
//     dA_e += s g_p^T x_d,p    dB_e += s dy_p^T xa_p
//     dW_e += dy_p^T x_p       dbias_e += sum_rows(dy_p)   (only when asked)
// A quantized base (mode "affine", mx.quantize's layout) gives W as uint32
// (E, out, in * bits / 32) with scales and biases (E, out, in / group_size); the CPU kernel
// dequantizes W_e a panel of rows at a time (never all of W) and W gets no gradient.
// The CPU kernel groups the pairs by expert (a counting sort of rhs) and runs one GEMM
// per expert on the gathered rows. A pair whose expert index is out of [0, E) gets NaN
// outputs and adds nothing to any gradient.
//
// No mlx/ops.h here: nvcc compiles this header (GPU.md).
#pragma once

#include <optional>

#include "mlx/primitives.h"
#include "ops/lora.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace mx = mlx::core;

// mlx-lm's LoRASwitchLinear over a dense SwitchLinear, fused:
// gather_mm(x, W^T, indices) + bias[indices] + s gather_mm(gather_mm(x_d, A^T), B^T).
mx::array lora_switch_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    const mx::array& indices,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    const std::optional<mx::array>& scales = std::nullopt,
    const std::optional<mx::array>& biases = std::nullopt,
    int group_size = 64,
    int bits = 4,
    mx::StreamOrDevice s = {});

// The base's quantization: bits == 0 for a dense base.
struct SwitchQuant {
  int bits = 0;
  int group_size = 0;
  bool operator==(const SwitchQuant&) const = default;
};

// inputs: x (X, M, in), W, A, B, lhs (P,), rhs (P,), [bias], [x_d], [scales, biases]
// outputs: y (P, M, out), xa (P, M, r) float32
class LoRASwitchLinear : public mx::Primitive {
 public:
  LoRASwitchLinear(mx::Stream stream, float scale, bool has_bias, bool has_xd,
                   SwitchQuant quant = {})
      : mx::Primitive(stream),
        scale_(scale),
        has_bias_(has_bias),
        has_xd_(has_xd),
        quant_(quant) {}

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
    return "LoRASwitchLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool has_bias_;
  bool has_xd_;
  SwitchQuant quant_;
};

// inputs: x, W, A, B, lhs, rhs, xa, dy (P, M, out), [x_d], [scales, biases]
// outputs: the flagged gradients, in LoRAGrads order (ops/lora.h) (never W's for a quantized W)
class LoRASwitchLinearVJP : public mx::Primitive {
 public:
  LoRASwitchLinearVJP(mx::Stream stream, float scale, bool has_xd, LoRAGrads grads,
                      SwitchQuant quant = {})
      : mx::Primitive(stream), scale_(scale), has_xd_(has_xd), grads_(grads), quant_(quant) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "LoRASwitchLinearVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

 private:
  float scale_;
  bool has_xd_;
  LoRAGrads grads_;
  SwitchQuant quant_;
};

} // namespace mlx_tuner
