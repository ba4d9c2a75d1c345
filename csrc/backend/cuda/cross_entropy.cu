// CUDA kernels of linear_cross_entropy (maths: csrc/ops/cross_entropy.h). A dense head
// only: the op dequantizes a quantized head for the GPU.
//
// Every kernel recomputes (BM tokens × BN vocabulary) logit tiles with a shared-memory
// tiled SIMT GEMM (float32 accumulate, 16×16 threads, 4×4 outputs each, under 48 KiB of
// static shared memory); nothing of size N·V is ever stored.
//   forward : one block per BM tokens sweeps the vocabulary; each thread keeps an online
//             (max, sum) per row over its columns, merged across the row's threads at the
//             end; the target logit is picked from the tile that holds it.
//   dh      : one block per BM tokens: G = g (softmax − onehot) of a tile goes to shared
//             memory, then dh[rows] += G · W[cols] (float32, the block owns its rows).
//   dW, db  : one block per BN vocabulary rows sweeps the tokens: dW[cols] += Gᵀ · h[rows].
// Tensor-core tiles (or cuBLASLt for the two GEMMs) are the next step: measure on the H200.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backend/cuda/common.cuh"
#include "ops/cross_entropy.h"

namespace mlx_tuner {

namespace {

namespace cu = mlx_tuner::cuda;

constexpr int BM = 64, BN = 64, BK = 32, TPB = 256; // 16 × 16 threads, 4 × 4 outputs each
// Columns of d per pass in the backward GEMMs, CPT per thread: keeps the static shared
// memory of a block under 48 KiB.
constexpr int DC = 32, CPT = DC / 16;

__device__ inline float f32(float x) {
  return x;
}
__device__ inline float f32(__half x) {
  return __half2float(x);
}
__device__ inline float f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ inline T from_f32(float x);
template <>
__device__ inline float from_f32<float>(float x) {
  return x;
}
template <>
__device__ inline __half from_f32<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// acc[i][j] = logit(row r0 + ty*4 + i, col v0 + tx*4 + j) (+ bias), 0 outside the matrix.
template <typename T>
__device__ void logit_tile(const T* h, const T* W, const T* bias, int N, int d, int V,
                           int r0, int v0, float (*As)[BM + 1], float (*Bs)[BN + 1],
                           float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 4; ++j) {
      acc[i][j] = 0.0f;
    }
  }
  for (int k0 = 0; k0 < d; k0 += BK) {
    for (int e = threadIdx.x; e < BM * BK; e += TPB) {
      int r = e / BK, k = e % BK;
      As[k][r] = (r0 + r < N && k0 + k < d) ? f32(h[size_t(r0 + r) * d + k0 + k]) : 0.0f;
      Bs[k][r] = (v0 + r < V && k0 + k < d) ? f32(W[size_t(v0 + r) * d + k0 + k]) : 0.0f;
    }
    __syncthreads();
    for (int k = 0; k < BK; ++k) {
      float a[4], b[4];
      for (int i = 0; i < 4; ++i) {
        a[i] = As[k][ty * 4 + i];
        b[i] = Bs[k][tx * 4 + i];
      }
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          acc[i][j] += a[i] * b[j];
        }
      }
    }
    __syncthreads(); // before the next k0 overwrites As/Bs
  }
  if (bias) {
    for (int j = 0; j < 4; ++j) {
      int v = v0 + tx * 4 + j;
      float b = v < V ? f32(bias[v]) : 0.0f;
      for (int i = 0; i < 4; ++i) {
        acc[i][j] += b;
      }
    }
  }
}

template <typename T>
__global__ void lce_forward(const T* h, const T* W, const T* bias, const int32_t* y, int N,
                            int d, int V, float* loss, float* lse) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int r0 = blockIdx.x * BM;
  float m[4], s[4], t[4];
  int tgt[4];
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    s[i] = 0.0f;
    t[i] = 0.0f;
    int r = r0 + ty * 4 + i;
    tgt[i] = r < N ? y[r] : -1;
  }
  float acc[4][4];
  for (int v0 = 0; v0 < V; v0 += BN) {
    logit_tile(h, W, bias, N, d, V, r0, v0, As, Bs, acc);
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        int v = v0 + tx * 4 + j;
        if (v >= V) {
          continue;
        }
        float x = acc[i][j];
        if (x > m[i]) {
          s[i] = s[i] * __expf(m[i] - x) + 1.0f;
          m[i] = x;
        } else {
          s[i] += __expf(x - m[i]);
        }
        if (v == tgt[i]) {
          t[i] = x;
        }
      }
    }
  }
  // Merge the 16 threads (a half-warp, lanes tx) that share each row.
  for (int i = 0; i < 4; ++i) {
    for (int o = 8; o > 0; o /= 2) {
      float mo = __shfl_xor_sync(0xffffffff, m[i], o, 16);
      float so = __shfl_xor_sync(0xffffffff, s[i], o, 16);
      float to = __shfl_xor_sync(0xffffffff, t[i], o, 16);
      float mn = fmaxf(m[i], mo);
      s[i] = (mn == -INFINITY) ? 0.0f : s[i] * __expf(m[i] - mn) + so * __expf(mo - mn);
      m[i] = mn;
      t[i] += to;
    }
    int r = r0 + ty * 4 + i;
    if (tx == 0 && r < N) {
      float l = m[i] + logf(s[i]);
      lse[r] = l;
      loss[r] = (tgt[i] >= 0 && tgt[i] < V) ? l - t[i] : 0.0f;
    }
  }
}

