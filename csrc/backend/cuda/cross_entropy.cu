// CUDA kernels of linear_cross_entropy (maths: csrc/ops/cross_entropy.h). A dense head
// only: the op dequantizes a quantized head for the GPU.
//
// Every kernel recomputes (BM tokens × BN vocabulary) logit tiles; nothing of size N·V is
// ever stored. Tiles are GEMMs on tensor cores (WMMA 16×16×16, float32 accumulate) for
// float16/bfloat16, or a shared-memory SIMT GEMM for float32 (and for every dtype when
// MLX_TUNER_CE_CUDA_SIMT=1, the cross-check). 256 threads; each owns 4×4 tile entries.
//   forward : one block per BM tokens sweeps the vocabulary; each thread keeps an online
//             (max, sum) per row over its columns, merged across the row's threads at the
//             end; the target logit is picked from the tile that holds it.
//   dh      : one block per BM tokens: G = g (softmax − onehot) of a tile goes to shared
//             memory, then dh[rows] += G · W[cols] (float32, the block owns its rows).
//   dW, db  : one block per BN vocabulary rows sweeps the tokens: dW[cols] += Gᵀ · h[rows].
// On tensor cores G is rounded to the input dtype for the second GEMMs, as MLX's own
// backward of the materialized logits does. Shared memory stays under 48 KiB per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdlib>

#include "backend/cuda/common.cuh"
#include "ops/cross_entropy.h"

namespace mlx_tuner {

namespace {

namespace cu = mlx_tuner::cuda;
namespace wmma = nvcuda::wmma;

constexpr int BM = 64, BN = 64, BK = 32, TPB = 256; // 16 × 16 threads, 4 × 4 outputs each
constexpr int DC = 64; // columns of d per pass of the backward GEMMs

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
__device__ inline T from_f32(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else {
    return __float2bfloat16(x);
  }
}

// Shared memory of a block. SIMT: float tiles, k-major. Tensor cores: T tiles padded by 8
// (WMMA wants 32-byte aligned fragments and leading dimensions that are multiples of 8).
template <typename T, bool TC>
struct Smem;
template <typename T>
struct Smem<T, false> {
  float A[BK][BM + 1]; // h tile, transposed
  float B[BK][BN + 1]; // W tile, transposed
  float G[BM][BN + 1]; // G = g (softmax − onehot)
  float X[BN][DC / 2 + 1]; // W (dh) or h (dW) rows, DC/2 columns a pass
};
template <typename T>
struct Smem<T, true> {
  alignas(32) T A[BM][BK + 8]; // h tile: matrix_a row-major
  alignas(32) T B[BN][BK + 8]; // W tile: Wᵀ as matrix_b col-major
  alignas(32) float G[BM][BN + 4]; // logits, then G; then a GEMM's output chunk
  alignas(32) T G16[BM][BN + 8]; // G in T
  alignas(32) T X[BN][DC + 8]; // W (dh) or h (dW) rows: matrix_b row-major
};

// acc[i][j] = logit(row r0 + ty*4 + i, col v0 + tx*4 + j) (+ bias), 0 outside the matrix.
template <typename T, bool TC>
__device__ void logit_tile(const T* h, const T* W, const T* bias, int N, int d, int V,
                           int r0, int v0, Smem<T, TC>& sm, float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  if constexpr (TC) {
    const int warp = threadIdx.x / 32, fr = warp % 4, fc = (warp / 4) * 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
    wmma::fill_fragment(c[0], 0.0f);
    wmma::fill_fragment(c[1], 0.0f);
    const T zero = from_f32<T>(0.0f);
    for (int k0 = 0; k0 < d; k0 += BK) {
      for (int e = threadIdx.x; e < BM * BK; e += TPB) {
        int r = e / BK, k = e % BK;
        sm.A[r][k] = (r0 + r < N && k0 + k < d) ? h[size_t(r0 + r) * d + k0 + k] : zero;
        sm.B[r][k] = (v0 + r < V && k0 + k < d) ? W[size_t(v0 + r) * d + k0 + k] : zero;
      }
      __syncthreads();
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, &sm.A[fr * 16][kk], BK + 8);
        for (int f = 0; f < 2; ++f) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, &sm.B[(fc + f) * 16][kk], BK + 8);
          wmma::mma_sync(c[f], a, b, c[f]);
        }
      }
      __syncthreads(); // before the next k0 overwrites A/B
    }
    __syncthreads(); // every thread has read sm.G of the previous tile (d may be 0)
    for (int f = 0; f < 2; ++f) {
      wmma::store_matrix_sync(&sm.G[fr * 16][(fc + f) * 16], c[f], BN + 4, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = sm.G[ty * 4 + i][tx * 4 + j]; // only this thread rewrites these entries
      }
    }
  } else {
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = 0.0f;
      }
    }
    for (int k0 = 0; k0 < d; k0 += BK) {
      for (int e = threadIdx.x; e < BM * BK; e += TPB) {
        int r = e / BK, k = e % BK;
        sm.A[k][r] = (r0 + r < N && k0 + k < d) ? f32(h[size_t(r0 + r) * d + k0 + k]) : 0.0f;
        sm.B[k][r] = (v0 + r < V && k0 + k < d) ? f32(W[size_t(v0 + r) * d + k0 + k]) : 0.0f;
      }
      __syncthreads();
      for (int k = 0; k < BK; ++k) {
        float a[4], b[4];
        for (int i = 0; i < 4; ++i) {
          a[i] = sm.A[k][ty * 4 + i];
          b[i] = sm.B[k][tx * 4 + i];
        }
        for (int i = 0; i < 4; ++i) {
          for (int j = 0; j < 4; ++j) {
            acc[i][j] += a[i] * b[j];
          }
        }
      }
      __syncthreads(); // before the next k0 overwrites A/B
    }
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

