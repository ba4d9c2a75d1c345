// dora_linear: validation, promotion, the graph node and its VJP (maths in dora.h).
// The bias is added outside the primitive: y_pre = rs * u is then exact enough to give u
// back in the backward (u = y_pre / rs), which saves both storing u and recomputing x W^T.
#include "ops/dora.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "common/checks.h"
#include "common/graph.h"
#include "ops/lora.h"
#include "ops/qlora.h"
#include "mlx/ops.h"
#define MLX_TUNER_DORA_PARAMS_ONLY
#include "metal/dora.h"

namespace mlx_tuner {

static_assert(mlx_tuner_dora::MAX_RANK == kInvNormMaxRank, "metal/dora.h and ops/dora.h");

namespace {

constexpr const char* kOp = "[dora_linear]";
constexpr ArgCheck check{kOp};

mx::array f32c(const mx::array& a, mx::StreamOrDevice s) {
  return contiguous_rows(mx::astype(a, mx::float32, s), s);
}

// The GPU path (validated inputs): the norms from the low-rank identity (W A by MLX's GEMM,
// ||W_i||^2 by DoRARowSqNorm, then 1/n by DoRAInvNorm up to rank kInvNormMaxRank, else MLX
// ops), the adapted product from the fused LoRA / QLoRA primitive,
// then the m / n column scale (DoRAScale); MLX differentiates the composition,
// calling those primitives' own backwards. Dtypes follow mlx-lm's
// maths. A, the only operand multiplied with W, is cast to W's dtype so that
// no out x in float32 copy of W is made.
mx::array compose_gpu(
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
    mx::StreamOrDevice s) {
  [[maybe_unused]] bool gpu = mx::to_stream(s).device == mx::Device::gpu;
  auto c = weight_sq_norm ? mx::astype(*weight_sq_norm, mx::float32, s)
                          : dora_weight_sq_norm(weight, scales, biases, group_size, bits, s);
  auto a_f = mx::astype(lora_a, mx::float32, s);
  auto b_f = mx::astype(lora_b, mx::float32, s);
  const int r = lora_a.shape(1);
#if defined(MLX_TUNER_DORA_GPU) // a CUDA or a Metal build with this family's kernels
  bool fused_norm = r <= kInvNormMaxRank;
#else
  bool fused_norm = !gpu && r <= kInvNormMaxRank;
#endif
  // W A by MLX: (W A)^T (r x out) from the quantized product, else (out x r)
  auto wa_product = [&] {
    return scales
        ? mx::quantized_matmul(mx::astype(mx::transpose(lora_a, s), scales->dtype(), s), weight,
                               *scales, *biases, true, group_size, bits, "affine", s)
        : mx::matmul(weight, mx::astype(lora_a, weight.dtype(), s), s);
  };
  // A quantized W's P = W A inside the norm node (CUDA, and the CPU's check of this graph):
  // no MLX quantized matmul of Aᵀ, two MLX ops fewer.
#if defined(MLX_TUNER_DORA_FUSED_GPU)
  bool qnorm_here = true;
#else
  bool qnorm_here = !gpu;
#endif
  bool qnorm = qnorm_here && scales && r >= 1 && r <= kInvNormQuantMaxRank &&
      weight.shape(1) > 0 &&
      (scales->dtype() == mx::float16 || scales->dtype() == mx::bfloat16);
  // sv = m / n, n treated as a constant (mlx-lm's stop_gradient)
  auto m_f = mx::astype(magnitude, mx::float32, s);
  mx::array sv = mx::array(0.0f);
  if (qnorm) {
    auto biases_t = mx::astype(*biases, scales->dtype(), s);
    sv = mx::multiply(m_f, dora_inv_norm_quant(weight, *scales, biases_t, b_f, a_f, c, scale,
                                               group_size, bits, s), s);
  } else if (fused_norm) {
    sv = mx::multiply(m_f, dora_inv_norm(wa_product(), b_f, a_f, c, scale, scales.has_value(), s), s);
  } else {
    auto p = wa_product();
    auto pt = scales ? p : mx::transpose(p, s);
    auto cross = mx::sum(mx::multiply(b_f, mx::astype(pt, mx::float32, s), s), 0, false, s);
    auto gb = mx::matmul(mx::matmul(mx::transpose(a_f, s), a_f, s), b_f, s);
    auto quad = mx::sum(mx::multiply(b_f, gb, s), 0, false, s);
    auto n2 = mx::add(c, mx::add(mx::multiply(mx::array(2 * scale), cross, s),
                                 mx::multiply(mx::array(scale * scale), quad, s), s), s);
    auto n = mx::stop_gradient(mx::sqrt(mx::maximum(n2, mx::array(0.0f), s), s), s);
    sv = mx::divide(m_f, n, s);
  }
  // x W^T + s (x_d A) B: the fused LoRA / QLoRA primitive where this build has its kernel
  // (one pass, no (N, out) float32 temporary); else MLX's GEMMs.
#if defined(MLX_TUNER_LORA_GPU)
  bool fused_dense = true;
#else
  bool fused_dense = !gpu;
#endif
#if defined(MLX_TUNER_QLORA_GPU)
  bool fused_quant = true;
#else
  bool fused_quant = !gpu;
#endif
  mx::array out = mx::array(0.0f);
  if (scales && fused_quant) {
    out = qlora_linear(x, weight, *scales, *biases, lora_a, lora_b, scale, std::nullopt,
                       x_dropped, group_size, bits, s);
  } else if (!scales && fused_dense) {
    out = lora_linear(x, weight, lora_a, lora_b, scale, std::nullopt, x_dropped, s);
  } else {
    mx::array y = scales
        ? mx::quantized_matmul(x, weight, *scales, *biases, true, group_size, bits, "affine", s)
        : mx::matmul(x, mx::transpose(weight, s), s);
    const auto& xd = x_dropped ? *x_dropped : x;
    auto z = mx::matmul(mx::matmul(xd, lora_a, s), lora_b, s);
    out = mx::add(y, mx::astype(mx::multiply(mx::array(scale), z, s), x.dtype(), s), s);
  }
  // y = (m / n) * out (+ bias): one DoRAScale kernel each way (CUDA and Metal); on CUDA
  // MLX's differentiated multiply cost ~200 us a step at N = out = 4096 (bf16). dm = dsv / n
  // comes from MLX's divide on (out,) vectors.
#if defined(MLX_TUNER_DORA_GPU)
  bool fused_scale = true;
#else
  bool fused_scale = !gpu;
#endif
  if (!fused_scale) {
    out = mx::multiply(mx::astype(sv, x.dtype(), s), out, s);
    return bias ? mx::add(out, *bias, s) : out;
  }
  int cols = out.shape(-1);
  int rows = 1;
  for (int i = 0; i + 1 < static_cast<int>(out.ndim()); ++i) {
    rows *= out.shape(i);
  }
  // A bias of another dtype promotes the output (mlx-lm's add): added outside then.
  bool fold_bias = bias && bias->dtype() == out.dtype();
  auto y = dora_scale(mx::reshape(out, {rows, cols}, s), sv,
                      fold_bias ? bias : std::nullopt, s);
  y = mx::reshape(y, out.shape(), s);
  return bias && !fold_bias ? mx::add(y, *bias, s) : y;
}

constexpr ArgCheck scale_check{"[dora_scale]"};

void check_metal_dtype(const std::string& dtype) {
  if (dtype != "float32" && dtype != "float16" && dtype != "bfloat16") {
    throw std::invalid_argument("[dora_linear] no Metal kernel for dtype " + dtype + ".");
  }
}

// The norm nodes' float32 operands: B (r, out), A (in, r), c (out,).
void check_norm_operands(const ArgCheck& check, const mx::array& b, const mx::array& a,
                         const mx::array& c, int r, int out) {
  check.shape("c", c, {out});
  check.shape("b", b, {r, out});
  check.dtype("b", b, mx::float32);
  check.dtype("a", a, mx::float32);
  check.dtype("c", c, mx::float32);
}

} // namespace

MetalLaunch metal_launch_dora_row_sq_norm(int rows, const std::string& dtype, int bits) {
  std::string name = bits ? "dora_row_sq_q" + std::to_string(bits) + "_" + dtype : "dora_row_sq_" + dtype;
  return {name, {static_cast<size_t>(rows), 1, 1}, {mlx_tuner_dora::ROW_THREADS, 1, 1}};
}

MetalLaunch metal_launch_dora_gram(int r) {
  using namespace mlx_tuner_dora;
  return {"dora_gram", {static_cast<size_t>(r), 1, 1}, {GRAM_THREADS, 1, 1}};
}

MetalLaunch metal_launch_dora_inv_norm(int out, const std::string& dtype) {
  using namespace mlx_tuner_dora;
  check_metal_dtype(dtype);
  return {"dora_inv_norm_" + dtype, {ceil_groups(out, NORM_THREADS), 1, 1}, {NORM_THREADS, 1, 1}};
}

MetalLaunch metal_launch_dora_scale(int rows, int cols, const std::string& dtype, bool has_bias) {
  using namespace mlx_tuner_dora;
  check_metal_dtype(dtype);
  return {"dora_scale_" + dtype + (has_bias ? "_bias" : "_nobias"),
          {ceil_groups(cols, SCALE_COLS), ceil_groups(rows, SCALE_ROWS), 1},
          {SCALE_COLS, 1, 1}};
}

MetalLaunch metal_launch_dora_scale_vjp(int rows, int cols, const std::string& dtype) {
  using namespace mlx_tuner_dora;
  check_metal_dtype(dtype);
  // Tiles of at least VJP_MIN_TILE_ROWS rows, only as many as make about VJP_TARGET_TILES
  // threadgroups: the float32 partial rows stay small next to dy. No empty tile (the
  // kernel takes ceil(rows / row tiles) rows a tile).
  int col_tiles = static_cast<int>(ceil_groups(cols, VJP_TX));
  int row_tiles = 0;
  if (rows > 0 && cols > 0) {
    row_tiles = std::min(static_cast<int>(ceil_groups(rows, VJP_MIN_TILE_ROWS)),
                         std::max(1, static_cast<int>(ceil_groups(VJP_TARGET_TILES, col_tiles))));
    int per_tile = static_cast<int>(ceil_groups(rows, row_tiles));
    row_tiles = static_cast<int>(ceil_groups(rows, per_tile));
  }
  return {"dora_scale_vjp_" + dtype,
          {static_cast<size_t>(col_tiles), static_cast<size_t>(row_tiles), 1},
          {VJP_TX, VJP_TY, 1}};
}

MetalLaunch metal_launch_dora_scale_colsum(int cols, const std::string& dtype) {
  using namespace mlx_tuner_dora;
  check_metal_dtype(dtype);
  return {"dora_scale_colsum_" + dtype, {ceil_groups(cols, COLSUM_THREADS), 1, 1},
          {COLSUM_THREADS, 1, 1}};
}

mx::array dora_weight_sq_norm(
    const mx::array& weight,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  if (weight.ndim() != 2) {
    throw std::invalid_argument(
        "[dora_weight_sq_norm] weight must have 2 dimensions but got shape " + shape_str(weight.shape()) + ".");
  }
  std::vector<mx::array> in = {contiguous_rows(weight, s)};
  if (scales) {
    if (!biases) {
      throw std::invalid_argument("[dora_weight_sq_norm] biases must be given with scales.");
    }
    in.push_back(contiguous_rows(*scales, s));
    in.push_back(contiguous_rows(mx::astype(*biases, scales->dtype(), s), s));
  }
  return mx::array(
      {weight.shape(0)},
      mx::float32,
      std::make_shared<DoRARowSqNorm>(mx::to_stream(s), scales.has_value(), group_size, bits),
      in);
}

mx::array dora_inv_norm(
    const mx::array& p,
    const mx::array& b,
    const mx::array& a,
    const mx::array& c,
    float scale,
    bool p_transposed,
    mx::StreamOrDevice s) {
  constexpr ArgCheck check{"[dora_inv_norm]"};
  check.ndim("a", a, 2);
  int r = a.shape(1), out = c.size();
  if (r > kInvNormMaxRank) {
    check.fail("a must have at most " + std::to_string(kInvNormMaxRank) +
               " columns (the rank) but got shape " + shape_str(a.shape()) + ".");
  }
  check_norm_operands(check, b, a, c, r, out);
  check.shape("p", p, p_transposed ? mx::Shape{r, out} : mx::Shape{out, r});
  check.floating("p", p);
  std::vector<mx::array> in = {contiguous_rows(p, s), contiguous_rows(b, s),
                               contiguous_rows(a, s), contiguous_rows(c, s)};
  return mx::stop_gradient(
      mx::array({out}, mx::float32,
                std::make_shared<DoRAInvNorm>(mx::to_stream(s), scale, p_transposed), in),
      s);
}

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
    mx::StreamOrDevice s) {
  constexpr ArgCheck check{"[dora_inv_norm_quant]"};
  check.ndim("wq", wq, 2);
  check.ndim("a", a, 2);
  if (wq.dtype() != mx::uint32) check.fail("wq must be uint32 from mx.quantize.");
  check.affine(bits, group_size);
  int out = wq.shape(0), in = wq.shape(1) * 32 / bits, r = a.shape(1);
  if (r < 1 || r > kInvNormQuantMaxRank) {
    check.fail("a must have 1 to " + std::to_string(kInvNormQuantMaxRank) +
               " columns (the rank) but got shape " + shape_str(a.shape()) + ".");
  }
  if (in < 1) check.fail("wq must have at least one column but got shape " + shape_str(wq.shape()) + ".");
  if (scales.dtype() != mx::float16 && scales.dtype() != mx::bfloat16) {
    check.fail("scales must be float16 or bfloat16.");
  }
  check.shape("scales", scales, {out, in / group_size});
  check.shape("biases", biases, {out, in / group_size});
  check.dtype("biases", biases, scales.dtype());
  check.shape("a", a, {in, r});
  check_norm_operands(check, b, a, c, r, out);
  std::vector<mx::array> inputs = {contiguous_rows(wq, s), contiguous_rows(scales, s),
                                   contiguous_rows(biases, s), contiguous_rows(b, s),
                                   contiguous_rows(a, s), contiguous_rows(c, s)};
  return mx::stop_gradient(
      mx::array({out}, mx::float32,
                std::make_shared<DoRAInvNorm>(mx::to_stream(s), scale, false, bits, group_size),
                inputs),
      s);
}

