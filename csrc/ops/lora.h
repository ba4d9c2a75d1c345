// Fused LoRA linear: the op and its two primitives (forward, backward).
//
//   x (N, in) [leading dims flattened], W (out, in), A (in, r), B (r, out), s a float,
//   x_d = dropout(x) (x itself when no x_dropped is given):
//     xa = x_d A                                  (N, r), saved for the backward (float32;
//                                                 the compute dtype for the CUDA kernels)
//     y  = x W^T + bias + s xa B                  one output buffer; the rank-r term is
//                                                 accumulated by the GEMM (beta = 1)
//   backward, g = dy B^T (N, r):
//     dx   = dy W + s g A^T                       (s g A^T goes to dx_d when x_dropped)
//     dA   = s x_d^T g        dB = s xa^T dy
//     dW   = dy^T x           dbias = sum_rows(dy)  (only when asked: full fine-tuning)
// Only the gradients `argnums` asks for are computed.
//
// No mlx/ops.h here: nvcc compiles this header (GPU.md).
#pragma once

#include <optional>
#include <string>

#include "common/metal_launch.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace mx = mlx::core;

// y = x W^T + bias + scale (x_d A) B with the dtype rules of mlx-lm's LoRALinear.
mx::array lora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    mx::StreamOrDevice s = {});

// Metal dispatch of the kernels (metal/lora.h), used by the Metal host code and, through
// the bindings, by the emulator tests. Dtypes by name ("float32", ...):
// t of the activations, u of the LoRA parameter the kernel reads (t or "float32").
MetalLaunch metal_launch_lora_xa(int n, int r, const std::string& t, const std::string& u);
MetalLaunch metal_launch_lora_linear(
    int n, int out, const std::string& t, const std::string& u, bool has_bias);
// The backward's: g = dy B^T (u of B); dx = dy W + s g A^T, `base` and `lora` choosing
// the pairs (dy W alone when x_dropped is given, s g A^T alone for dx_d; u of A);
// dA = s x_d^T g (in, r), dB = s xa^T dy (r, out) (u of A, B: their gradients' dtype).
MetalLaunch metal_launch_lora_g(int n, const std::string& t, const std::string& u);
MetalLaunch metal_launch_lora_dx(
    int n, int in, const std::string& t, const std::string& u, bool base, bool lora);
MetalLaunch metal_launch_lora_da(
    int in, int r, const std::string& t, const std::string& u);
MetalLaunch metal_launch_lora_db(
    int r, int out, const std::string& t, const std::string& u);

// inputs: x, W, A, B, [bias], [x_d]   outputs: y (N, out), xa (N, r) (float32; T on CUDA)
class LoRALinear : public mx::Primitive {
 public:
  LoRALinear(mx::Stream stream, float scale, bool has_bias, bool has_xd)
      : mx::Primitive(stream),
        scale_(scale),
        has_bias_(has_bias),
        has_xd_(has_xd) {}

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
    return "LoRALinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

  float scale() const {
    return scale_;
  }
  bool has_bias() const {
    return has_bias_;
  }
  bool has_xd() const {
    return has_xd_;
  }

 private:
  float scale_;
  bool has_bias_;
  bool has_xd_;
};

// Which gradients the backward computes; outputs come in this order, each present
// only when its flag is set.
struct LoRAGrads {
  bool x = false;
  bool weight = false;
  bool lora_a = false;
  bool lora_b = false;
  bool bias = false;
  bool x_dropped = false;
  bool operator==(const LoRAGrads&) const = default;

  // The flagged gradients' shapes and dtypes (those of the primals), in this order;
  // bias_idx, xd_idx: the primals' positions, -1 when absent.
  void output_specs(const std::vector<mx::array>& primals, int bias_idx, int xd_idx,
                    std::vector<mx::Shape>& shapes, std::vector<mx::Dtype>& dtypes) const {
    auto add = [&](bool on, int i) {
      if (on && i >= 0) {
        shapes.push_back(primals[i].shape());
        dtypes.push_back(primals[i].dtype());
      }
    };
    add(x, 0);
    add(weight, 1);
    add(lora_a, 2);
    add(lora_b, 3);
    add(bias, bias_idx);
    add(x_dropped, xd_idx);
  }

  // A gradient primitive's outputs by name: the flagged ones in this order, empty for the
  // rest. Copies on the CPU (its task runs after eval_cpu returns), pointers on CUDA.
  template <typename P>
  struct Named {
    P x, weight, lora_a, lora_b, bias, x_dropped;
  };
  Named<std::optional<mx::array>> copies(const std::vector<mx::array>& outputs) const {
    size_t k = 0;
    return name<std::optional<mx::array>>([&](bool on) {
      return on ? std::optional<mx::array>(outputs[k++]) : std::nullopt;
    });
  }
  Named<mx::array*> pointers(std::vector<mx::array>& outputs) const {
    size_t k = 0;
    return name<mx::array*>([&](bool on) { return on ? &outputs[k++] : nullptr; });
  }

 private:
  template <typename P, typename Take>
  Named<P> name(Take take) const { // braced initialization: taken left to right
    return {take(x), take(weight), take(lora_a), take(lora_b), take(bias), take(x_dropped)};
  }
};

// inputs: x, W, A, B, xa, dy, [x_d]   outputs: the flagged gradients, in LoRAGrads order
class LoRALinearVJP : public mx::Primitive {
 public:
  LoRALinearVJP(mx::Stream stream, float scale, bool has_xd, LoRAGrads grads)
      : mx::Primitive(stream), scale_(scale), has_xd_(has_xd), grads_(grads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "LoRALinearVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

  float scale() const {
    return scale_;
  }
  bool has_xd() const {
    return has_xd_;
  }
  const LoRAGrads& grads() const {
    return grads_;
  }

 private:
  float scale_;
  bool has_xd_;
  LoRAGrads grads_;
};

} // namespace mlx_tuner