template <typename T, bool TC>
__global__ void lce_forward(const T* h, const T* W, const T* bias, const int32_t* y, int N,
                            int d, int V, float* loss, float* lse) {
  __shared__ Smem<T, TC> sm;
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
    logit_tile<T, TC>(h, W, bias, N, d, V, r0, v0, sm, acc);
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

// G = g (softmax − onehot) of the tile into sm.G (and sm.G16 on tensor cores); 0 for
// ignored tokens and outside the matrix.
template <typename T, bool TC>
__device__ void grad_tile(const T* h, const T* W, const T* bias, const int32_t* y,
                          const float* lse, const float* g, int N, int d, int V, int r0,
                          int v0, Smem<T, TC>& sm) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4];
  logit_tile<T, TC>(h, W, bias, N, d, V, r0, v0, sm, acc);
  for (int i = 0; i < 4; ++i) {
    int r = r0 + ty * 4 + i;
    int tg = r < N ? y[r] : -1;
    float gn = (r < N && tg >= 0 && tg < V) ? g[r] : 0.0f;
    float l = r < N ? lse[r] : 0.0f;
    for (int j = 0; j < 4; ++j) {
      int v = v0 + tx * 4 + j;
      float p = (v < V && gn != 0.0f) ? __expf(acc[i][j] - l) : 0.0f;
      float gv = gn * (p - (v == tg ? 1.0f : 0.0f));
      sm.G[ty * 4 + i][tx * 4 + j] = gv;
      if constexpr (TC) {
        sm.G16[ty * 4 + i][tx * 4 + j] = from_f32<T>(gv);
      }
    }
  }
  __syncthreads();
}