mx::array dora_scale(
    const mx::array& z,
    const mx::array& sv,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  scale_check.ndim("z", z, 2);
  scale_check.floating("z", z);
  int cols = z.shape(1);
  scale_check.shape("sv", sv, {cols});
  scale_check.dtype("sv", sv, mx::float32);
  std::vector<mx::array> in = {contiguous_rows(z, s), contiguous_rows(sv, s)};
  if (bias) {
    scale_check.shape("bias", *bias, {cols});
    if (bias->dtype() != z.dtype()) {
      scale_check.fail("bias must have z's dtype " + dtype_str(z.dtype()) + " but got " +
                       dtype_str(bias->dtype()) + ".");
    }
    in.push_back(contiguous_rows(*bias, s));
  }
  auto stream = mx::to_stream(s);
  return mx::array(
      z.shape(), z.dtype(), std::make_shared<DoRAScale>(stream, bias.has_value()), std::move(in));
}

std::vector<mx::array> DoRAScale::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  const auto& z = primals[0];
  DoRAScaleWant want;
  for (int a : argnums) {
    want.z |= a == 0;
    want.sv |= a == 1;
    want.bias |= has_bias_ && a == 2;
  }
  if (!want.z && !want.sv && !want.bias) {
    return {};
  }
  auto dy = contiguous_rows(mx::astype(cotangents[0], z.dtype(), s), s);
  std::vector<mx::array> in = {dy, primals[1]};
  if (want.sv) {
    in.push_back(z); // z is read only for dsv
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  int cols = z.shape(1);
  if (want.z) {
    shapes.push_back(z.shape());
    dtypes.push_back(z.dtype());
  }
  if (want.sv) {
    shapes.push_back({cols});
    dtypes.push_back(mx::float32);
  }
  if (want.bias) {
    shapes.push_back({cols});
    dtypes.push_back(primals[2].dtype());
  }
  auto grads = mx::array::make_arrays(
      std::move(shapes), dtypes, std::make_shared<DoRAScaleVJP>(s, want), std::move(in));
  std::vector<mx::array> result;
  for (int a : argnums) {
    int k = a == 0 ? 0 : a == 1 ? int(want.z) : int(want.z) + int(want.sv);
    result.push_back(grads[k]);
  }
  return result;
}

