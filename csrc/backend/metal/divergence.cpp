// Metal host code of the divergence family (macOS only): bind buffers in the order of
// metal/divergence.h and dispatch with the geometry of metal_launch_divergence_*.
#include "backend/metal/common.h"
#include "mlx/backend/metal/device.h"
#include "ops/divergence.h"

namespace mlx_tuner {

void DivergenceForward::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  auto& out = outputs[0];
  auto& stats = outputs[1];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  stats.set_data(mx::allocator::malloc(stats.nbytes()));
  size_t rows = out.size();
  if (rows == 0) {
    return;
  }
  int V = q.shape(-1);
  auto launch = metal_launch_divergence_forward(kind_, rows, V, dtype_name(q.dtype()));
  auto& enc = metal::begin(stream(), launch);
  enc.set_input_array(q, 0);
  enc.set_input_array(p, 1);
  enc.set_output_array(out, 2);
  enc.set_output_array(stats, 3);
  enc.set_bytes(V, 4);
  metal::dispatch(enc, launch);
}

void DivergenceBackward::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  const auto& stats = inputs[2];
  const auto& cot = inputs[3];
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  size_t rows = cot.size();
  if (rows == 0) {
    return;
  }
  int V = q.shape(-1);
  auto launch = metal_launch_divergence_backward(
      kind_, rows, V, dtype_name(q.dtype()), grad_q_, grad_p_);
  auto& enc = metal::begin(stream(), launch);
  enc.set_input_array(q, 0);
  enc.set_input_array(p, 1);
  enc.set_input_array(stats, 2);
  enc.set_input_array(cot, 3);
  // An unrequested gradient's slot is bound to the other output; the kernel never
  // writes it (GQ / GP are compile-time).
  auto& dq = outputs[0];
  auto& dp = outputs[outputs.size() - 1];
  enc.set_output_array(dq, 4);
  enc.set_output_array(dp, 5);
  enc.set_bytes(V, 6);
  metal::dispatch(enc, launch);
}

} // namespace mlx_tuner
