// CUDA kernel of the dora family: c_i = ||W_i||^2 (DoRARowSqNorm), W dense or affine-
// quantized, one block per row, float32 accumulation. The rest of the GPU path is MLX's own
// GEMMs (ops/dora.cpp, compose_gpu), so no out x in temporary is ever made.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/cuda/common.cuh"
#include "ops/dora.h"

namespace mlx_tuner {

namespace {

constexpr int kThreads = 256;

__device__ float to_float(float v) {
  return v;
}
__device__ float to_float(__half v) {
  return __half2float(v);
}
__device__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

__device__ float block_sum(float v) {
  __shared__ float part[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  float t = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) t += part[w];
  }
  return t;
}

template <typename T>
__global__ void row_sq_dense(const T* w, float* c, int in) {
  const T* row = w + static_cast<size_t>(blockIdx.x) * in;
  float acc = 0.f;
  for (int j = threadIdx.x; j < in; j += kThreads) {
    float v = to_float(row[j]);
    acc += v * v;
  }
  float t = block_sum(acc);
  if (threadIdx.x == 0) c[blockIdx.x] = t;
}

// mx.quantize's layout: a little-endian bit stream of BITS-bit codes per row.
template <typename S, int BITS>
__global__ void row_sq_quant(
    const uint8_t* q, const S* scales, const S* biases, float* c, int in, int gs) {
  size_t row_bytes = static_cast<size_t>(in) * BITS / 8;
  const uint8_t* qr = q + blockIdx.x * row_bytes;
  const S* sr = scales + static_cast<size_t>(blockIdx.x) * (in / gs);
  const S* br = biases + static_cast<size_t>(blockIdx.x) * (in / gs);
  float acc = 0.f;
  for (int j = threadIdx.x; j < in; j += kThreads) {
    int bit = j * BITS;
    unsigned v = qr[bit >> 3];
    if ((bit & 7) + BITS > 8) v |= unsigned(qr[(bit >> 3) + 1]) << 8;
    float w = to_float(sr[j / gs]) * float((v >> (bit & 7)) & ((1u << BITS) - 1)) +
        to_float(br[j / gs]);
    acc += w * w;
  }
  float t = block_sum(acc);
  if (threadIdx.x == 0) c[blockIdx.x] = t;
}

template <typename T>
void launch_dense(mx::cu::CommandEncoder& enc, const mx::array& w, mx::array& out) {
  const T* wp = gpu_ptr<T>(w);
  float* cp = gpu_ptr<float>(out);
  int in = w.shape(1);
  cuda::launch(enc, reinterpret_cast<const void*>(&row_sq_dense<T>), dim3(w.shape(0)),
               dim3(kThreads), 0u, wp, cp, in);
}

template <typename S, int BITS>
void launch_quant_bits(mx::cu::CommandEncoder& enc, const std::vector<mx::array>& in,
                       mx::array& out, int gs) {
  const uint8_t* q = gpu_ptr<uint8_t>(in[0]);
  const S* sp = gpu_ptr<S>(in[1]);
  const S* bp = gpu_ptr<S>(in[2]);
  float* cp = gpu_ptr<float>(out);
  int k = in[0].shape(1) * 32 / BITS;
  cuda::launch(enc, reinterpret_cast<const void*>(&row_sq_quant<S, BITS>),
               dim3(in[0].shape(0)), dim3(kThreads), 0u, q, sp, bp, cp, k, gs);
}

template <typename S>
void launch_quant(mx::cu::CommandEncoder& enc, const std::vector<mx::array>& in,
                  mx::array& out, int gs, int bits) {
  switch (bits) {
    case 2: return launch_quant_bits<S, 2>(enc, in, out, gs);
    case 3: return launch_quant_bits<S, 3>(enc, in, out, gs);
    case 4: return launch_quant_bits<S, 4>(enc, in, out, gs);
    case 5: return launch_quant_bits<S, 5>(enc, in, out, gs);
    case 6: return launch_quant_bits<S, 6>(enc, in, out, gs);
    default: return launch_quant_bits<S, 8>(enc, in, out, gs);
  }
}

} // namespace

void DoRARowSqNorm::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& a : in) enc.set_input_array(a);
  cuda::alloc_output(out, enc);
  if (out.size() == 0) return;
  if (quantized_) {
    switch (in[1].dtype()) {
      case mx::float32: return launch_quant<float>(enc, in, out, group_size_, bits_);
      case mx::float16: return launch_quant<__half>(enc, in, out, group_size_, bits_);
      default: return launch_quant<__nv_bfloat16>(enc, in, out, group_size_, bits_);
    }
  }
  switch (in[0].dtype()) {
    case mx::float32: return launch_dense<float>(enc, in[0], out);
    case mx::float16: return launch_dense<__half>(enc, in[0], out);
    default: return launch_dense<__nv_bfloat16>(enc, in[0], out);
  }
}

} // namespace mlx_tuner
