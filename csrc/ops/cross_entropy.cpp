// linear_cross_entropy: validate, promote, make contiguous, build the primitive; its VJP.
// The maths is at the top of cross_entropy.h; the kernels live in csrc/backend/*.
#include "ops/cross_entropy.h"

#include <algorithm>
#include <stdexcept>

#include "common/checks.h"
#include "common/graph.h"
#include "mlx/ops.h"

namespace mlx_tuner {

namespace {

constexpr ArgCheck check{"[linear_cross_entropy]"};

// Only the CUDA kernels compute dh_unit in the forward (grad_in_forward).
#if defined(MLX_TUNER_CUDA) && defined(MLX_TUNER_CROSS_ENTROPY_GPU)
constexpr bool kGradInForwardKernel = true;
#else
constexpr bool kGradInForwardKernel = false;
#endif

} // namespace

mx::array linear_cross_entropy(
    const mx::array& h_in,
    const mx::array& weight_in,
    const mx::array& targets_in,
    const std::optional<mx::array>& bias_in,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    bool grad_in_forward,
    mx::StreamOrDevice sd) {
  auto s = mx::to_stream(sd);
  if (h_in.ndim() < 1) {
    check.fail("h must have at least 1 dimension but got shape ().");
  }
  check.floating("h", h_in);
  const int d = h_in.shape(-1);
  mx::Shape lead(h_in.shape().begin(), h_in.shape().end() - 1);
  if (!mx::issubdtype(targets_in.dtype(), mx::integer)) {
    check.fail("targets must be an integer array but got " + dtype_str(targets_in.dtype()) + ".");
  }
  check.shape("targets", targets_in, lead);
  if (weight_in.ndim() != 2) {
    check.fail("weight must have 2 dimensions (V, d) but got shape " +
         shape_str(weight_in.shape()) + ".");
  }
  const int V = weight_in.shape(0);
  if (V < 1) {
    check.fail("weight must have at least one row (the vocabulary) but got shape " +
         shape_str(weight_in.shape()) + ".");
  }

  QuantSpec q;
  mx::array weight = weight_in;
  std::vector<mx::array> extra; // scales, qbiases
  mx::Dtype dt = h_in.dtype();
  if (scales) {
    if (weight_in.dtype() != mx::uint32) {
      check.fail("a quantized weight must be uint32 but got " + dtype_str(weight_in.dtype()) +
                 ".");
    }
    check.floating("scales", *scales);
    if (mode == "affine") {
      if (!qbiases) {
        check.fail("biases must be given with scales in the affine mode.");
      }
      if (group_size != 32 && group_size != 64 && group_size != 128) {
        check.fail("group_size must be 32, 64 or 128 but got " + std::to_string(group_size) + ".");
      }
      if (bits < 2 || bits > 8 || bits == 7) {
        check.fail("bits must be 2, 3, 4, 5, 6 or 8 but got " + std::to_string(bits) + ".");
      }
      if (d % group_size != 0) {
        check.fail("h's last dimension " + std::to_string(d) + " must be a multiple of group_size " +
             std::to_string(group_size) + ".");
      }
      check.shape("weight", weight_in, {V, d * bits / 32});
      check.shape("scales", *scales, {V, d / group_size});
      check.floating("biases", *qbiases);
      check.shape("biases", *qbiases, {V, d / group_size});
      dt = mx::promote_types(dt, scales->dtype());
      if (s.device == mx::Device::gpu) {
        // The GPU kernels take a dense head: dequantize it (V·d, never the N·V logits).
        weight = mx::dequantize(
            weight_in, *scales, qbiases, group_size, bits, mode, std::nullopt, dt, s);
      } else {
        q = {true, group_size, bits};
        extra = {contiguous_rows(mx::astype(*scales, dt, s), s),
                 contiguous_rows(mx::astype(*qbiases, dt, s), s)};
      }
    } else {
      // Other modes (mxfp4, nvfp4, mxfp8): dequantize, then the dense kernel.
      weight = mx::dequantize(
          weight_in, *scales, qbiases, group_size, bits, mode, std::nullopt, std::nullopt, s);
      dt = mx::promote_types(dt, weight.dtype());
    }
  } else {
    check.floating("weight", weight_in);
    check.shape("weight", weight_in, {V, d});
    dt = mx::promote_types(dt, weight_in.dtype());
  }
  if (!q.quantized && weight.shape(1) != d) {
    check.fail("weight must have shape " + shape_str({V, d}) + " but got " +
         shape_str(weight.shape()) + ".");
  }
  if (bias_in) {
    check.floating("bias", *bias_in);
    check.shape("bias", *bias_in, {V});
    dt = mx::promote_types(dt, bias_in->dtype());
  }

  int N = 1;
  for (auto n : lead) {
    N *= n;
  }
  auto h = contiguous_rows(mx::astype(mx::reshape(h_in, {N, d}, s), dt, s), s);
  if (!q.quantized) {
    weight = mx::astype(weight, dt, s);
  }
  weight = contiguous_rows(weight, s);
  auto targets = contiguous_rows(mx::astype(mx::reshape(targets_in, {N}, s), mx::int32, s), s);
  std::vector<mx::array> inputs = {h, weight, targets};
  if (bias_in) {
    inputs.push_back(contiguous_rows(mx::astype(*bias_in, dt, s), s));
  }
  inputs.insert(inputs.end(), extra.begin(), extra.end());
  // A hint: honored only where a kernel computes dh_unit (the GPU's head is dense).
  const bool fa = grad_in_forward && kGradInForwardKernel &&
      s.device == mx::Device::gpu && !q.quantized;
  std::vector<mx::Shape> shapes = {{N}, {N}};
  std::vector<mx::Dtype> dtypes = {mx::float32, mx::float32};
  if (fa) {
    shapes.push_back({N, d});
    dtypes.push_back(mx::float32);
  }
  auto outs = mx::array::make_arrays(
      std::move(shapes),
      std::move(dtypes),
      std::make_shared<LinearCrossEntropy>(s, bias_in.has_value(), q, fa),
      inputs);
  return mx::reshape(outs[0], lead, s);
}

MetalLaunch metal_launch_linear_cross_entropy(
    const std::string& kernel,
    int rows,
    const std::string& dtype) {
  if (kernel != "forward" && kernel != "backward_dh" && kernel != "backward_dw") {
    check.fail("unknown Metal kernel '" + kernel + "' (forward, backward_dh, backward_dw).");
  }
  if (dtype != "float32" && dtype != "float16" && dtype != "bfloat16") {
    check.fail("dtype must be float32, float16 or bfloat16 but got " + dtype + ".");
  }
  return {"lce_" + kernel + "_" + dtype,
          {static_cast<size_t>(std::max(rows, 0)), 1, 1},
          {static_cast<size_t>(kLceMetalThreads), 1, 1}};
}

std::vector<mx::Shape> LinearCrossEntropy::output_shapes(
    const std::vector<mx::array>& inputs) {
  int N = inputs[0].shape(0);
  if (grad_in_forward_) {
    return {{N}, {N}, {N, inputs[0].shape(1)}};
  }
  return {{N}, {N}};
}

bool LinearCrossEntropy::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LinearCrossEntropy&>(other);
  return has_bias_ == o.has_bias_ && q_ == o.q_ && grad_in_forward_ == o.grad_in_forward_;
}

