// Metal host code of the dora family (macOS only): DoRARowSqNorm. The dispatch comes from
// metal_launch_dora_row_sq_norm, the function the emulator tests use too.
#include "backend/metal/common.h"
#include "mlx/backend/metal/device.h"
#include "ops/dora.h"

namespace mlx_tuner {

namespace {
std::string dtype_name(mx::Dtype d) {
  return d == mx::float32 ? "float32" : (d == mx::float16 ? "float16" : "bfloat16");
}
} // namespace

void DoRARowSqNorm::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  int rows = in[0].shape(0);
  int k = quantized_ ? in[0].shape(1) * 32 / bits_ : in[0].shape(1);
  auto launch = metal_launch_dora_row_sq_norm(
      rows, dtype_name(quantized_ ? in[1].dtype() : in[0].dtype()), quantized_ ? bits_ : 0);
  auto& enc = metal::begin(stream(), launch);
  int slot = 0;
  for (auto& a : in) {
    enc.set_input_array(a, slot++);
  }
  enc.set_output_array(out, slot++);
  enc.set_bytes(k, slot++);
  if (quantized_) {
    enc.set_bytes(group_size_, slot++);
  }
  metal::dispatch(enc, launch);
}

} // namespace mlx_tuner
