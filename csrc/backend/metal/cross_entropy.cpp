// Metal host code of linear_cross_entropy (macOS only; kernels: metal/cross_entropy.h).
// A dense head only: the op dequantizes a quantized head for the GPU.
#include <algorithm>

#include "backend/metal/common.h"
#include "common/checks.h"
#include "ops/cross_entropy.h"

namespace mlx_tuner {

namespace {

// Float32 scratch of n elements (at least one).
mx::array scratch(mx::Stream s, size_t n) {
  return metal::temporary(s, {static_cast<int>(std::max<size_t>(n, 1))}, mx::float32);
}

} // namespace

void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  const int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  if (N == 0) {
    return;
  }
  const int has_bias = has_bias_ ? 1 : 0;
  auto launch = metal_launch_linear_cross_entropy("forward", N, dtype_str(in[0].dtype()));
  auto& enc = metal::begin(stream(), launch);
  enc.set_input_array(in[0], 0);
  enc.set_input_array(in[1], 1);
  enc.set_input_array(has_bias_ ? in[3] : in[0], 2); // unread without a bias
  enc.set_input_array(in[2], 3);
  enc.set_output_array(out[0], 4);
  enc.set_output_array(out[1], 5);
  enc.set_bytes(d, 6);
  enc.set_bytes(V, 7);
  enc.set_bytes(has_bias, 8);
  metal::dispatch(enc, launch);
}

void LinearCrossEntropyVJP::eval_gpu(
    const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  for (auto& o : out) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  const int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  const int has_bias = has_bias_ ? 1 : 0;
  const auto dt = dtype_str(in[0].dtype());
  const mx::array& bias = has_bias_ ? in[5] : in[0];
  int k = 0;
  if (need_dh_) {
    auto launch = metal_launch_linear_cross_entropy("backward_dh", N, dt);
    auto& enc = metal::begin(stream(), launch);
    auto acc = scratch(stream(), size_t(N) * d);
    enc.set_input_array(in[0], 0);
    enc.set_input_array(in[1], 1);
    enc.set_input_array(bias, 2);
    enc.set_input_array(in[2], 3);
    enc.set_input_array(in[3], 4);
    enc.set_input_array(in[4], 5);
    enc.set_output_array(acc, 6);
    enc.set_output_array(out[k++], 7);
    enc.set_bytes(d, 8);
    enc.set_bytes(V, 9);
    enc.set_bytes(has_bias, 10);
    metal::dispatch(enc, launch);
  }
  if (need_dw_ || need_db_) {
    auto launch = metal_launch_linear_cross_entropy("backward_dw", V, dt);
    auto& enc = metal::begin(stream(), launch);
    auto acc = scratch(stream(), need_dw_ ? size_t(V) * d : 1);
    mx::array& dw = need_dw_ ? out[k++] : acc; // unwritten when not wanted
    mx::array& db = need_db_ ? out[k++] : acc;
    const int want_dw = need_dw_ ? 1 : 0, want_db = need_db_ ? 1 : 0;
    enc.set_input_array(in[0], 0);
    enc.set_input_array(in[1], 1);
    enc.set_input_array(bias, 2);
    enc.set_input_array(in[2], 3);
    enc.set_input_array(in[3], 4);
    enc.set_input_array(in[4], 5);
    enc.set_output_array(acc, 6);
    enc.set_output_array(dw, 7);
    enc.set_output_array(db, 8);
    enc.set_bytes(N, 9);
    enc.set_bytes(d, 10);
    enc.set_bytes(V, 11);
    enc.set_bytes(has_bias, 12);
    enc.set_bytes(want_dw, 13);
    enc.set_bytes(want_db, 14);
    metal::dispatch(enc, launch);
  }
}

} // namespace mlx_tuner
