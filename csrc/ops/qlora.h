// QLoRA linear on an MLX affine-quantized base, as two MLX primitives.
//
//   forward   y  = x Wᵀ + bias + s (x_d A) B,   W = dequant(Wq, scales, biases)
//             xa = x_d A                         (second output, kept for dB: float32;
//                                                T on CUDA)
//   backward  g  = s dy Bᵀ                       (M, r)
//             dx   = dy W  (+ g Aᵀ when x_d is x itself)
//             dx_d = g Aᵀ                        (when x_d is a separate input)
//             dA   = x_dᵀ g,   dB = s xaᵀ dy,   dbias = Σ_rows dy
// W is never materialised whole: kernels dequantize panels (CPU) or tiles (GPU).
// The quantized base is frozen: no gradient for weight, scales or biases.
//
// This header is compiled by nvcc too: never include mlx/ops.h here.
#pragma once

#include <string>

#include "common/metal_launch.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace mx = mlx::core;

struct QLoRAParams {
  float scale;
  int group_size;
  int bits;
  bool has_xd; // x_dropped given as its own input (else x_d = x)
  bool has_bias;
  bool operator==(const QLoRAParams&) const = default;
};

// Inputs: x, weight, scales, biases, lora_a, lora_b, [x_dropped], [bias], all float
// inputs of one dtype, row-contiguous. Outputs: y (x dtype), xa (float32; x dtype on CUDA).
class QLoRA : public mx::Primitive {
 public:
  QLoRA(mx::Stream s, QLoRAParams p) : mx::Primitive(s), p_(p) {}

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
    return "QLoRA";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return p_ == static_cast<const QLoRA&>(other).p_;
  }
  const QLoRAParams& params() const {
    return p_;
  }

 private:
  QLoRAParams p_;
};

// Which gradients the backward primitive produces, in this output order.
struct QLoRAGrads {
  bool dx; // dy W, plus g Aᵀ unless has_xd
  bool dxd; // g Aᵀ (only with has_xd)
  bool da;
  bool db;
  bool operator==(const QLoRAGrads&) const = default;
};

// Inputs: dy, weight, scales, biases, lora_a, lora_b, x_d, xa.
class QLoRAVJP : public mx::Primitive {
 public:
  QLoRAVJP(mx::Stream s, QLoRAParams p, QLoRAGrads g) : mx::Primitive(s), p_(p), g_(g) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "QLoRAVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QLoRAVJP&>(other);
    return p_ == o.p_ && g_ == o.g_;
  }
  const QLoRAParams& params() const {
    return p_;
  }
  const QLoRAGrads& grads() const {
    return g_;
  }

 private:
  QLoRAParams p_;
  QLoRAGrads g_;
};

// Validates, promotes to one float dtype, makes contiguous, builds the primitive.
// Returns y only (xa is an internal output).
mx::array qlora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& lora_a,
    const mx::array& lora_b,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// Metal launch geometry (tiles of metal/qlora.h), shared by the Metal host code and the
// emulator tests. gemm: out (m x n_out); fwd picks qlora_gemm_fwd_* (else _bwd_, dx).
MetalLaunch qlora_gemm_launch(bool fwd, int m, int n_out, int bits, const std::string& dtype);
// skinny: out (ni x nq); p_dtype / o_dtype: the P operand and output dtypes.
MetalLaunch qlora_skinny_launch(
    int ni,
    int nq,
    const std::string& p_dtype,
    const std::string& o_dtype);

} // namespace mlx_tuner
