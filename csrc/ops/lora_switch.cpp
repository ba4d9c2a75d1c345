// The fused LoRA switch op: validate, broadcast the index arrays into flat (lhs, rhs)
// pair lists, make contiguous, then build the forward primitive; its vjp builds the
// fused backward primitive. Maths in lora_switch.h.
#include "ops/lora_switch.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "common/checks.h"
#include "common/graph.h"
#include "common/quant.h"
#include "mlx/ops.h"

namespace mlx_tuner {

namespace {

constexpr ArgCheck check{"[lora_switch_linear]"};

} // namespace

mx::array lora_switch_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    const mx::array& indices,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  if (x.ndim() < 2) {
    check.fail("x must have at least 2 dimensions but got shape " + shape_str(x.shape()) + ".");
  }
  check.ndim("weight", weight, 3);
  bool quantized = scales.has_value();
  int experts = weight.shape(0), out_dims = weight.shape(1), in_dims = weight.shape(2);
  if (quantized) {
    check.affine(bits, group_size);
    if (weight.dtype() != mx::uint32) {
      check.fail("weight must be uint32 (from mx.quantize) when scales are given but got " +
                 dtype_str(weight.dtype()) + ".");
    }
    if (!biases) {
      check.fail("biases must be given with scales (an affine-quantized weight).");
    }
    in_dims = int(int64_t(weight.shape(2)) * 32 / bits);
    if (int64_t(weight.shape(2)) * 32 % bits != 0 || in_dims % group_size != 0) {
      check.fail("weight's last dimension " + std::to_string(weight.shape(2)) +
           " does not hold whole groups of " + std::to_string(group_size) + " at " +
           std::to_string(bits) + " bits.");
    }
    check.floating("scales", *scales);
    check.floating("biases", *biases);
    check.shape("scales", *scales, {experts, out_dims, in_dims / group_size});
    check.shape("biases", *biases, {experts, out_dims, in_dims / group_size});
  } else if (biases) {
    check.fail("biases (of a quantized weight) were given without scales.");
  }
  if (x.shape(-1) != in_dims) {
    check.fail("x must have last dimension " + std::to_string(in_dims) + " (weight is " +
         shape_str(weight.shape()) + ") but got shape " + shape_str(x.shape()) + ".");
  }
  check.ndim("lora_a", lora_a, 3);
  int r = lora_a.shape(1);
  check.shape("lora_a", lora_a, {experts, r, in_dims});
  check.shape("lora_b", lora_b, {experts, out_dims, r});
  check.floating("x", x);
  if (!quantized) {
    check.floating("weight", weight);
  }
  check.floating("lora_a", lora_a);
  check.floating("lora_b", lora_b);
  if (!mx::issubdtype(indices.dtype(), mx::integer)) {
    check.fail("indices must be an integer array but got " + dtype_str(indices.dtype()) + ".");
  }
  if (bias) {
    check.floating("bias", *bias);
    check.shape("bias", *bias, {experts, out_dims});
  }
  if (x_dropped) {
    check.floating("x_dropped", *x_dropped);
    check.shape("x_dropped", *x_dropped, x.shape());
  }
  mx::Shape x_batch(x.shape().begin(), x.shape().end() - 2);
  mx::Shape batch;
  try {
    batch = mx::broadcast_shapes(x_batch, indices.shape());
  } catch (const std::invalid_argument&) {
    check.fail("indices must broadcast with x's batch dimensions " + shape_str(x_batch) +
         " but got shape " + shape_str(indices.shape()) + ".");
  }

  // a quantized base computes in its scales' dtype (mx.quantize's), as gather_qmm does
  auto qdtype = quantized ? mx::promote_types(scales->dtype(), biases->dtype()) : mx::float32;
  auto out_dtype = mx::promote_types(x.dtype(), quantized ? qdtype : weight.dtype());
  if (bias) {
    out_dtype = mx::promote_types(out_dtype, bias->dtype());
  }
  int n_blocks = std::accumulate(x_batch.begin(), x_batch.end(), 1, std::multiplies<int>());
  int m = x.shape(-2);
  int pairs = std::accumulate(batch.begin(), batch.end(), 1, std::multiplies<int>());
  // Pair p reads x block lhs[p] and expert rhs[p]: gather_mm's broadcasting, made explicit.
  auto lhs = mx::reshape(mx::arange(n_blocks, mx::int32, s), x_batch, s);
  lhs = contiguous_rows(mx::reshape(mx::broadcast_to(lhs, batch, s), {pairs}, s), s);
  auto rhs = mx::broadcast_to(mx::astype(indices, mx::int32, s), batch, s);
  rhs = contiguous_rows(mx::reshape(rhs, {pairs}, s), s);
  mx::Shape flat = {n_blocks, m, in_dims};
  auto prep = [&](const mx::array& a) { return contiguous_rows(a, s); };
  std::vector<mx::array> inputs = {prep(mx::reshape(x, flat, s)), prep(weight), prep(lora_a),
                                   prep(lora_b), lhs, rhs};
  if (bias) {
    inputs.push_back(prep(*bias));
  }
  if (x_dropped) {
    inputs.push_back(prep(mx::reshape(*x_dropped, flat, s)));
  }
  SwitchQuant quant;
  if (quantized) {
    inputs.push_back(prep(mx::astype(*scales, qdtype, s)));
    inputs.push_back(prep(mx::astype(*biases, qdtype, s)));
    quant = {bits, group_size};
  }
  auto outs = mx::array::make_arrays(
      {{pairs, m, out_dims}, {pairs, m, r}},
      {out_dtype, mx::float32},
      std::make_shared<LoRASwitchLinear>(s, scale, bias.has_value(), x_dropped.has_value(),
                                         quant),
      inputs);
  auto out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(out_dims);
  return mx::reshape(outs[0], out_shape, s);
}