// out[rows of the block][c0 : c0 + DC] += (G or Gᵀ) · X on tensor cores, through sm.G.
// transpose_g: A = Gᵀ (dW) instead of G (dh). The caller has filled sm.X and synced.
template <typename T, bool transpose_g>
__device__ void tc_chunk(Smem<T, true>& sm, float* out, int rows0, int rows, int c0, int d) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int warp = threadIdx.x / 32, fr = warp % 4, fc = (warp / 4) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.0f);
  wmma::fill_fragment(c[1], 0.0f);
  for (int kk = 0; kk < BN; kk += 16) {
    using Layout = std::conditional_t<transpose_g, wmma::col_major, wmma::row_major>;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout> a;
    if constexpr (transpose_g) {
      wmma::load_matrix_sync(a, &sm.G16[kk][fr * 16], BN + 8);
    } else {
      wmma::load_matrix_sync(a, &sm.G16[fr * 16][kk], BN + 8);
    }
    for (int f = 0; f < 2; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(b, &sm.X[kk][(fc + f) * 16], DC + 8);
      wmma::mma_sync(c[f], a, b, c[f]);
    }
  }
  __syncthreads(); // every warp has read G16 and X; sm.G is free for the output chunk
  for (int f = 0; f < 2; ++f) {
    wmma::store_matrix_sync(&sm.G[fr * 16][(fc + f) * 16], c[f], BN + 4, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = 0; i < 4; ++i) {
    int r = rows0 + ty * 4 + i;
    for (int j = 0; j < 4; ++j) {
      int col = c0 + tx * 4 + j;
      if (r < rows && col < d) {
        out[size_t(r) * d + col] += sm.G[ty * 4 + i][tx * 4 + j];
      }
    }
  }
  __syncthreads(); // before sm.X / sm.G are rewritten
}

template <typename T, bool TC>
__global__ void lce_backward_dh(const T* h, const T* W, const T* bias, const int32_t* y,
                                const float* lse, const float* g, int N, int d, int V,
                                float* dh) {
  __shared__ Smem<T, TC> sm;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int r0 = blockIdx.x * BM;
  for (int v0 = 0; v0 < V; v0 += BN) {
    grad_tile<T, TC>(h, W, bias, y, lse, g, N, d, V, r0, v0, sm);
    if constexpr (TC) {
      for (int c0 = 0; c0 < d; c0 += DC) {
        for (int e = threadIdx.x; e < BN * DC; e += TPB) {
          int v = e / DC, c = e % DC;
          sm.X[v][c] = (v0 + v < V && c0 + c < d) ? W[size_t(v0 + v) * d + c0 + c]
                                                   : from_f32<T>(0.0f);
        }
        __syncthreads();
        tc_chunk<T, false>(sm, dh, r0, N, c0, d);
      }
    } else {
      constexpr int dc = DC / 2, cpt = dc / 16;
      for (int c0 = 0; c0 < d; c0 += dc) {
        for (int e = threadIdx.x; e < BN * dc; e += TPB) {
          int v = e / dc, c = e % dc;
          sm.X[v][c] = (v0 + v < V && c0 + c < d) ? f32(W[size_t(v0 + v) * d + c0 + c]) : 0.0f;
        }
        __syncthreads();
        for (int i = 0; i < 4; ++i) {
          int r = r0 + ty * 4 + i;
          for (int j = 0; j < cpt; ++j) {
            int c = tx * cpt + j;
            float a = 0.0f;
            for (int v = 0; v < BN; ++v) {
              a += sm.G[ty * 4 + i][v] * sm.X[v][c];
            }
            if (r < N && c0 + c < d) {
              dh[size_t(r) * d + c0 + c] += a;
            }
          }
        }
        __syncthreads();
      }
    }
    __syncthreads(); // sm.G is rewritten by the next vocabulary tile
  }
}

