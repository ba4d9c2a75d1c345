// KL / JS divergence ops: validate, promote, make contiguous, build the primitives; the
// VJP as a second fused primitive. The maths is at the top of divergence.h.
#include "ops/divergence.h"

#include <algorithm>
#include <stdexcept>

#include "metal/divergence.h"
#include "common/checks.h"
#include "common/graph.h"
#include "mlx/ops.h"

namespace mlx_tuner {

namespace {

void check_input(const char* op, const char* name, const mx::array& a) {
  if (a.ndim() < 1) {
    throw std::invalid_argument(std::string("[") + op + "] " + name +
                                " must have at least 1 dimension(s) but got shape ().");
  }
  if (!mx::issubdtype(a.dtype(), mx::floating) || a.dtype() == mx::float64) {
    throw std::invalid_argument(std::string("[") + op + "] " + name +
                                " must be float32, float16 or bfloat16 but got " +
                                dtype_name(a.dtype()) + ".");
  }
}

} // namespace

std::string dtype_name(mx::Dtype t) {
  return dtype_str(t);
}

mx::array divergence(
    Divergence kind,
    const mx::array& q_in,
    const mx::array& p_in,
    mx::StreamOrDevice s) {
  const char* op = divergence_op_name(kind);
  check_input(op, "logits_q", q_in);
  check_input(op, "logits_p", p_in);
  if (q_in.shape() != p_in.shape()) {
    throw std::invalid_argument(std::string("[") + op + "] logits_p must have the shape of logits_q " +
                                shape_str(q_in.shape()) + " but got " + shape_str(p_in.shape()) +
                                ".");
  }
  int V = q_in.shape(-1);
  if (V < 1) {
    throw std::invalid_argument(std::string("[") + op +
                                "] logits_q must have a last dimension of at least 1 but got shape " +
                                shape_str(q_in.shape()) + ".");
  }
  auto stream = mx::to_stream(s);
  auto dtype = mx::promote_types(q_in.dtype(), p_in.dtype());
  // Kernels index rows densely: row-contiguous copies only where the layout needs one.
  auto q = contiguous_rows(mx::astype(q_in, dtype, stream), stream);
  auto p = contiguous_rows(mx::astype(p_in, dtype, stream), stream);
  auto out_shape = q.shape();
  out_shape.pop_back();
  auto stats_shape = out_shape;
  stats_shape.push_back(kDivStats);
  auto outs = mx::array::make_arrays(
      {out_shape, stats_shape},
      {dtype, mx::float32},
      std::make_shared<DivergenceForward>(stream, kind),
      {q, p});
  return outs[0];
}

mx::array kl_div(const mx::array& q, const mx::array& p, mx::StreamOrDevice s) {
  return divergence(Divergence::KL, q, p, s);
}

mx::array js_div(const mx::array& q, const mx::array& p, mx::StreamOrDevice s) {
  return divergence(Divergence::JS, q, p, s);
}

std::vector<mx::array> DivergenceForward::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // The saved stats (outputs[1]) are not differentiable: their cotangent is ignored.
  bool gq = std::find(argnums.begin(), argnums.end(), 0) != argnums.end();
  bool gp = std::find(argnums.begin(), argnums.end(), 1) != argnums.end();
  auto s = stream();
  auto cot = contiguous_rows(mx::astype(cotangents[0], mx::float32, s), s);
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (int i = 0; i < int(gq) + int(gp); ++i) {
    shapes.push_back(primals[0].shape());
    dtypes.push_back(primals[0].dtype());
  }
  auto grads = mx::array::make_arrays(
      shapes,
      dtypes,
      std::make_shared<DivergenceBackward>(s, kind_, gq, gp),
      {primals[0], primals[1], outputs[1], cot});
  std::vector<mx::array> out;
  for (int a : argnums) {
    out.push_back(a == 0 ? grads[0] : grads[gq ? 1 : 0]);
  }
  return out;
}

std::vector<mx::Shape> DivergenceForward::output_shapes(
    const std::vector<mx::array>& inputs) {
  auto out_shape = inputs[0].shape();
  out_shape.pop_back();
  auto stats_shape = out_shape;
  stats_shape.push_back(kDivStats);
  return {out_shape, stats_shape};
}

bool DivergenceForward::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const DivergenceForward*>(&other);
  return o != nullptr && o->kind_ == kind_;
}

std::vector<mx::Shape> DivergenceBackward::output_shapes(
    const std::vector<mx::array>& inputs) {
  return std::vector<mx::Shape>(int(grad_q_) + int(grad_p_), inputs[0].shape());
}

bool DivergenceBackward::is_equivalent(const mx::Primitive& other) const {
  auto* o = dynamic_cast<const DivergenceBackward*>(&other);
  return o != nullptr && o->kind_ == kind_ && o->grad_q_ == grad_q_ &&
      o->grad_p_ == grad_p_;
}

// ------------------------------------------------------------------ Metal launches
namespace {

size_t threads_for(int V) {
  // Enough simdgroups to cover one row in a single sweep, at most the maximum group.
  size_t per = (size_t(V) + divergence_metal::kReads - 1) / divergence_metal::kReads;
  size_t t = (per + divergence_metal::kSimd - 1) / divergence_metal::kSimd *
      divergence_metal::kSimd;
  return std::clamp<size_t>(t, divergence_metal::kSimd, divergence_metal::kMaxThreads);
}

} // namespace

MetalLaunch metal_launch_divergence_forward(
    Divergence kind,
    size_t rows,
    int V,
    const std::string& dtype) {
  std::string name = std::string(divergence_op_name(kind)) + "_forward_" + dtype;
  return {name, {rows, 1, 1}, {threads_for(V), 1, 1}};
}

MetalLaunch metal_launch_divergence_backward(
    Divergence kind,
    size_t rows,
    int V,
    const std::string& dtype,
    bool grad_q,
    bool grad_p) {
  if (!grad_q && !grad_p) {
    throw std::invalid_argument("[divergence] backward without any gradient requested.");
  }
  std::string which = grad_q && grad_p ? "dqdp" : (grad_q ? "dq" : "dp");
  std::string name =
      std::string(divergence_op_name(kind)) + "_backward_" + which + "_" + dtype;
  // The backward is elementwise given the saved stats: one threadgroup per row as well.
  return {name, {rows, 1, 1}, {threads_for(V), 1, 1}};
}

#if !defined(MLX_TUNER_DIVERGENCE_GPU) // no GPU kernel of this family in this build
// A CPU-only MLX has no GPU stream: kernel_for() never routes a GPU call here.
void DivergenceForward::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error("[kl_div] this build of mlx-tuner has no GPU kernels.");
}
void DivergenceBackward::eval_gpu(
    const std::vector<mx::array>&,
    std::vector<mx::array>&) {
  throw std::runtime_error("[kl_div] this build of mlx-tuner has no GPU kernels.");
}
#endif

} // namespace mlx_tuner
