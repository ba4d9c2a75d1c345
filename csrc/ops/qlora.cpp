// qlora_linear: validation, promotion, graph construction and the VJP (maths in
// ops/qlora.h). Kernels live in backend/{cpu,cuda,metal}/qlora.*.
#include "ops/qlora.h"

#include <algorithm>
#include <stdexcept>

#include "common/quant.h"
#include "common/checks.h"
#include "common/graph.h"
#include "mlx/ops.h"
#include "mlx/utils.h"

namespace mlx_tuner {

namespace {

constexpr ArgCheck check{"[qlora_linear]"};

} // namespace

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
    mx::StreamOrDevice s) {
  check.affine(bits, group_size);
  if (weight.dtype() != mx::uint32 || weight.ndim() != 2) {
    check.fail("weight must be a 2-D uint32 array from mx.quantize but got shape " +
         shape_str(weight.shape()) + ".");
  }
  check.floating("x", x);
  if (x.ndim() < 1) {
    check.fail("x must have at least 1 dimension(s) but got shape ().");
  }
  int n = weight.shape(0);
  int k = weight.shape(1) * 32 / bits;
  if (x.shape(-1) != k) {
    check.fail("x must have last dimension " + std::to_string(k) + " (from weight " +
         shape_str(weight.shape()) + " at " + std::to_string(bits) +
         " bits) but got shape " + shape_str(x.shape()) + ".");
  }
  if (k % group_size != 0) {
    check.fail("the input dimension " + std::to_string(k) + " must be a multiple of group_size " +
         std::to_string(group_size) + ".");
  }
  check.floating("scales", scales);
  check.floating("biases", biases);
  check.shape("scales", scales, {n, k / group_size});
  check.shape("biases", biases, {n, k / group_size});
  check.floating("lora_a", lora_a);
  check.floating("lora_b", lora_b);
  if (lora_a.ndim() != 2) {
    check.fail("lora_a must have 2 dimensions but got shape " + shape_str(lora_a.shape()) + ".");
  }
  if (lora_a.shape(0) != k) {
    check.fail("lora_a must have shape (" + std::to_string(k) + ", r) but got " +
         shape_str(lora_a.shape()) + ".");
  }
  int r = lora_a.shape(1);
  check.shape("lora_b", lora_b, {r, n});
  if (bias) {
    check.floating("bias", *bias);
    check.shape("bias", *bias, {n});
  }
  if (x_dropped) {
    check.floating("x_dropped", *x_dropped);
    check.shape("x_dropped", *x_dropped, x.shape());
  }

  // One activation dtype (what quantized_matmul + bias would give); the LoRA factors in
  // float32 so dA and dB are accumulated and returned at full precision.
  auto st = mx::to_stream(s);
  mx::Dtype dt = mx::promote_types(x.dtype(), mx::promote_types(scales.dtype(), biases.dtype()));
  if (bias) {
    dt = mx::promote_types(dt, bias->dtype());
  }
  auto prep = [&](const mx::array& a, mx::Dtype t) {
    return contiguous_rows(mx::astype(a, t, st), st);
  };
  std::vector<mx::array> inputs = {
      prep(x, dt),
      contiguous_rows(weight, st),
      prep(scales, dt),
      prep(biases, dt),
      prep(lora_a, mx::float32),
      prep(lora_b, mx::float32)};
  if (x_dropped) {
    inputs.push_back(prep(*x_dropped, dt));
  }
  if (bias) {
    inputs.push_back(prep(*bias, dt));
  }
  QLoRAParams p{scale, group_size, bits, x_dropped.has_value(), bias.has_value()};
  auto prim = std::make_shared<QLoRA>(st, p);
  auto shapes = prim->output_shapes(inputs);
  // xa = x_d A, saved for the backward: float32, except for the CUDA kernels, which only
  // ever read it in the compute dtype.
  auto xa_dtype = mx::float32;
#if defined(MLX_TUNER_CUDA)
  if (st.device == mx::Device::gpu) xa_dtype = dt;
#endif
  auto outs = mx::array::make_arrays(shapes, {dt, xa_dtype}, prim, inputs);
  return outs[0];
}

std::vector<mx::Shape> QLoRA::output_shapes(const std::vector<mx::array>& inputs) {
  mx::Shape y = inputs[0].shape();
  mx::Shape xa = y;
  y.back() = inputs[1].shape(0);
  xa.back() = inputs[4].shape(1);
  return {y, xa};
}

