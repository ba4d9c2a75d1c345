// The LoRA linear's CUDA forward and backward (lora.cu, maths in ops/lora.h), as functions:
// LoRALinear's primitives call them, and so does DoRA's (dora.cu: the forward where its
// m / n cannot go into lora_gemm's epilogue, the backward on g = dy * m / n).
#pragma once

#include <vector>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

// y = x W^T + s x_d A B (+ bias), xa = x_d A (in xa's dtype); x_d null: x itself. x, W,
// bias, x_d in one dtype T; A, B in T or float32. y and xa allocated.
void lora_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                  const mx::array& a, const mx::array& b, const mx::array* bias,
                  const mx::array* xd, float s, mx::array& y, mx::array& xa);

// The Hopper path of that forward (lora_gemm_fits and lowrank_fits), in two steps so that
// DoRA can use the packed A (its W A) between them:
// - A and s B packed as lora_gemm reads them (A for project, s B for the rank step);
// - y = x W^T + s xa B (+ bias), y's columns scaled by col_scale (float32 (out,), DoRA's
//   m / n) when given, xa = x A made by the GEMM itself without x_d (rank_in_gemm()), else
//   projected from x_d.
std::vector<mx::array> lora_gemm_pack(mx::cu::CommandEncoder& enc, mx::Dtype t,
                                      const mx::array& a, const mx::array& b, float s);
void lora_gemm_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                       const mx::array* xd, const std::vector<mx::array>& packed,
                       const mx::array* bias, const mx::array* col_scale, mx::array& y,
                       mx::array& xa);

// The gradients for y's cotangent dy, each only where its pointer is not null (allocated):
// dx = dy W (+ s g A^T without x_d), dx_d = s g A^T, dA = s x_d^T g, dB = s xa^T dy, with
// g = dy B^T.
struct LoRAGradOut {
  mx::array *x = nullptr, *x_dropped = nullptr, *a = nullptr, *b = nullptr;
};
void lora_backward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
                   const mx::array& a, const mx::array& b, const mx::array& xa,
                   const mx::array& dy, const mx::array* xd, float s, const LoRAGradOut& out);

} // namespace mlx_tuner::cuda