// The tile of G = g (softmax − onehot) into Gs[BM][BN] (0 for ignored tokens, outside).
template <typename T>
__device__ void grad_tile(const T* h, const T* W, const T* bias, const int32_t* y,
                          const float* lse, const float* g, int N, int d, int V, int r0,
                          int v0, float (*As)[BM + 1], float (*Bs)[BN + 1],
                          float (*Gs)[BN + 1]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
  logit_tile(h, W, bias, N, d, V, r0, v0, As, Bs, acc);
  for (int i = 0; i < 4; ++i) {
    int r = r0 + ty * 4 + i;
    int tg = r < N ? y[r] : -1;
    float gn = (r < N && tg >= 0 && tg < V) ? g[r] : 0.0f;
    float l = r < N ? lse[r] : 0.0f;
    for (int j = 0; j < 4; ++j) {
      int v = v0 + tx * 4 + j;
      float p = (v < V && gn != 0.0f) ? __expf(acc[i][j] - l) : 0.0f;
      Gs[ty * 4 + i][tx * 4 + j] = gn * (p - (v == tg ? 1.0f : 0.0f));
    }
  }
  __syncthreads();
}

template <typename T>
__global__ void lce_backward_dh(const T* h, const T* W, const T* bias, const int32_t* y,
                                const float* lse, const float* g, int N, int d, int V,
                                float* dh) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  __shared__ float Gs[BM][BN + 1];
  __shared__ float Ws[BN][DC + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int r0 = blockIdx.x * BM;
  for (int v0 = 0; v0 < V; v0 += BN) {
    grad_tile(h, W, bias, y, lse, g, N, d, V, r0, v0, As, Bs, Gs);
    for (int c0 = 0; c0 < d; c0 += DC) {
      for (int e = threadIdx.x; e < BN * DC; e += TPB) {
        int v = e / DC, c = e % DC;
        Ws[v][c] = (v0 + v < V && c0 + c < d) ? f32(W[size_t(v0 + v) * d + c0 + c]) : 0.0f;
      }
      __syncthreads();
      for (int i = 0; i < 4; ++i) {
        int r = r0 + ty * 4 + i;
        for (int j = 0; j < CPT; ++j) {
          int c = tx * CPT + j;
          float a = 0.0f;
          for (int v = 0; v < BN; ++v) {
            a += Gs[ty * 4 + i][v] * Ws[v][c];
          }
          if (r < N && c0 + c < d) {
            dh[size_t(r) * d + c0 + c] += a;
          }
        }
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void lce_backward_dw(const T* h, const T* W, const T* bias, const int32_t* y,
                                const float* lse, const float* g, int N, int d, int V,
                                float* dw, float* db) {
  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  __shared__ float Gs[BM][BN + 1];
  __shared__ float Hs[BM][DC + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int v0 = blockIdx.x * BN;
  for (int r0 = 0; r0 < N; r0 += BM) {
    grad_tile(h, W, bias, y, lse, g, N, d, V, r0, v0, As, Bs, Gs);
    if (db && threadIdx.x < BN && v0 + threadIdx.x < V) {
      float a = 0.0f;
      for (int r = 0; r < BM; ++r) {
        a += Gs[r][threadIdx.x];
      }
      db[v0 + threadIdx.x] += a;
    }
    for (int c0 = 0; dw && c0 < d; c0 += DC) {
      for (int e = threadIdx.x; e < BM * DC; e += TPB) {
        int r = e / DC, c = e % DC;
        Hs[r][c] = (r0 + r < N && c0 + c < d) ? f32(h[size_t(r0 + r) * d + c0 + c]) : 0.0f;
      }
      __syncthreads();
      for (int i = 0; i < 4; ++i) {
        int v = v0 + ty * 4 + i;
        for (int j = 0; j < CPT; ++j) {
          int c = tx * CPT + j;
          float a = 0.0f;
          for (int r = 0; r < BM; ++r) {
            a += Gs[r][ty * 4 + i] * Hs[r][c];
          }
          if (v < V && c0 + c < d) {
            dw[size_t(v) * d + c0 + c] += a;
          }
        }
      }
      __syncthreads();
    }
    __syncthreads(); // Gs is rewritten by the next token tile
  }
}

__global__ void fill_zero(float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    x[i] = 0.0f;
  }
}

template <typename T>
__global__ void cast_out(const float* x, T* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    out[i] = from_f32<T>(x[i]);
  }
}

unsigned grid_for(size_t n) {
  return static_cast<unsigned>(std::max<size_t>(1, std::min<size_t>((n + 255) / 256, 65535)));
}

// Float32 scratch on the encoder's stream, released after the command buffer completes.
float* scratch(size_t n, mx::cu::CommandEncoder& enc) {
  mx::array a({static_cast<int>(std::max<size_t>(n, 1))}, mx::float32, nullptr, {});
  a.set_data(cu::malloc_device(std::max<size_t>(n, 1) * sizeof(float), enc));
  enc.add_temporary(a);
  return gpu_ptr<float>(a);
}

template <typename T>
void forward(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
             std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  for (auto& a : in) {
    enc.set_input_array(a);
  }
  for (auto& o : out) {
    cu::alloc_output(o, enc);
  }
  if (N == 0) {
    return;
  }
  const T* bias = p.has_bias() ? gpu_ptr<T>(in[3]) : nullptr;
  cu::launch(enc, reinterpret_cast<const void*>(&lce_forward<T>), dim3((N + BM - 1) / BM),
             dim3(TPB), 0, gpu_ptr<T>(in[0]), gpu_ptr<T>(in[1]), bias,
             gpu_ptr<int32_t>(in[2]), N, d, V, gpu_ptr<float>(out[0]),
             gpu_ptr<float>(out[1]));
}

template <typename T>
void backward(const LinearCrossEntropyVJP& p, const std::vector<mx::array>& in,
              std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  for (auto& a : in) {
    enc.set_input_array(a);
  }
  for (auto& o : out) {
    cu::alloc_output(o, enc);
  }
  const T* h = gpu_ptr<T>(in[0]);
  const T* W = gpu_ptr<T>(in[1]);
  const int32_t* y = gpu_ptr<int32_t>(in[2]);
  const float* lse = gpu_ptr<float>(in[3]);
  const float* g = gpu_ptr<float>(in[4]);
  const T* bias = p.has_bias() ? gpu_ptr<T>(in[5]) : nullptr;
  int k = 0;
  auto zeroed = [&](size_t n) {
    float* x = scratch(n, enc);
    cu::launch(enc, reinterpret_cast<const void*>(&fill_zero), dim3(grid_for(n)), dim3(256),
               0, x, n);
    return x;
  };
  auto finish = [&](float* x, mx::array& o) {
    size_t n = o.size();
    cu::launch(enc, reinterpret_cast<const void*>(&cast_out<T>), dim3(grid_for(n)),
               dim3(256), 0, const_cast<const float*>(x), gpu_ptr<T>(o), n);
  };
  if (p.need_dh()) {
    float* dh = zeroed(size_t(N) * d);
    if (N > 0) {
      cu::launch(enc, reinterpret_cast<const void*>(&lce_backward_dh<T>),
                 dim3((N + BM - 1) / BM), dim3(TPB), 0, h, W, bias, y, lse, g, N, d, V, dh);
    }
    finish(dh, out[k++]);
  }
  if (p.need_dw() || p.need_db()) {
    float* dw = p.need_dw() ? zeroed(size_t(V) * d) : nullptr;
    float* db = p.need_db() ? zeroed(size_t(V)) : nullptr;
    if (N > 0) {
      cu::launch(enc, reinterpret_cast<const void*>(&lce_backward_dw<T>),
                 dim3((V + BN - 1) / BN), dim3(TPB), 0, h, W, bias, y, lse, g, N, d, V, dw,
                 db);
    }
    if (dw) {
      finish(dw, out[k++]);
    }
    if (db) {
      finish(db, out[k++]);
    }
  }
}

} // namespace

void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  switch (inputs[0].dtype()) {
    case mx::float32:
      return forward<float>(*this, inputs, outputs, enc);
    case mx::float16:
      return forward<__half>(*this, inputs, outputs, enc);
    case mx::bfloat16:
      return forward<__nv_bfloat16>(*this, inputs, outputs, enc);
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

void LinearCrossEntropyVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  switch (inputs[0].dtype()) {
    case mx::float32:
      return backward<float>(*this, inputs, outputs, enc);
    case mx::float16:
      return backward<__half>(*this, inputs, outputs, enc);
    case mx::bfloat16:
      return backward<__nv_bfloat16>(*this, inputs, outputs, enc);
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

} // namespace mlx_tuner
