// DoRA linear without the adapted weight: y = (m / n) * (x W^T + s (x_d A) B), bias added
// outside (so the backward can recover u = x W^T + s (x_d A) B from y exactly; see dora.cpp).
//
// n_i = || W_i + s (A B)^T_i || via the low-rank identity (P = W A, G = A^T A, c_i = ||W_i||^2):
//   n_i^2 = c_i + 2 s sum_k B[k,i] P[i,k] + s^2 sum_{k,l} B[k,i] G[k,l] B[l,i]
// n is a constant in the backward (mlx-lm's stop_gradient). With rs = m / n, g = dy * rs:
//   dx = g W + s (g B^T) A^T      (the second term goes to dx_d when x_dropped is given)
//   dA = s x_d^T (g B^T)   dB = s xa^T g   dm_i = sum_rows dy_i u_i / n_i,  u = y / rs
// Do NOT include mlx/ops.h here: nvcc compiles this header too (GPU.md).
#pragma once

#include <array>
#include <optional>
#include <string>

#include "common/metal_launch.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

// CUDA builds with the dora and lora families: DoRALinear and DoRALinearVJP have GPU
// kernels (backend/cuda/dora.cu, which runs LoRA's, or QLoRA's, forward and backward);
// elsewhere the GPU path composes (ops/dora.cpp compose_gpu).
#if defined(MLX_TUNER_CUDA) && defined(MLX_TUNER_DORA_GPU) && defined(MLX_TUNER_LORA_GPU)
#define MLX_TUNER_DORA_FUSED_GPU 1
// ... and with the qlora family, the quantized layer too (QLoRA's forward and backward).
#if defined(MLX_TUNER_QLORA_GPU)
#define MLX_TUNER_QDORA_FUSED_GPU 1
#endif
#endif

namespace mlx_tuner {

namespace mx = mlx::core;

struct DoRAConfig {
  float scale = 1.0f;
  bool has_xd = false; // a separate x_dropped input
  bool quantized = false; // W as mx.quantize(mode="affine") lays it out
  int group_size = 64;
  int bits = 4;
  bool has_c = false; // cached ||W_i||^2 given
  bool operator==(const DoRAConfig&) const = default;
};

// Positions of the inputs of both primitives (the backward appends n, xa, y, dy).
struct DoRAInputs {
  int x = 0, xd = 0, w = 0, scales = -1, biases = -1, a = 0, b = 0, m = 0, c = -1, count = 0;
  explicit DoRAInputs(const DoRAConfig& cfg);
};

// Gradients the backward can produce, in its output order.
enum DoRAGrad { kGradX = 0, kGradXd, kGradA, kGradB, kGradM, kNumGrads };
using DoRAWant = std::array<bool, kNumGrads>;

// inputs: x (N,in), [xd (N,in)], W (out,in) | Wq + scales + biases, A f32 (in,r),
// B f32 (r,out), m f32 (out), [c f32 (out)].  outputs: y (N,out) (no bias), xa f32 (N,r),
// n f32 (out).
class DoRALinear : public mx::Primitive {
 public:
  DoRALinear(mx::Stream s, DoRAConfig cfg) : mx::Primitive(s), cfg_(cfg) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override;
  const char* name() const override {
    return "DoRALinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return cfg_ == static_cast<const DoRALinear&>(other).cfg_;
  }
  const DoRAConfig& config() const {
    return cfg_;
  }

 private:
  DoRAConfig cfg_;
};

// inputs: the forward's inputs, then n, xa, y, dy. outputs: the wanted gradients, in
// DoRAGrad order (x and xd in x's dtype, A/B/m in float32).
class DoRALinearVJP : public mx::Primitive {
 public:
  DoRALinearVJP(mx::Stream s, DoRAConfig cfg, DoRAWant want)
      : mx::Primitive(s), cfg_(cfg), want_(want) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override {
    return "DoRALinearVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DoRALinearVJP&>(other);
    return cfg_ == o.cfg_ && want_ == o.want_;
  }

