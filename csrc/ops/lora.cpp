// The fused LoRA linear op: validate, promote, flatten and make contiguous, then build
// the forward primitive; its vjp builds the fused backward primitive. Maths in lora.h.
#include "ops/lora.h"

#include <stdexcept>

#include "common/checks.h"
#include "common/graph.h"
#include "mlx/ops.h"
#define MLX_TUNER_LORA_PARAMS_ONLY
#include "metal/lora.h"

namespace mlx_tuner {

namespace {

constexpr ArgCheck check{"[lora_linear]"};

void check_metal_dtypes(const std::string& t, const std::string& u) {
  bool ok_t = t == "float32" || t == "float16" || t == "bfloat16";
  if (!ok_t || (u != t && u != "float32")) {
    throw std::invalid_argument(
        "[lora_linear] no Metal kernel for activations " + t + " with LoRA parameters " + u);
  }
}

} // namespace

MetalLaunch metal_launch_lora_xa(int n, int r, const std::string& t, const std::string& u) {
  using namespace mlx_tuner_lora;
  check_metal_dtypes(t, u);
  return {"lora_xa_" + t + "_" + u,
          {ceil_groups(r, XA_COLS), ceil_groups(n, XA_ROWS), 1},
          {XA_COLS, XA_ROWS, 1}};
}

MetalLaunch metal_launch_lora_linear(
    int n, int out, const std::string& t, const std::string& u, bool has_bias) {
  using namespace mlx_tuner_lora;
  check_metal_dtypes(t, u);
  return {"lora_linear_" + t + "_" + u + (has_bias ? "_bias" : "_nobias"),
          {ceil_groups(out, BN), ceil_groups(n, BM), 1},
          {THREADS, 1, 1}};
}

MetalLaunch metal_launch_lora_g(int n, const std::string& t, const std::string& u) {
  using namespace mlx_tuner_lora;
  check_metal_dtypes(t, u);
  return {"lora_g_" + t + "_" + u, {1, ceil_groups(n, G_ROWS), 1}, {32 * G_ROWS, 1, 1}};
}

MetalLaunch metal_launch_lora_dx(
    int n, int in, const std::string& t, const std::string& u, bool base, bool lora) {
  using namespace mlx_tuner_lora;
  check_metal_dtypes(t, u);
  if (!base && !lora) {
    throw std::invalid_argument(
        "[lora_linear] the dx kernel needs dy W, s g A^T or both");
  }
  // dy W alone reads no LoRA parameter: one instantiation per activation dtype.
  auto name = !lora ? "lora_dx_base_" + t
                    : (base ? "lora_dx_" : "lora_dxd_") + t + "_" + u;
  return {name, {ceil_groups(in, BN), ceil_groups(n, BM), 1}, {THREADS, 1, 1}};
}

namespace {

// A thread per element of a (p, q) parameter gradient, q across adjacent threads: as
// many as q needs (8, 16 or 32: ranks are small), the rest of the threadgroup on p.
MetalLaunch param_grad_launch(const std::string& kernel, int p, int q) {
  using namespace mlx_tuner_lora;
  int wq = q <= 8 ? 8 : (q <= 16 ? 16 : 32);
  int wp = PG_THREADS / wq;
  return {kernel,
          {ceil_groups(q, wq), ceil_groups(p, wp), 1},
          {static_cast<size_t>(wq), static_cast<size_t>(wp), 1}};
}

} // namespace

MetalLaunch metal_launch_lora_da(
    int in, int r, const std::string& t, const std::string& u) {
  check_metal_dtypes(t, u);
  return param_grad_launch("lora_da_" + t + "_" + u, in, r);
}

MetalLaunch metal_launch_lora_db(
    int r, int out, const std::string& t, const std::string& u) {
  check_metal_dtypes(t, u);
  return param_grad_launch("lora_db_" + t + "_" + u, r, out);
}

mx::array lora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    float scale,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& x_dropped,
    mx::StreamOrDevice s_) {
  auto s = mx::to_stream(s_);
  if (x.ndim() < 1) {
    check.fail("x must have at least 1 dimension(s) but got shape " + shape_str(x.shape()) + ".");
  }
  if (weight.ndim() != 2) {
    check.fail("weight must have 2 dimensions but got shape " + shape_str(weight.shape()) + ".");
  }
  int out_dims = weight.shape(0), in_dims = weight.shape(1);
  if (x.shape(-1) != in_dims) {
    check.fail(
        "x must have last dimension " + std::to_string(in_dims) + " (weight is " +
        shape_str(weight.shape()) + ") but got shape " + shape_str(x.shape()) + ".");
  }
  if (lora_a.ndim() != 2) {
    check.fail("lora_a must have 2 dimensions but got shape " + shape_str(lora_a.shape()) + ".");
  }
  int r = lora_a.shape(1);
  check.shape("lora_a", lora_a, {in_dims, r});
  check.shape("lora_b", lora_b, {r, out_dims});
  check.floating("x", x);
  check.floating("weight", weight);
  check.floating("lora_a", lora_a);
  check.floating("lora_b", lora_b);
  if (bias) {
    check.floating("bias", *bias);
    check.shape("bias", *bias, {out_dims});
  }
  if (x_dropped) {
    check.floating("x_dropped", *x_dropped);
    check.shape("x_dropped", *x_dropped, x.shape());
  }

  // mlx-lm: y = x W^T (+ bias) in the promoted dtype, plus the LoRA term cast to x's.
  auto out_dtype = mx::promote_types(x.dtype(), weight.dtype());
  if (bias) {
    out_dtype = mx::promote_types(out_dtype, bias->dtype());
  }
  int64_t n_rows = x.size() / std::max(in_dims, 1);
  if (in_dims == 0) {
    n_rows = 1;
    for (size_t i = 0; i + 1 < x.ndim(); ++i) n_rows *= x.shape(i);
  }
  mx::Shape flat = {static_cast<int>(n_rows), in_dims};

  // The CPU kernel widens any float dtype itself; the GPU kernels take one compute
  // dtype for x, W, bias, x_d and accumulate in float32.
  bool gpu = s.device == mx::Device::gpu;
  auto prep = [&](const mx::array& a, bool reshape) {
    auto t = reshape ? mx::reshape(a, flat, s) : a;
    if (gpu) {
      t = mx::astype(t, out_dtype, s);
    }
    return contiguous_rows(t, s);
  };
  // LoRA parameters keep float32 (their gradients stay float32) or the compute dtype.
  auto prep_lora = [&](const mx::array& a) {
    auto t = a;
    if (gpu && a.dtype() != mx::float32 && a.dtype() != out_dtype) {
      t = mx::astype(t, mx::float32, s);
    }
    return contiguous_rows(t, s);
  };
  std::vector<mx::array> inputs = {
      prep(x, true), prep(weight, false), prep_lora(lora_a), prep_lora(lora_b)};
  if (bias) {
    inputs.push_back(prep(*bias, false));
  }
  if (x_dropped) {
    inputs.push_back(prep(*x_dropped, true));
  }
  // xa = x_d A, saved for the backward: float32, except for the CUDA kernels, which only
  // ever read it in the compute dtype (one conversion less each way).
  auto xa_dtype = mx::float32;
#if defined(MLX_TUNER_CUDA)
  if (gpu) xa_dtype = out_dtype;
#endif
  auto outs = mx::array::make_arrays(
      {{flat[0], out_dims}, {flat[0], r}},
      {out_dtype, xa_dtype},
      std::make_shared<LoRALinear>(s, scale, bias.has_value(), x_dropped.has_value()),
      inputs);
  auto out_shape = x.shape();
  out_shape.back() = out_dims;
  return mx::reshape(outs[0], out_shape, s);
}