template <typename T, bool TC>
__global__ void lce_backward_dw(const T* h, const T* W, const T* bias, const int32_t* y,
                                const float* lse, const float* g, int N, int d, int V,
                                float* dw, float* db) {
  __shared__ Smem<T, TC> sm;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int v0 = blockIdx.x * BN;
  for (int r0 = 0; r0 < N; r0 += BM) {
    grad_tile<T, TC>(h, W, bias, y, lse, g, N, d, V, r0, v0, sm);
    if (db && threadIdx.x < BN && v0 + threadIdx.x < V) {
      float a = 0.0f;
      for (int r = 0; r < BM; ++r) {
        a += sm.G[r][threadIdx.x];
      }
      db[v0 + threadIdx.x] += a;
    }
    __syncthreads(); // the column sums read sm.G, which tc_chunk overwrites
    if constexpr (TC) {
      for (int c0 = 0; dw && c0 < d; c0 += DC) {
        for (int e = threadIdx.x; e < BM * DC; e += TPB) {
          int r = e / DC, c = e % DC;
          sm.X[r][c] = (r0 + r < N && c0 + c < d) ? h[size_t(r0 + r) * d + c0 + c]
                                                   : from_f32<T>(0.0f);
        }
        __syncthreads();
        tc_chunk<T, true>(sm, dw, v0, V, c0, d);
      }
    } else {
      constexpr int dc = DC / 2, cpt = dc / 16;
      for (int c0 = 0; dw && c0 < d; c0 += dc) {
        for (int e = threadIdx.x; e < BM * dc; e += TPB) {
          int r = e / dc, c = e % dc;
          sm.X[r][c] = (r0 + r < N && c0 + c < d) ? f32(h[size_t(r0 + r) * d + c0 + c]) : 0.0f;
        }
        __syncthreads();
        for (int i = 0; i < 4; ++i) {
          int v = v0 + ty * 4 + i;
          for (int j = 0; j < cpt; ++j) {
            int c = tx * cpt + j;
            float a = 0.0f;
            for (int r = 0; r < BM; ++r) {
              a += sm.G[r][ty * 4 + i] * sm.X[r][c];
            }
            if (v < V && c0 + c < d) {
              dw[size_t(v) * d + c0 + c] += a;
            }
          }
        }
        __syncthreads();
      }
    }
    __syncthreads(); // sm.G is rewritten by the next token tile
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

template <typename T, bool TC>
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
  cu::launch(enc, reinterpret_cast<const void*>(&lce_forward<T, TC>), dim3((N + BM - 1) / BM),
             dim3(TPB), 0, gpu_ptr<T>(in[0]), gpu_ptr<T>(in[1]), bias,
             gpu_ptr<int32_t>(in[2]), N, d, V, gpu_ptr<float>(out[0]),
             gpu_ptr<float>(out[1]));
}

template <typename T, bool TC>
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
      cu::launch(enc, reinterpret_cast<const void*>(&lce_backward_dh<T, TC>),
                 dim3((N + BM - 1) / BM), dim3(TPB), 0, h, W, bias, y, lse, g, N, d, V, dh);
    }
    finish(dh, out[k++]);
  }
  if (p.need_dw() || p.need_db()) {
    float* dw = p.need_dw() ? zeroed(size_t(V) * d) : nullptr;
    float* db = p.need_db() ? zeroed(size_t(V)) : nullptr;
    if (N > 0) {
      cu::launch(enc, reinterpret_cast<const void*>(&lce_backward_dw<T, TC>),
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

// MLX_TUNER_CE_CUDA_SIMT=1 runs the SIMT kernels for float16/bfloat16 too (a cross-check).
bool simt_only() {
  const char* v = std::getenv("MLX_TUNER_CE_CUDA_SIMT");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

} // namespace

void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  const bool simt = simt_only();
  switch (inputs[0].dtype()) {
    case mx::float32:
      return forward<float, false>(*this, inputs, outputs, enc);
    case mx::float16:
      return simt ? forward<__half, false>(*this, inputs, outputs, enc)
                  : forward<__half, true>(*this, inputs, outputs, enc);
    case mx::bfloat16:
      return simt ? forward<__nv_bfloat16, false>(*this, inputs, outputs, enc)
                  : forward<__nv_bfloat16, true>(*this, inputs, outputs, enc);
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

void LinearCrossEntropyVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  const bool simt = simt_only();
  switch (inputs[0].dtype()) {
    case mx::float32:
      return backward<float, false>(*this, inputs, outputs, enc);
    case mx::float16:
      return simt ? backward<__half, false>(*this, inputs, outputs, enc)
                  : backward<__half, true>(*this, inputs, outputs, enc);
    case mx::bfloat16:
      return simt ? backward<__nv_bfloat16, false>(*this, inputs, outputs, enc)
                  : backward<__nv_bfloat16, true>(*this, inputs, outputs, enc);
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

} // namespace mlx_tuner