std::vector<mx::array> QLoRA::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto st = stream();
  const int xd_arg = p_.has_xd ? 6 : -1;
  const int bias_arg = p_.has_bias ? (p_.has_xd ? 7 : 6) : -1;
  QLoRAGrads g{false, false, false, false};
  for (int a : argnums) {
    if (a >= 1 && a <= 3) {
      static const char* names[] = {"", "weight", "scales", "biases"};
      check.fail(std::string("gradients with respect to ") + names[a] +
           " are not supported: the quantized base is frozen (pass it as a constant).");
    }
    g.dx |= a == 0;
    g.da |= a == 4;
    g.db |= a == 5;
    g.dxd |= a == xd_arg;
  }
  // xa is internal: only y's cotangent flows back.
  auto dy = contiguous_rows(cotangents[0], st);
  std::vector<mx::array> grads;
  if (g.dx || g.dxd || g.da || g.db) {
    const auto& xd = p_.has_xd ? primals[6] : primals[0];
    std::vector<mx::array> in = {
        dy, primals[1], primals[2], primals[3], primals[4], primals[5], xd, outputs[1]};
    std::vector<mx::Shape> shapes;
    std::vector<mx::Dtype> dtypes;
    auto add = [&](bool want, const mx::array& like) {
      if (want) {
        shapes.push_back(like.shape());
        dtypes.push_back(like.dtype());
      }
    };
    add(g.dx, primals[0]);
    add(g.dxd, xd);
    add(g.da, primals[4]);
    add(g.db, primals[5]);
    grads = mx::array::make_arrays(
        shapes, dtypes, std::make_shared<QLoRAVJP>(st, p_, g), in);
  }
  // grads are in the order dx, dxd, dA, dB; argnums may ask in any order.
  auto index_of = [&](int a) {
    int i = 0;
    for (auto [want, arg] : {std::pair{g.dx, 0}, {g.dxd, xd_arg}, {g.da, 4}, {g.db, 5}}) {
      if (arg == a) {
        return i;
      }
      i += want;
    }
    return -1;
  };
  std::vector<mx::array> out;
  for (int a : argnums) {
    if (a == bias_arg) {
      std::vector<int> axes(dy.ndim() - 1);
      for (int d = 0; d < static_cast<int>(dy.ndim()) - 1; ++d) {
        axes[d] = d;
      }
      auto db = mx::sum(mx::astype(dy, mx::float32, st), axes, false, st);
      out.push_back(mx::astype(db, primals[a].dtype(), st));
    } else {
      out.push_back(grads[index_of(a)]);
    }
  }
  return out;
}

std::vector<mx::Shape> QLoRAVJP::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> s;
  if (g_.dx) {
    s.push_back(inputs[6].shape());
  }
  if (g_.dxd) {
    s.push_back(inputs[6].shape());
  }
  if (g_.da) {
    s.push_back(inputs[4].shape());
  }
  if (g_.db) {
    s.push_back(inputs[5].shape());
  }
  return s;
}

namespace {
// Must match QL_BM / QL_BN / QL_THREADS and QL_SI / QL_SQ in metal/qlora.h.
constexpr size_t kMetalTile = 32, kMetalThreads = 128, kSkinnyI = 64, kSkinnyQ = 16;
} // namespace

MetalLaunch qlora_gemm_launch(bool fwd, int m, int n_out, int bits, const std::string& dtype) {
  return {
      std::string("qlora_gemm_") + (fwd ? "fwd_" : "bwd_") + dtype + "_b" + std::to_string(bits),
      {ceil_groups(n_out, kMetalTile), ceil_groups(m, kMetalTile), 1},
      {kMetalThreads, 1, 1}};
}

MetalLaunch qlora_skinny_launch(
    int ni,
    int nq,
    const std::string& p_dtype,
    const std::string& o_dtype) {
  return {
      "qlora_skinny_" + p_dtype + "_" + o_dtype,
      {ceil_groups(ni, kSkinnyI), ceil_groups(nq, kSkinnyQ), 1},
      {kMetalThreads, 1, 1}};
}

#if !defined(MLX_TUNER_QLORA_GPU) // no GPU kernel of this family in this build
// A CPU-only MLX has no GPU stream; reaching this means a GPU stream was forced.
void QLoRA::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[qlora_linear] this build has no GPU backend.");
}
void QLoRAVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[qlora_linear] this build has no GPU backend.");
}
#endif

} // namespace mlx_tuner
