// The rank-r products of the LoRA family on CUDA (lora, qlora; dora through lora), as
// kernels of our own on the tensor cores (mma.sync m16n8k16, float32 accumulation):
// each is one plain kernel node of MLX's graph, where a cuBLASLt GEMM is a captured child
// graph that costs tens of microseconds of host and graph-launch time. Ranks 1 to
// kLowRankMax, float16 and bfloat16, widths that are multiples of 16 (lowrank_fits);
// everything else keeps the callers' cuBLASLt GEMMs.
//
// Shapes: x (n, k), p (n, r) and y (n, cols) are packed row-major in the compute dtype T.
// A LoRA matrix (A or B, or its transpose) M is read through strides in its own dtype:
// element (i, j) at M[i * si + j * sj]. lowrank_pack turns it, once per primitive, into
// the layout the kernels read (T, zero-padded to rank 16).
#pragma once

#include <initializer_list>
#include <vector>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

constexpr int kLowRankMax = 16;
// Columns of lora_gemm's rank-tile operands (xa or g, s B^T or s A): one k tile of 64, of
// which only the first 16 are multiplied.
constexpr int kLowRankPad = 64;

// Whether the kernels below take this product: rank r in [1, kLowRankMax], compute dtype
// float16 or bfloat16, every width a multiple of 16, and the wide arrays the kernels read
// by 16-byte vectors (project's x, reduce's x) 16-byte aligned: a view may start
// anywhere, and its rows then do too. MLX_TUNER_LOWRANK=0 sends every
// product to the callers' cuBLASLt path (to time one against the other), except for a
// caller that has no such path (switchable false: QDoRA's row-scaled QLoRA).
bool lowrank_fits(int r, mx::Dtype t, std::initializer_list<int> widths,
                  std::initializer_list<const mx::array*> projected, bool switchable = true);

// M (rows, cols) with element (i, j) at m[i * si + j * sj]. For lowrank_project M is
// (k, r); for lowrank_expand it is (r, cols).
// An expand operand may be packed scaled by s into rows ld elements apart (lora_gemm reads
// it with ld = kLowRankPad).
// line_scale (float32), when given, scales M along its long side: row i by line_scale[i]
// for a project operand, column j by line_scale[j] for an expand operand (B's out side
// either way: QDoRA's m / n).
struct LowRankMatrix {
  const mx::array& m;
  long si, sj;
  int rows, cols;
  bool for_project;
  int ld = 16;
  float s = 1.0f;
  const mx::array* line_scale = nullptr;
};

// Packed copies in dtype t, in one launch: [16][k] for a project operand, [cols][16] for
// an expand operand. The same launch zeroes `counters` (from reduce_counters) when given.
std::vector<mx::array> lowrank_pack(mx::cu::CommandEncoder& enc, mx::Dtype t,
                                    std::initializer_list<LowRankMatrix> ms,
                                    mx::array* counters = nullptr);

// c (n, r) = s * x (n, k) M (k, r), in c's dtype; pk = M packed for project. With pad, the
// same product is also written in T into the first 16 columns of pad (n, kLowRankPad), zero
// past r.
void lowrank_project(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& pk,
                     int r, float s, mx::array& c, mx::array* pad = nullptr);

// DoRA's norms in project's epilogue, instead of P = W A: for W (out, in) and M = A,
// n_i = ||W_i + s (A B)^T_i|| by the low-rank identity (ops/dora.h) with G = Aᵀ A made from
// pk's own fragments, and rs_i = m_i / n_i. b (r, out), c = ||W_i||^2, m, n, rs: float32.
struct ProjectNorm {
  const mx::array& b;
  const mx::array& c;
  const mx::array& m;
  mx::array& n;
  mx::array& rs;
  float s;
};
void lowrank_project_norm(mx::cu::CommandEncoder& enc, const mx::array& w, const mx::array& pk,
                          int r, const ProjectNorm& norm);