std::vector<mx::array> LinearCrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // cotangents[1:] (of the auxiliary lse and dh_unit outputs) are not propagated: the op
  // never hands them to its callers.
  auto s = stream();
  const int bias_idx = has_bias_ ? 3 : -1;
  bool need_dh = false, need_dw = false, need_db = false;
  for (int a : argnums) {
    need_dh |= a == 0;
    need_dw |= a == 1;
    need_db |= a == bias_idx;
    if (q_.quantized && (a == 1 || a >= 3 + (has_bias_ ? 1 : 0))) {
      check.fail("no gradient with respect to a quantized head's weight, scales or biases "
           "(freeze them, as mlx-lm's QuantizedLinear requires).");
    }
  }
  std::vector<mx::array> grads_out;
  if (primals[0].shape(0) == 0) { // no tokens: zero gradients, no kernel
    for (int a : argnums) {
      grads_out.push_back(mx::zeros_like(primals[a], s));
    }
    return grads_out;
  }
  if (grad_in_forward_ && need_dh && !need_dw && !need_db) {
    // dh = g · dh_unit, no GEMM; g of ignored tokens is dropped, as the kernels do.
    const int V = primals[1].shape(0);
    const auto& y = primals[2];
    auto valid = mx::logical_and(mx::greater_equal(y, mx::array(0), s),
                                 mx::less(y, mx::array(V), s), s);
    auto g = mx::where(valid, mx::astype(cotangents[0], mx::float32, s),
                       mx::array(0.0f), s);
    grads_out = {mx::astype(mx::multiply(mx::expand_dims(g, 1, s), outputs[2], s),
                            primals[0].dtype(), s)};
  } else if (need_dh || need_dw || need_db) {
    std::vector<mx::array> in = {
        primals[0], primals[1], primals[2], outputs[1],
        contiguous_rows(mx::astype(cotangents[0], mx::float32, s), s)};
    in.insert(in.end(), primals.begin() + 3, primals.end());
    std::vector<mx::Shape> shapes;
    std::vector<mx::Dtype> dtypes;
    auto dt = primals[0].dtype();
    if (need_dh) {
      shapes.push_back(primals[0].shape());
      dtypes.push_back(dt);
    }
    if (need_dw) {
      shapes.push_back(primals[1].shape());
      dtypes.push_back(dt);
    }
    if (need_db) {
      shapes.push_back(primals[3].shape());
      dtypes.push_back(dt);
    }
    grads_out = mx::array::make_arrays(
        shapes,
        dtypes,
        std::make_shared<LinearCrossEntropyVJP>(
            s, has_bias_, q_, need_dh, need_dw, need_db),
        in);
  }
  std::vector<mx::array> result;
  int k = 0;
  for (int a : argnums) {
    if (a == 0 || a == 1 || a == bias_idx) {
      result.push_back(grads_out[k++]);
    } else {
      result.push_back(mx::zeros_like(primals[a], s)); // the integer targets
    }
  }
  return result;
}

std::vector<mx::Shape> LinearCrossEntropyVJP::output_shapes(
    const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> out;
  if (need_dh_) {
    out.push_back(inputs[0].shape());
  }
  if (need_dw_) {
    out.push_back(inputs[1].shape());
  }
  if (need_db_) {
    out.push_back(inputs[5].shape());
  }
  return out;
}

bool LinearCrossEntropyVJP::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LinearCrossEntropyVJP&>(other);
  return has_bias_ == o.has_bias_ && q_ == o.q_ && need_dh_ == o.need_dh_ &&
      need_dw_ == o.need_dw_ && need_db_ == o.need_db_;
}

#if !defined(MLX_TUNER_CROSS_ENTROPY_GPU) // no GPU kernel of this family in this build
void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[linear_cross_entropy] this build of mlx-tuner has no GPU kernel.");
}
void LinearCrossEntropyVJP::eval_gpu(
    const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[linear_cross_entropy] this build of mlx-tuner has no GPU kernel.");
}
#endif

} // namespace mlx_tuner