std::vector<mx::Shape> LoRALinear::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[1].shape(0)}, {inputs[0].shape(0), inputs[2].shape(1)}};
}

bool LoRALinear::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LoRALinear&>(other);
  return scale_ == o.scale_ && has_bias_ == o.has_bias_ && has_xd_ == o.has_xd_;
}

std::vector<mx::array> LoRALinear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // xa (outputs[1]) is internal to lora_linear, which returns y only: its cotangent is
  // never anything but zeros and is ignored.
  auto s = stream();
  int bias_idx = has_bias_ ? 4 : -1;
  int xd_idx = has_xd_ ? (has_bias_ ? 5 : 4) : -1;
  LoRAGrads want;
  for (int a : argnums) {
    want.x |= a == 0;
    want.weight |= a == 1;
    want.lora_a |= a == 2;
    want.lora_b |= a == 3;
    want.bias |= a == bias_idx;
    want.x_dropped |= a == xd_idx;
  }
  auto dy = contiguous_rows(mx::astype(cotangents[0], outputs[0].dtype(), s), s);
  // On the GPU (CUDA and Metal), dW and dbias are one plain GEMM / reduction: MLX's own
  // are as good. The rest is the fused LoRALinearVJP.
  bool gpu = s.device == mx::Device::gpu;
  LoRAGrads in_kernel = want;
  if (gpu) {
    in_kernel.weight = in_kernel.bias = false;
  }

  std::vector<mx::array> kernel_grads;
  if (in_kernel.x || in_kernel.weight || in_kernel.lora_a || in_kernel.lora_b ||
      in_kernel.bias || in_kernel.x_dropped) {
    std::vector<mx::array> inputs = {
        primals[0], primals[1], primals[2], primals[3], outputs[1], dy};
    if (has_xd_) {
      inputs.push_back(primals[xd_idx]);
    }
    std::vector<mx::Shape> shapes;
    std::vector<mx::Dtype> dtypes;
    in_kernel.output_specs(primals, bias_idx, xd_idx, shapes, dtypes);
    kernel_grads = mx::array::make_arrays(
        shapes,
        dtypes,
        std::make_shared<LoRALinearVJP>(s, scale_, has_xd_, in_kernel),
        inputs);
  }

  // Hand the gradients back in argnums order.
  std::vector<mx::array> grads;
  for (int a : argnums) {
    int k = 0;
    auto slot = [&](bool on, bool before) { k += (on && before) ? 1 : 0; };
    if (a == 1 && gpu) {
      auto dw = mx::matmul(mx::transpose(dy, {1, 0}, s), primals[0], s);
      grads.push_back(mx::astype(dw, primals[1].dtype(), s));
      continue;
    }
    if (a == bias_idx && gpu) {
      auto db = mx::sum(mx::astype(dy, mx::float32, s), 0, false, s);
      grads.push_back(mx::astype(db, primals[bias_idx].dtype(), s));
      continue;
    }
    // position of gradient `a` among the kernel's outputs
    slot(in_kernel.x, a > 0);
    slot(in_kernel.weight, a > 1);
    slot(in_kernel.lora_a, a > 2);
    slot(in_kernel.lora_b, a > 3);
    if (has_bias_) slot(in_kernel.bias, a > bias_idx);
    grads.push_back(kernel_grads[k]);
  }
  return grads;
}

std::vector<mx::Shape> LoRALinearVJP::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  if (grads_.x) shapes.push_back(inputs[0].shape());
  if (grads_.weight) shapes.push_back(inputs[1].shape());
  if (grads_.lora_a) shapes.push_back(inputs[2].shape());
  if (grads_.lora_b) shapes.push_back(inputs[3].shape());
  if (grads_.bias) shapes.push_back({inputs[1].shape(0)});
  if (grads_.x_dropped) shapes.push_back(inputs[0].shape());
  return shapes;
}

bool LoRALinearVJP::is_equivalent(const mx::Primitive& other) const {
  auto& o = static_cast<const LoRALinearVJP&>(other);
  return scale_ == o.scale_ && has_xd_ == o.has_xd_ && grads_ == o.grads_;
}

#if !defined(MLX_TUNER_LORA_GPU) // no GPU kernel of this family in this build
// A CPU-only MLX has no GPU stream; reaching these means a GPU stream was forced.
void LoRALinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[lora_linear] this build of mlx-tuner has no GPU kernel");
}
void LoRALinearVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[lora_linear] this build of mlx-tuner has no GPU kernel");
}
#endif

} // namespace mlx_tuner
