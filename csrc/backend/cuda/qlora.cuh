// The QLoRA linear's CUDA forward and backward (qlora.cu, maths in ops/qlora.h), as
// functions: QLoRA's primitives call them, and so does QDoRA's (dora.cu), whose m / n
// goes in as a row scale of W: folded into W's dequantized blocks (dequant(W)_i m_i / n_i
// rounded once), into B's packed copy and into dB, so that no pass over y or dy scales it.
#pragma once

#include <initializer_list>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

// W (out, k), affine-quantized as mx.quantize lays it out; scales and biases in x's dtype.
struct QuantWeight {
  const mx::array& wq;
  const mx::array& scales;
  const mx::array& biases;
  int bits, group_size;
};

// Whether the rank-r products run as lowrank.cuh's kernels (the path a row scale needs):
// rank 1 to 16, float16 / bfloat16, k and out multiples of 16, the projected arrays aligned;
// switchable: MLX_TUNER_LOWRANK=0 turns them off (not for a row scale, which has no other path).
bool qlora_own_fits(int r, mx::Dtype t, int k, int out,
                    std::initializer_list<const mx::array*> projected, bool switchable = true);

// y = x W^T + s x_d A B (+ bias), xa = x_d A in T (x_d null: x itself). x, x_d, bias in T;
// A, B in T or float32; y, xa allocated. With row_scale (float32 (out,)):
// y = row_scale * (x W^T + s xa B) (+ bias), on qlora_own_fits' path only.
void qlora_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array* xd,
                   const QuantWeight& qw, const mx::array& a, const mx::array& b,
                   const mx::array* bias, float s, mx::array& y, mx::array& xa,
                   const mx::array* row_scale = nullptr);

// The gradients for dy (in T), each where its pointer is not null (allocated): dx = dy W
// (+ g A^T without x_d), dx_d = g A^T, dA = x_d^T g, dB = s xa^T dy, g = s dy B^T; xd is x
// without dropout (has_xd false). With row_scale, dy's columns are scaled by it first (the
// backward of qlora_forward's row-scaled y).
struct QLoRAGradOut {
  mx::array *x = nullptr, *x_dropped = nullptr, *a = nullptr, *b = nullptr;
};
void qlora_backward(mx::cu::CommandEncoder& enc, const mx::array& xd, bool has_xd,
                    const mx::array& xa, const QuantWeight& qw, const mx::array& a,
                    const mx::array& b, const mx::array& dy, float s, const QLoRAGradOut& grads,
                    const mx::array* row_scale = nullptr);

} // namespace mlx_tuner::cuda