 private:
  DoRAConfig cfg_;
  DoRAWant want_;
};

// c_i = ||W_i||^2 in float32 (W dense, or quantized when `quantized`): a kernel of the GPU
// path, and the cached weight_sq_norm of the layers.
// inputs: W | Wq, scales, biases.  output: c f32 (out,).
class DoRARowSqNorm : public mx::UnaryPrimitive {
 public:
  DoRARowSqNorm(mx::Stream s, bool quantized, int group_size, int bits)
      : mx::UnaryPrimitive(s), quantized_(quantized), group_size_(group_size), bits_(bits) {}
  using mx::UnaryPrimitive::eval_cpu; // the vector overloads stay visible
  using mx::UnaryPrimitive::eval_gpu;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& in, mx::array& out) override;
  const char* name() const override {
    return "DoRARowSqNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DoRARowSqNorm&>(other);
    return quantized_ == o.quantized_ && group_size_ == o.group_size_ && bits_ == o.bits_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {{in[0].shape(0)}};
  }

 private:
  bool quantized_;
  int group_size_, bits_;
};

// The m / n column scale of the GPU path, one pass each way (compose_gpu):
//   y = z * sv (+ bias)     dz = dy * sv     dsv = sum_rows dy * z     dbias = sum_rows dy
// inputs: z (N, out) in T, sv f32 (out,), [bias (out,) in T]. output: y (N, out) in T,
// float32 maths rounded once.
class DoRAScale : public mx::UnaryPrimitive {
 public:
  DoRAScale(mx::Stream s, bool has_bias) : mx::UnaryPrimitive(s), has_bias_(has_bias) {}
  using mx::UnaryPrimitive::eval_cpu; // the vector overloads stay visible
  using mx::UnaryPrimitive::eval_gpu;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& in, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  // In MLX ops (forward-mode use is rare): dy = dz * sv + z * dsv + dbias.
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }
  const char* name() const override {
    return "DoRAScale";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return has_bias_ == static_cast<const DoRAScale&>(other).has_bias_;
  }

 private:
  bool has_bias_;
};

// Which gradients DoRAScaleVJP produces; its outputs come in this order.
struct DoRAScaleWant {
  bool z = false, sv = false, bias = false;
  bool operator==(const DoRAScaleWant&) const = default;
};

// inputs: dy (N, out) in T, sv f32 (out,), then z only when dsv is wanted.
// outputs (the wanted ones): dz (N, out) in T, dsv f32 (out,), dbias (out,) in T.
class DoRAScaleVJP : public mx::Primitive {
 public:
  DoRAScaleVJP(mx::Stream s, DoRAScaleWant want) : mx::Primitive(s), want_(want) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  void eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override;
  const char* name() const override {
    return "DoRAScaleVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return want_ == static_cast<const DoRAScaleVJP&>(other).want_;
  }
  const DoRAScaleWant& want() const {
    return want_;
  }

 private:
  DoRAScaleWant want_;
};

// 1 / n of the GPU path in one node (it was a dozen small MLX ops and graph nodes):
//   n_i = sqrt(max(c_i + 2 s sum_k B[k,i] P[i,k] + s^2 sum_{k,l} B[k,i] G[k,l] B[l,i], 0))
// with P = W A (out, r) — given as Pᵀ (r, out) when p_transposed — and G = Aᵀ A.
// inputs: p (float), b f32 (r, out), a f32 (in, r), c f32 (out,). With bits > 0, P is made
// in the node from the affine-quantized W instead (r <= 16, scales in float16 or bfloat16;
// CUDA: lowrank_project_quant reads the codes once, where MLX's quantized matmul of Aᵀ took
// 78 us at 4096 x 4096): inputs wq, scales, biases, b, a, c.
// output: f32 (out,). No gradient: n is a stop_gradient in DoRA. r <= kInvNormMaxRank.
constexpr int kInvNormMaxRank = 32;
constexpr int kInvNormQuantMaxRank = 16;
class DoRAInvNorm : public mx::UnaryPrimitive {
 public:
  DoRAInvNorm(mx::Stream s, float scale, bool p_transposed, int bits = 0, int group_size = 0)
      : mx::UnaryPrimitive(s), scale_(scale), p_transposed_(p_transposed), bits_(bits),
        group_size_(group_size) {}
  using mx::UnaryPrimitive::eval_cpu;
  using mx::UnaryPrimitive::eval_gpu;
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& in, mx::array& out) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in.back().shape()};
  }
  const char* name() const override {
    return "DoRAInvNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DoRAInvNorm&>(other);
    return scale_ == o.scale_ && p_transposed_ == o.p_transposed_ && bits_ == o.bits_ &&
        group_size_ == o.group_size_;
  }
  float scale() const {
    return scale_;
  }
  bool p_transposed() const {
    return p_transposed_;
  }

 private:
  float scale_;
  bool p_transposed_;
  int bits_, group_size_; // bits_ > 0: P from the quantized W
};

