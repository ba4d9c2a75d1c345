// DoRA's Metal kernel: c_i = ||W_i||^2 in float32 (DoRARowSqNorm), W dense or affine-
// quantized (mx.quantize's little-endian bit stream of BITS-bit codes per row). One
// threadgroup of DORA_ROW_THREADS threads per row: simd_sum, then one threadgroup stage.
// The GEMMs of the GPU path are MLX's own (csrc/ops/dora.cpp, compose_gpu).
#pragma once

#include <metal_stdlib>
using namespace metal;

#define DORA_ROW_THREADS 256 // also in csrc/ops/dora.cpp (metal_launch_dora_row_sq_norm)

inline void dora_store_row_sum(
    float acc, device float* c, uint row, uint lid, uint lane, uint sg,
    threadgroup float* partial) {
  acc = simd_sum(acc);
  if (lane == 0) {
    partial[sg] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    acc = simd_sum(lane < DORA_ROW_THREADS / 32 ? partial[lane] : 0.0f);
    if (lane == 0) {
      c[row] = acc;
    }
  }
}

template <typename T>
[[kernel]] void dora_row_sq_dense(
    device const T* w [[buffer(0)]],
    device float* c [[buffer(1)]],
    constant int& in [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[DORA_ROW_THREADS / 32];
  device const T* wr = w + size_t(row) * in;
  float acc = 0.0f;
  for (int j = lid; j < in; j += DORA_ROW_THREADS) {
    float v = float(wr[j]);
    acc += v * v;
  }
  dora_store_row_sum(acc, c, row, lid, lane, sg, partial);
}

template <typename S, int BITS>
[[kernel]] void dora_row_sq_quant(
    device const uint8_t* q [[buffer(0)]],
    device const S* scales [[buffer(1)]],
    device const S* biases [[buffer(2)]],
    device float* c [[buffer(3)]],
    constant int& in [[buffer(4)]],
    constant int& group_size [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[DORA_ROW_THREADS / 32];
  device const uint8_t* qr = q + size_t(row) * (size_t(in) * BITS / 8);
  device const S* sr = scales + size_t(row) * (in / group_size);
  device const S* br = biases + size_t(row) * (in / group_size);
  float acc = 0.0f;
  for (int j = lid; j < in; j += DORA_ROW_THREADS) {
    int bit = j * BITS;
    uint v = qr[bit >> 3];
    if ((bit & 7) + BITS > 8) {
      v |= uint(qr[(bit >> 3) + 1]) << 8;
    }
    float code = float((v >> (bit & 7)) & ((1u << BITS) - 1));
    float wv = float(sr[j / group_size]) * code + float(br[j / group_size]);
    acc += wv * wv;
  }
  dora_store_row_sum(acc, c, row, lid, lane, sg, partial);
}