// c (n, r) = dequant(W) M in float32 for W (n, k) affine-quantized as mx.quantize lays it
// out (bits 2, 3, 4, 5, 6 or 8; scales and biases per group of gs columns, in T = pk's
// dtype, float16 or bfloat16); pk = M packed for project. DoRA's P = W A on a quantized
// base: the codes are dequantized in registers, never to memory. With norm (c null), the
// norms instead of P, as lowrank_project_norm.
void lowrank_project_quant(mx::cu::CommandEncoder& enc, const mx::array& wq,
                           const mx::array& scales, const mx::array& biases, int bits, int gs,
                           const mx::array& pk, int r, mx::array* c,
                           const ProjectNorm* norm = nullptr);

// y (n, cols) = s * p (n, r) M (r, cols) (+ bias (cols,) in T); pe = M packed for expand.
void lowrank_expand(mx::cu::CommandEncoder& enc, const mx::array& p, const mx::array& pe,
                    float s, const mx::array* bias, mx::array& y);

// d (k, r) = s * x^T g for x (n, k), g (n, r) (both in T), element (i, j) written at
// d[i * di + j * dj] in d's dtype: the LoRA parameter gradients. Up to two jobs share one
// pair of launches (partial sums over slices of the rows, then their sum in a fixed
// order: the same inputs give the same bits).
// d_scale (float32 (k,)), when given, scales d's row i by d_scale[i] (QDoRA's dB = s xa^T dy
// with dy's columns scaled by m / n).
struct ReduceJob {
  const mx::array& x;
  const mx::array& g;
  mx::array& d;
  long di, dj;
  float s;
  const mx::array* d_scale = nullptr;
};
// With counters (zeroed by a lowrank_pack launched before it in the same primitive), the
// slices are summed inside the reduce launch: one graph node fewer.
// No jobs: nothing is launched.
void lowrank_reduce(mx::cu::CommandEncoder& enc, const std::vector<ReduceJob>& jobs,
                    mx::array* counters = nullptr);
// Scratch for lowrank_reduce's counters, for jobs whose widths k are at most max_k.
mx::array reduce_counters(mx::cu::CommandEncoder& enc, int max_k);

// The LoRA GEMM on Hopper (lora_gemm.cuh): y (n, N) = x (n, K) W^T + p b_pad^T (+ bias),
// W (N, K), the rank-r term as one more k step of the base GEMM. With w_kn, W is (K, N) and
// y = x W + ...: the backward's dx = dy W + s g A^T, W (out, in) as stored. b_pad
// (N, kLowRankPad): s B^T (or s A) packed with ld kLowRankPad. The rank term's p:
// - from memory: operand = xa_pad (n, kLowRankPad), from lowrank_project's pad;
// - made by the GEMM (rank_in_gemm()): operand = M packed for lowrank_project ((16, K):
//   A, or B^T in the backward), and p = x M (n, r) is written into p_out (T).
// lora_gemm_fits: an sm_90 device, bfloat16, widths that are multiples of 8, every operand
// 16-byte aligned (MLX_TUNER_LORA_GEMM=0 turns it off, MLX_TUNER_RANK_IN_GEMM=0 keeps p
// from memory: to time one path against the other). col_scale (float32 (N,)), when
// given, scales y's columns in the epilogue, before the bias: DoRA's m / n.
bool lora_gemm_fits(mx::cu::CommandEncoder& enc, mx::Dtype t, int in, int out,
                    std::initializer_list<const mx::array*> operands);
bool rank_in_gemm();
struct LoRAGemmRank {
  const mx::array& operand;
  mx::array* p_out = nullptr;
};
void lora_gemm(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
               const LoRAGemmRank& rank, const mx::array& b_pad, const mx::array* bias,
               mx::array& y, bool w_kn = false, const mx::array* col_scale = nullptr);

} // namespace mlx_tuner::cuda