std::vector<mx::array> DoRAScale::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  const auto& z = primals[0];
  auto f32 = [&](const mx::array& a) { return mx::astype(a, mx::float32, s); };
  std::optional<mx::array> t;
  for (size_t i = 0; i < argnums.size(); ++i) {
    int a = argnums[i];
    auto term = a == 0 ? mx::multiply(f32(tangents[i]), primals[1], s)
        : a == 1       ? mx::multiply(f32(z), tangents[i], s)
                       : f32(tangents[i]);
    t = t ? mx::add(*t, term, s) : mx::broadcast_to(term, z.shape(), s);
  }
  return {mx::astype(*t, z.dtype(), s)};
}

DoRAInputs::DoRAInputs(const DoRAConfig& cfg) {
  int i = 1;
  xd = cfg.has_xd ? i++ : 0;
  w = i++;
  if (cfg.quantized) {
    scales = i++;
    biases = i++;
  }
  a = i++;
  b = i++;
  m = i++;
  c = cfg.has_c ? i++ : -1;
  count = i;
}

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
    mx::StreamOrDevice s,
    bool compose) {
  DoRAConfig cfg;
  cfg.scale = scale;
  cfg.quantized = scales.has_value();
  cfg.group_size = group_size;
  cfg.bits = bits;
  cfg.has_xd = x_dropped.has_value();
  cfg.has_c = weight_sq_norm.has_value();

  if (x.ndim() < 1) {
    check.fail("x must have at least 1 dimension(s) but got shape ().");
  }
  check.floating("x", x);
  check.ndim("weight", weight, 2);
  int out = weight.shape(0);
  int in = weight.shape(1);
  mx::Dtype wdtype = weight.dtype();
  if (cfg.quantized) {
    if (weight.dtype() != mx::uint32) {
      check.fail("weight must be uint32 from mx.quantize.");
    }
    check.affine(bits, group_size);
    if (!biases) {
      check.fail("biases must be given for mode 'affine' but got None.");
    }
    in = weight.shape(1) * 32 / bits;
    check.floating("scales", *scales);
    check.shape("scales", *scales, {out, in / group_size});
    check.shape("biases", *biases, {out, in / group_size});
    wdtype = scales->dtype();
  } else {
    check.floating("weight", weight);
  }
  if (x.shape(-1) != in) {
    check.fail("x must have last dimension " + std::to_string(in) + " but got shape " +
               shape_str(x.shape()) + ".");
  }
  check.ndim("lora_a", lora_a, 2);
  int r = lora_a.shape(1);
  check.floating("lora_a", lora_a);
  check.floating("lora_b", lora_b);
  check.floating("magnitude", magnitude);
  check.shape("lora_a", lora_a, {in, r});
  check.shape("lora_b", lora_b, {r, out});
  check.shape("magnitude", magnitude, {out});
  if (bias) {
    check.floating("bias", *bias);
    check.shape("bias", *bias, {out});
  }
  if (x_dropped) {
    check.floating("x_dropped", *x_dropped);
    check.shape("x_dropped", *x_dropped, x.shape());
  }
  if (weight_sq_norm) {
    check.shape("weight_sq_norm", *weight_sq_norm, {out});
  }

  auto stream = mx::to_stream(s);
  bool gpu = stream.device == mx::Device::gpu;
#if defined(MLX_TUNER_DORA_FUSED_GPU)
  // CUDA, dense, one dtype: the two primitives below (their kernels in dora.cu).
  // MLX_TUNER_DORA_FUSED=0 composes instead (to time one against the other).
  static const bool fused_on = [] {
    const char* v = std::getenv("MLX_TUNER_DORA_FUSED");
    return !(v && v[0] == '0');
  }();
  // Quantized (with the qlora family): x in the scales' dtype, float16 or bfloat16, what
  // QLoRA's rank-r kernels take (ranks 1 to 16, widths multiples of 16).
  bool quant_ok = false;
#if defined(MLX_TUNER_QDORA_FUSED_GPU)
  quant_ok = scales && x.dtype() == scales->dtype() &&
      (x.dtype() == mx::float16 || x.dtype() == mx::bfloat16) && r >= 1 &&
      r <= kInvNormQuantMaxRank && in % 16 == 0 && out % 16 == 0;
#endif
  bool fused_gpu = fused_on && gpu && !compose &&
      (scales ? quant_ok : x.dtype() == weight.dtype() && r <= kInvNormMaxRank);
#else
  bool fused_gpu = false;
#endif
  if ((gpu && !fused_gpu) || compose) {
    return compose_gpu(x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped, scales,
                       biases, group_size, bits, weight_sq_norm, s);
  }
  mx::Dtype out_dtype = mx::promote_types(x.dtype(), wdtype);
  int n_rows = 1;
  for (int i = 0; i + 1 < static_cast<int>(x.ndim()); ++i) {
    n_rows *= x.shape(i);
  }
  auto flat = [&](const mx::array& a) {
    return contiguous_rows(mx::reshape(mx::astype(a, x.dtype(), s), {n_rows, in}, s), s);
  };
  std::vector<mx::array> inputs = {flat(x)};
  if (cfg.has_xd) {
    inputs.push_back(flat(*x_dropped));
  }
  inputs.push_back(contiguous_rows(weight, s));
  if (cfg.quantized) {
    inputs.push_back(contiguous_rows(*scales, s));
    inputs.push_back(contiguous_rows(mx::astype(*biases, scales->dtype(), s), s));
  }
  inputs.push_back(f32c(lora_a, s));
  inputs.push_back(f32c(lora_b, s));
  inputs.push_back(f32c(magnitude, s));
  if (cfg.has_c) {
    inputs.push_back(f32c(*weight_sq_norm, s));
  }
  auto outs = mx::array::make_arrays(
      {{n_rows, out}, {n_rows, r}, {out}},
      // xa in float32 on the CPU; on CUDA in T, as LoRA's GPU forward writes it
      {out_dtype, fused_gpu ? x.dtype() : mx::float32, mx::float32},
      std::make_shared<DoRALinear>(stream, cfg),
      inputs);
  auto y_shape = x.shape();
  y_shape.back() = out;
  auto y = mx::reshape(outs[0], y_shape, s);
  if (bias) {
    y = mx::add(y, *bias, s);
  }
  return y;
}