std::vector<mx::Shape> LoRASwitchLinear::output_shapes(const std::vector<mx::array>& inputs) {
  int pairs = inputs[4].shape(0), m = inputs[0].shape(1);
  return {{pairs, m, inputs[1].shape(1)}, {pairs, m, inputs[2].shape(1)}};
}

bool LoRASwitchLinear::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LoRASwitchLinear&>(other);
  return scale_ == o.scale_ && has_bias_ == o.has_bias_ && has_xd_ == o.has_xd_ &&
         quant_ == o.quant_;
}

std::vector<mx::array> LoRASwitchLinear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // xa (outputs[1]) is internal: its cotangent is never anything but zeros.
  auto s = stream();
  int bias_idx = has_bias_ ? 6 : -1;
  int xd_idx = has_xd_ ? (has_bias_ ? 7 : 6) : -1;
  int q_idx = quant_.bits ? 6 + has_bias_ + has_xd_ : -1; // scales; biases follow
  LoRAGrads want;
  for (int a : argnums) {
    if (quant_.bits && (a == 1 || a == q_idx || a == q_idx + 1)) {
      const char* name = a == 1 ? "weight" : a == q_idx ? "scales" : "biases";
      throw std::invalid_argument(
          std::string("[lora_switch_linear] gradients with respect to ") + name +
          " are not supported: the quantized base is frozen (pass it as a constant).");
    }
    if (a == 4 || a == 5) {
      throw std::invalid_argument(
          "[lora_switch_linear] cannot compute the gradient with respect to indices; "
          "use mx.stop_gradient on indices.");
    }
    want.x |= a == 0;
    want.weight |= a == 1;
    want.lora_a |= a == 2;
    want.lora_b |= a == 3;
    want.bias |= a == bias_idx;
    want.x_dropped |= a == xd_idx;
  }
  auto dy = contiguous_rows(mx::astype(cotangents[0], outputs[0].dtype(), s), s);
  std::vector<mx::array> inputs = {primals[0], primals[1], primals[2], primals[3],
                                   primals[4], primals[5], outputs[1], dy};
  if (has_xd_) {
    inputs.push_back(primals[xd_idx]);
  }
  if (quant_.bits) {
    inputs.push_back(primals[q_idx]);
    inputs.push_back(primals[q_idx + 1]);
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  want.output_specs(primals, bias_idx, xd_idx, shapes, dtypes);
  auto grads = mx::array::make_arrays(
      shapes, dtypes, std::make_shared<LoRASwitchLinearVJP>(s, scale_, has_xd_, want, quant_), inputs);
  // argnums order -> position among the outputs (which come in LoRAGrads order)
  std::vector<int> order = {0, 1, 2, 3, bias_idx, xd_idx};
  std::vector<mx::array> out;
  for (int a : argnums) {
    int k = 0;
    for (int i : order) {
      if (i == a) break;
      bool on = i >= 0 && std::find(argnums.begin(), argnums.end(), i) != argnums.end();
      k += on ? 1 : 0;
    }
    out.push_back(grads[k]);
  }
  return out;
}

std::vector<mx::Shape> LoRASwitchLinearVJP::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  if (grads_.x) shapes.push_back(inputs[0].shape());
  if (grads_.weight) shapes.push_back(inputs[1].shape());
  if (grads_.lora_a) shapes.push_back(inputs[2].shape());
  if (grads_.lora_b) shapes.push_back(inputs[3].shape());
  if (grads_.bias) shapes.push_back({inputs[1].shape(0), inputs[1].shape(1)});
  if (grads_.x_dropped) shapes.push_back(inputs[0].shape());
  return shapes;
}

bool LoRASwitchLinearVJP::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LoRASwitchLinearVJP&>(other);
  return scale_ == o.scale_ && has_xd_ == o.has_xd_ && grads_ == o.grads_ &&
         quant_ == o.quant_;
}

#if !defined(MLX_TUNER_LORA_SWITCH_GPU) // no GPU kernel of this family in any build
// mlx_tuner.ops.lora_switch_linear runs the reference on GPU streams; reaching these
// means the extension's op was called directly with a GPU stream.
void LoRASwitchLinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[lora_switch_linear] no GPU kernel: use mlx_tuner.ops.lora_switch_linear, which runs "
      "mlx-lm's gather_mm maths on the GPU");
}
void LoRASwitchLinearVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[lora_switch_linear] no GPU kernel: use mlx_tuner.ops.lora_switch_linear, which runs "
      "mlx-lm's gather_mm maths on the GPU");
}
#endif

} // namespace mlx_tuner
