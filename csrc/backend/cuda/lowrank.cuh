// The rank-r products of the LoRA family on CUDA (lora, qlora, dora), as kernels of our
// own: each is one plain kernel node of MLX's graph, where a cuBLASLt GEMM is a captured
// child graph that costs tens of microseconds of host time and graph-launch time (the
// per-layer benchmarks are bound by that host time, not by the GPU: BENCHMARKS.md). The
// kernels accumulate in float32 with FFMA; they take ranks up to kLowRankMax, above
// which the callers keep cuBLASLt (tensor cores win once r is large).
//
// Shapes: x (n, k), p (n, r) and y (n, cols) are packed row-major in the compute dtype T
// (float32, float16 or bfloat16). A small matrix M (the LoRA A or B, or a transpose) is
// read through strides in its own dtype (float32 or T): element (i, j) at
// M[i * si + j * sj].
#pragma once

#include <initializer_list>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

constexpr int kLowRankMax = 16;

// Whether the kernels below take rank r (MLX_TUNER_LOWRANK=0 sends every rank to the
// callers' cuBLASLt path, to time one against the other).
bool lowrank_fits(int r);

struct Small {
  const mx::array& m;
  long si, sj;
};

// c (n, r) = s * x (n, k) M (k, r), in c's dtype.
void lowrank_project(mx::cu::CommandEncoder& enc, const mx::array& x, Small m, int r, float s,
                     mx::array& c);

// y (n, cols) = s * p (n, r) M (r, cols) (+ bias (cols,)), in y's dtype (T).
void lowrank_expand(mx::cu::CommandEncoder& enc, const mx::array& p, Small m, float s,
                    const mx::array* bias, mx::array& y);

// d (k, r) = s * x^T g for x (n, k), g (n, r), element (i, j) written at
// d[i * di + j * dj] in d's dtype: the LoRA parameter gradients. Up to two jobs share one
// pair of launches (partial sums over slices of the rows, then their sum: deterministic).
struct ReduceJob {
  const mx::array& x;
  const mx::array& g;
  mx::array& d;
  long di, dj;
  float s;
};
void lowrank_reduce(mx::cu::CommandEncoder& enc, std::initializer_list<ReduceJob> jobs);

} // namespace mlx_tuner::cuda