std::vector<mx::Shape> DoRALinear::output_shapes(const std::vector<mx::array>& in) {
  DoRAInputs idx(cfg_);
  int n = in[idx.x].shape(0);
  int r = in[idx.a].shape(1);
  int out = in[idx.m].shape(0);
  return {{n, out}, {n, r}, {out}};
}

std::vector<mx::array> DoRALinear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  DoRAInputs idx(cfg_);
  DoRAWant want{};
  for (int a : argnums) {
    if (a == idx.x) want[kGradX] = true;
    else if (cfg_.has_xd && a == idx.xd) want[kGradXd] = true;
    else if (a == idx.a) want[kGradA] = true;
    else if (a == idx.b) want[kGradB] = true;
    else if (a == idx.m) want[kGradM] = true;
  }
  // Only y's cotangent carries gradient: xa and n are saved values, n a stop_gradient.
  const mx::array& y = outputs[0];
  mx::array dy = contiguous_rows(mx::astype(cotangents[0], y.dtype(), s), s);
  std::vector<mx::array> grads_out;
  bool any = false;
  for (bool w : want) any |= w;
  if (any) {
    std::vector<mx::Shape> shapes;
    std::vector<mx::Dtype> dtypes;
    const mx::array* src[kNumGrads] = {
        &primals[idx.x], &primals[idx.xd], &primals[idx.a], &primals[idx.b], &primals[idx.m]};
    for (int g = 0; g < kNumGrads; ++g) {
      if (want[g]) {
        shapes.push_back(src[g]->shape());
        dtypes.push_back(src[g]->dtype());
      }
    }
    auto ins = primals;
    ins.push_back(outputs[2]);
    ins.push_back(outputs[1]);
    ins.push_back(y);
    ins.push_back(dy);
    grads_out = mx::array::make_arrays(
        shapes, dtypes, std::make_shared<DoRALinearVJP>(s, cfg_, want), ins);
  }
  std::vector<mx::array> result;
  int k = 0;
  for (int a : argnums) {
    if (a == idx.x || (cfg_.has_xd && a == idx.xd) || a == idx.a || a == idx.b || a == idx.m) {
      result.push_back(grads_out[k++]);
    } else if (a == idx.w && !cfg_.quantized) {
      // The frozen weight, only when asked: dW = (dy * rs)^T x_flat (out x in, the gradient
      // itself); the norm path is a stop_gradient as in mlx-lm.
      auto rs = mx::divide(primals[idx.m], outputs[2], s);
      auto g = mx::multiply(mx::astype(dy, mx::float32, s), rs, s);
      auto dw = mx::matmul(mx::transpose(g, s), mx::astype(primals[idx.x], mx::float32, s), s);
      result.push_back(mx::astype(dw, primals[idx.w].dtype(), s));
    } else if (a == idx.c) {
      result.push_back(mx::zeros_like(primals[a], s));
    } else {
      throw std::invalid_argument(
          std::string(kOp) + " cannot compute gradients with respect to the quantized weight.");
    }
  }
  return result;
}

#if !defined(MLX_TUNER_DORA_FUSED_GPU)
// On this GPU the op composes (compose_gpu): these two nodes are only built for the CPU.
void DoRALinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[dora_linear] DoRALinear has no GPU kernel (the GPU path composes).");
}
void DoRALinearVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[dora_linear] DoRALinearVJP has no GPU kernel (the GPU path composes).");
}
#endif

#if !defined(MLX_TUNER_DORA_GPU)
// No GPU kernel of this family in this build (CPU only; the Python op runs the reference
// on a GPU then). The kernels: backend/cuda/dora.cu, backend/metal/dora.cpp.
void DoRARowSqNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[dora_weight_sq_norm] this build has no GPU kernels.");
}
void DoRAInvNorm::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[dora_inv_norm] DoRAInvNorm has no GPU kernel in this build.");
}
void DoRAScale::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[dora_scale] DoRAScale has no GPU kernel in this build.");
}
void DoRAScaleVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[dora_scale] DoRAScaleVJP has no GPU kernel in this build.");
}
#endif

} // namespace mlx_tuner