// The DoRAInvNorm node (a stop_gradient); bound as _dora_inv_norm for tests.
mx::array dora_inv_norm(
    const mx::array& p,
    const mx::array& b,
    const mx::array& a,
    const mx::array& c,
    float scale,
    bool p_transposed,
    mx::StreamOrDevice s = {});

// The same node with P = W A made from the affine-quantized W (wq, scales, biases as
// mx.quantize returns them, scales in float16 or bfloat16, r <= kInvNormQuantMaxRank);
// compose_gpu's path on CUDA; bound as _dora_inv_norm_quant for tests.
mx::array dora_inv_norm_quant(
    const mx::array& wq,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& b,
    const mx::array& a,
    const mx::array& c,
    float scale,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// y = z * sv (+ bias) as one DoRAScale node. z (N, out) float32/float16/bfloat16, sv (out,)
// float32, bias (out,) in z's dtype. compose_gpu's GPU path; bound as _dora_scale for tests.
mx::array dora_scale(
    const mx::array& z,
    const mx::array& sv,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s = {});

// The Metal dispatch of DoRARowSqNorm (host code and emulator tests): one threadgroup of
// 256 threads per row. dtype: "float32" | "float16" | "bfloat16" (W's, or the scales');
// bits 0 for a dense W.
MetalLaunch metal_launch_dora_row_sq_norm(int rows, const std::string& dtype, int bits);

// The Metal dispatches of DoRAInvNorm, DoRAScale and DoRAScaleVJP (metal/dora.h); dtype as
// above (P's for inv_norm, z's / dy's for the rest), else a ValueError.
// G = Aᵀ A (r x r float32): a threadgroup per row of G; "dora_gram".
MetalLaunch metal_launch_dora_gram(int r);
// 1 / n from P, B, G, c: a thread per output column.
MetalLaunch metal_launch_dora_inv_norm(int out, const std::string& dtype);
// y = z * sv (+ bias) over (rows, cols), and dz = dy * sv alone (no bias).
MetalLaunch metal_launch_dora_scale(int rows, int cols, const std::string& dtype, bool has_bias);
// dz and the float32 partial column sums of dy * z and dy: threadgroups[1] row tiles (0 for
// an empty batch), each writing one partial row.
MetalLaunch metal_launch_dora_scale_vjp(int rows, int cols, const std::string& dtype);
// dsv and dbias from the partial rows, added in order.
MetalLaunch metal_launch_dora_scale_colsum(int cols, const std::string& dtype);

mx::array dora_weight_sq_norm(
    const mx::array& weight,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// The op: validates, promotes, flattens, builds the primitive, adds the bias. On a GPU (or
// with compose=true, which tests use to check the GPU graph on the CPU) it composes MLX
// GEMMs around DoRARowSqNorm, DoRAInvNorm (r <= kInvNormMaxRank), the fused LoRA / QLoRA
// primitive and DoRAScale instead.
mx::array dora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    const mx::array& magnitude,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    const std::optional<mx::array>& weight_sq_norm,
    mx::StreamOrDevice s = {},
    bool compose = false);

} // namespace mlx_tuner
