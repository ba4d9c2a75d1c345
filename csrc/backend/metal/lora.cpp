// Metal host code of the fused LoRA linear (macOS only; kernels in metal/lora.h, launch
// geometry from metal_launch_lora_* in csrc/ops/lora.cpp, shared with the emulator
// tests). Forward: xa = x_d A, then the two-pair GEMM y = x W^T + s xa B (+ bias).
// Backward (LoRALinearVJP): g = dy B^T, then dx = dy W + s g A^T in one GEMM (s g A^T
// into dx_d instead when x_dropped is given), dA = s x_d^T g and dB = s xa^T dy; dW and
// dbias stay MLX ops (LoRALinear::vjp). Only the gradients asked for are computed. The
// metal_launch_* functions reject dtypes without an instantiation.
#include <stdexcept>

#include "backend/metal/common.h"
#include "common/checks.h"
#include "ops/lora.h"

namespace mlx_tuner {

void LoRALinear::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0]; // x, W, bias, x_d in the output dtype (the op casts them)
  const auto& w = inputs[1];
  const auto& a = inputs[2];
  const auto& b = inputs[3];
  const auto& xd = has_xd_ ? inputs[has_bias_ ? 5 : 4] : x;
  auto& y = outputs[0];
  auto& xa = outputs[1];
  y.set_data(mx::allocator::malloc(y.nbytes()));
  xa.set_data(mx::allocator::malloc(xa.nbytes()));
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  if (n == 0) {
    return;
  }
  auto t = dtype_str(x.dtype());
  {
    auto l = metal_launch_lora_xa(n, r, t, dtype_str(a.dtype()));
    auto& enc = metal::begin(stream(), l);
    enc.set_input_array(xd, 0);
    enc.set_input_array(a, 1);
    enc.set_output_array(xa, 2);
    enc.set_bytes(n, 3);
    enc.set_bytes(in, 4);
    enc.set_bytes(r, 5);
    metal::dispatch(enc, l);
  }
  {
    auto l = metal_launch_lora_linear(n, out, t, dtype_str(b.dtype()), has_bias_);
    auto& enc = metal::begin(stream(), l);
    enc.set_input_array(x, 0);
    enc.set_input_array(w, 1);
    enc.set_input_array(xa, 2);
    enc.set_input_array(b, 3);
    enc.set_input_array(has_bias_ ? inputs[4] : x, 4); // unread without bias
    enc.set_output_array(y, 5);
    enc.set_bytes(n, 6);
    enc.set_bytes(in, 7);
    enc.set_bytes(out, 8);
    enc.set_bytes(r, 9);
    enc.set_bytes(scale_, 10);
    metal::dispatch(enc, l);
  }
}

void LoRALinearVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0]; // x, W, dy, x_d in the output dtype (the op casts them)
  const auto& w = inputs[1];
  const auto& a = inputs[2]; // A, B in that dtype or float32
  const auto& b = inputs[3];
  const auto& xa = inputs[4]; // float32, saved by the forward
  const auto& dy = inputs[5];
  const auto& xd = has_xd_ ? inputs[6] : x;
  if (grads_.weight || grads_.bias) {
    throw std::logic_error("[lora_linear] dW and dbias are plain MLX ops on the GPU");
  }
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  auto named = grads_.pointers(outputs);
  mx::array *dx = named.x, *da = named.lora_a, *db = named.lora_b, *dxd = named.x_dropped;
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  auto t = dtype_str(x.dtype());
  auto s = stream();
  // The LoRA part of the input gradient goes to dx, or to dx_d when dropout was applied.
  bool lora_into_dx = dx && !has_xd_;
  bool need_g = da || dxd || lora_into_dx;
  // dy B^T, a temporary of this call (dy itself stands in, unread, when it is not needed).
  auto g = need_g ? metal::temporary(s, {n, r}, mx::float32) : dy;
  if (need_g && n > 0 && r > 0) {
    auto l = metal_launch_lora_g(n, t, dtype_str(b.dtype()));
    auto& enc = metal::begin(s, l);
    enc.set_input_array(dy, 0);
    enc.set_input_array(b, 1);
    enc.set_output_array(g, 2);
    enc.set_bytes(n, 3);
    enc.set_bytes(out, 4);
    enc.set_bytes(r, 5);
    metal::dispatch(enc, l);
  }
  // dx = dy W (+ s g A^T), and dx_d = s g A^T: the same GEMM kernel, its pairs chosen.
  auto input_grad = [&](mx::array& dst, bool base, bool lora) {
    if (dst.size() == 0) {
      return;
    }
    auto l = metal_launch_lora_dx(n, in, t, dtype_str(a.dtype()), base, lora);
    auto& enc = metal::begin(s, l);
    enc.set_input_array(dy, 0); // unread without the base pair
    enc.set_input_array(w, 1);
    enc.set_input_array(g, 2); // unread without the LoRA pair
    enc.set_input_array(a, 3);
    enc.set_output_array(dst, 4);
    enc.set_bytes(n, 5);
    enc.set_bytes(in, 6);
    enc.set_bytes(out, 7);
    enc.set_bytes(r, 8);
    enc.set_bytes(scale_, 9);
    metal::dispatch(enc, l);
  };
  if (dx) {
    input_grad(*dx, true, lora_into_dx);
  }
  if (dxd) {
    input_grad(*dxd, false, true);
  }
  // dA = s x_d^T g and dB = s xa^T dy: sums over the N rows, so zeros for an empty batch
  // (the kernels then read neither operand).
  auto param_grad = [&](mx::array& dst, const MetalLaunch& l, const mx::array& lhs,
                        const mx::array& rhs, int p, int q) {
    auto& enc = metal::begin(s, l);
    enc.set_input_array(lhs, 0);
    enc.set_input_array(rhs, 1);
    enc.set_output_array(dst, 2);
    enc.set_bytes(n, 3);
    enc.set_bytes(p, 4);
    enc.set_bytes(q, 5);
    enc.set_bytes(scale_, 6);
    metal::dispatch(enc, l);
  };
  if (da && da->size() > 0) {
    auto l = metal_launch_lora_da(in, r, t, dtype_str(da->dtype()));
    param_grad(*da, l, xd, g, in, r);
  }
  if (db && db->size() > 0) {
    auto l = metal_launch_lora_db(r, out, t, dtype_str(db->dtype()));
    param_grad(*db, l, xa, dy, r, out);
  }
}

} // namespace mlx_tuner
