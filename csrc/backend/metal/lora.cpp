// Metal host code of the fused LoRA linear (macOS only; kernels in metal/lora.h, launch
// geometry from metal_launch_lora_* in csrc/ops/lora.cpp, shared with the emulator
// tests). The backward on Metal is composed of MLX's own GEMMs (LoRALinear::vjp), so
// LoRALinearVJP has no Metal kernel.
#include <stdexcept>

#include "backend/metal/common.h"
#include "ops/lora.h"

namespace mlx_tuner {

namespace {

std::string dtype_name(mx::Dtype d) {
  if (d == mx::float32) return "float32";
  if (d == mx::float16) return "float16";
  if (d == mx::bfloat16) return "bfloat16";
  throw std::invalid_argument("[lora_linear] float32, float16 or bfloat16 expected");
}

} // namespace

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
  auto t = dtype_name(x.dtype());
  {
    auto l = metal_launch_lora_xa(n, r, t, dtype_name(a.dtype()));
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
    auto l = metal_launch_lora_linear(n, out, t, dtype_name(b.dtype()), has_bias_);
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

void LoRALinearVJP::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::logic_error("[lora_linear] the Metal backward is composed of MLX ops");
}

} // namespace mlx_tuner
