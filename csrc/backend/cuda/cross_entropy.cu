// CUDA kernels of linear_cross_entropy (maths: csrc/ops/cross_entropy.h). A dense head
// only: the op dequantizes a quantized head for the GPU.
//
// The vocabulary is walked in chunks of Vc columns (a multiple of 256, so that W and dW
// row blocks stay 256-byte aligned for cuBLASLt; the float32 logit chunk is ~128 MiB at
// most). Per chunk, cuBLASLt computes Z = h · W[v0 : v0 + Vc]ᵀ (T inputs, float32 out),
// then one memory-bound kernel reads Z (adding the bias):
//   forward : merges each row's (max, Σ exp) of the chunk into the running state, picks
//             the target logit; after the last chunk lse = m + log s, loss = lse − z_y.
//   backward: G = g (softmax − onehot) in T (zero rows for ignored tokens and g = 0),
//             dh += G · W_c (float32 accumulator), dW[v0 : v0 + Vc] = Gᵀ h, db_c = 1ᵀ G.
// One Z (and G) buffer serves every chunk. MLX orders graph nodes by the last writer of
// each registered buffer, not by readers: the kernels register Z as written, and each
// backward chunk's first GEMM registers the previous chunk's gradient outputs, so no
// chunk overwrites Z or G while they are still being read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>

#include "backend/cuda/gemm.cuh"
#include "ops/cross_entropy.h"

namespace mlx_tuner {

namespace {

namespace cu = mlx_tuner::cuda;
using cu::gemm;
using cu::scratch;

constexpr int kThreads = 256; // threads per block of every kernel here
constexpr int kGradCols = 4 * kThreads; // columns per block of the gradient kernel
constexpr int kChunkAlign = 256; // chunk widths are multiples of this
constexpr size_t kChunkBytes = size_t(128) << 20; // the float32 logit chunk, at most

__device__ inline float to_f(float x) {
  return x;
}
__device__ inline float to_f(__half x) {
  return __half2float(x);
}
__device__ inline float to_f(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ inline T from_f(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half(x);
  } else {
    return __float2bfloat16(x);
  }
}

// A partial log-sum-exp: max m and s = Σ exp(x − m); empty: m = -inf, s = 0.
struct Lse {
  float m, s;
};

__device__ inline Lse merge(Lse a, Lse b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) {
    return {m, 0.0f}; // both empty (or all logits -inf): no exp(-inf − -inf) = NaN
  }
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ inline void push(Lse& a, float x) {
  if (x > a.m) {
    a.s = a.s * __expf(a.m - x) + 1.0f;
    a.m = x;
  } else if (a.m != -INFINITY) { // x = -inf adds exp(-inf) = 0; a NaN x stays NaN
    a.s += __expf(x - a.m);
  }
}

__device__ inline Lse shfl_xor(Lse a, int o) {
  return {__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
}

// The merge over the block's threads, valid in thread 0.
__device__ Lse block_merge(Lse a) {
  __shared__ Lse part[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) {
    a = merge(a, shfl_xor(a, o));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    part[warp] = a;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? part[lane] : Lse{-INFINITY, 0.0f};
    for (int o = kThreads / 64; o > 0; o /= 2) {
      a = merge(a, shfl_xor(a, o));
    }
  }
  return a;
}

// One block per token n: merges the chunk's logits z[n, 0 : vc] (+ bias[v0 :]) into the
// running state (m = state[n], s = state[N + n]) and keeps the target's logit in loss[n]
// until the last chunk writes lse and the loss. z = nullptr means logits 0 (d = 0).
template <typename T>
__global__ void lce_chunk_forward(const float* z, const T* bias, const int32_t* y, int N,
                                  int vc, int v0, int V, int first, int last,
                                  float* state, float* loss, float* lse) {
  const int n = blockIdx.x;
  const float* row = z ? z + size_t(n) * vc : nullptr;
  const T* b = bias ? bias + v0 : nullptr;
  Lse a{-INFINITY, 0.0f};
  if (row && vc % 4 == 0) { // 16-byte loads: rows start 16-byte aligned
    const float4* row4 = reinterpret_cast<const float4*>(row);
    for (int j = threadIdx.x; j < vc / 4; j += kThreads) {
      const float4 q = row4[j];
      const float x[4] = {q.x, q.y, q.z, q.w};
      for (int k = 0; k < 4; ++k) {
        push(a, b ? x[k] + to_f(b[4 * j + k]) : x[k]);
      }
    }
  } else {
    for (int j = threadIdx.x; j < vc; j += kThreads) {
      const float x = row ? row[j] : 0.0f;
      push(a, b ? x + to_f(b[j]) : x);
    }
  }
  a = block_merge(a);
  if (threadIdx.x != 0) {
    return;
  }
  if (!first) {
    a = merge({state[n], state[N + n]}, a);
  }
  const int t = y[n];
  float zt = first ? 0.0f : loss[n];
  if (t >= v0 && t - v0 < vc) {
    zt = (row ? row[t - v0] : 0.0f) + (b ? to_f(b[t - v0]) : 0.0f);
  }
  if (last) {
    const float l = a.m + logf(a.s);
    lse[n] = l;
    loss[n] = (t >= 0 && t < V) ? l - zt : 0.0f;
  } else {
    state[n] = a.m;
    state[N + n] = a.s;
    loss[n] = zt;
  }
}

// G[n, j] = g_n (exp(z[n, j] + bias[v0 + j] − lse_n) − [v0 + j = y_n]) in T; a zero row
// for ignored targets and g_n = 0. Grid (N, ⌈vc / kGradCols⌉); a thread owns 4 columns
// (adjacent when vc % 4 == 0: 16-byte loads, one 4-wide store). G may be z itself (T =
// float): each element is read, then written, by the same thread.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
__global__ void lce_chunk_grad(const float* z, const T* bias, const int32_t* y,
                               const float* lse, const float* g, int vc, int v0, int V,
                               T* G) {
  const int n = blockIdx.x;
  const int t = y[n];
  const float gn = (t >= 0 && t < V) ? g[n] : 0.0f;
  const float l = lse[n];
  const float* row = z ? z + size_t(n) * vc : nullptr;
  T* out = G + size_t(n) * vc;
  const bool vec = vc % 4 == 0;
  const int j0 = blockIdx.y * kGradCols + (vec ? 4 * threadIdx.x : threadIdx.x);
  const int step = vec ? 1 : kThreads;
  if (vec && j0 >= vc) {
    return;
  }
  float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (gn != 0.0f && row) {
    if (vec) {
      const float4 q = *reinterpret_cast<const float4*>(row + j0);
      x[0] = q.x, x[1] = q.y, x[2] = q.z, x[3] = q.w;
    } else {
      for (int k = 0; k < 4; ++k) {
        x[k] = j0 + k * step < vc ? row[j0 + k * step] : 0.0f;
      }
    }
  }
  Vec4<T> o;
  for (int k = 0; k < 4; ++k) {
    const int j = j0 + k * step;
    float v = 0.0f;
    if (gn != 0.0f && j < vc) {
      const float xb = bias ? x[k] + to_f(bias[v0 + j]) : x[k];
      v = gn * __expf(xb - l);
      if (v0 + j == t) {
        v -= gn;
      }
    }
    o.v[k] = from_f<T>(v);
  }
  if (vec) {
    *reinterpret_cast<Vec4<T>*>(out + j0) = o;
  } else {
    for (int k = 0; k < 4 && j0 + k * step < vc; ++k) {
      out[j0 + k * step] = o.v[k];
    }
  }
}

template <typename T>
__global__ void lce_fill(T* x, long long n, float value) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    x[i] = from_f<T>(value);
  }
}

template <typename In, typename Out>
__global__ void lce_copy(const In* x, Out* out, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    out[i] = from_f<Out>(to_f(x[i]));
  }
}

// cu::launch with kThreads threads; the arguments are copied so that they are non-const
// lvalues of exactly the kernel's parameter types (const ints would not bind).
template <typename... Args>
void run(mx::cu::CommandEncoder& enc, const void* kernel, dim3 grid, Args... args) {
  cu::launch(enc, kernel, grid, dim3(kThreads), 0, args...);
}

dim3 grid_for(long long n) {
  long long blocks = std::min<long long>((n + kThreads - 1) / kThreads, 4096);
  return dim3(unsigned(std::max<long long>(1, blocks)));
}

// Registers what the next node reads and writes (null entries skipped).
void track(mx::cu::CommandEncoder& enc, std::initializer_list<const mx::array*> in,
           std::initializer_list<const mx::array*> out) {
  for (auto* a : in) {
    if (a) {
      enc.set_input_array(*a);
    }
  }
  for (auto* a : out) {
    if (a) {
      enc.set_output_array(*a);
    }
  }
}

template <typename T>
void fill(mx::cu::CommandEncoder& enc, mx::array& x, float value) {
  long long n = x.size();
  if (n == 0) {
    return;
  }
  track(enc, {}, {&x});
  run(enc, reinterpret_cast<const void*>(&lce_fill<T>), grid_for(n), gpu_ptr<T>(x), n,
      value);
}

template <typename In, typename Out>
void copy(mx::cu::CommandEncoder& enc, const mx::array& x, mx::array& out) {
  long long n = x.size();
  if (n == 0) {
    return;
  }
  track(enc, {&x}, {&out});
  run(enc, reinterpret_cast<const void*>(&lce_copy<In, Out>), grid_for(n), gpu_ptr<In>(x),
      gpu_ptr<Out>(out), n);
}

// cuBLASLt plans assume 256-byte aligned operands: an input that is a view at an odd
// offset is copied first.
template <typename T>
mx::array aligned(mx::cu::CommandEncoder& enc, const mx::array& x) {
  if (reinterpret_cast<std::uintptr_t>(gpu_ptr<void>(x)) % 256 == 0) {
    return x;
  }
  auto c = scratch(enc, x.shape(), x.dtype());
  copy<T, T>(enc, x, c);
  return c;
}

// Vocabulary columns per chunk: MLX_TUNER_CE_CHUNK (rounded up to a multiple of 256) or
// the most that keeps the float32 chunk within kChunkBytes; at least 256, at most V.
int chunk_width(int N, int V) {
  long long vc;
  const char* env = std::getenv("MLX_TUNER_CE_CHUNK");
  if (env != nullptr && env[0] != '\0') {
    vc = std::max(1LL, std::atoll(env));
    vc = (vc + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  } else {
    vc = static_cast<long long>(kChunkBytes / (sizeof(float) * std::max(N, 1)));
    vc = std::max<long long>(kChunkAlign, vc / kChunkAlign * kChunkAlign);
  }
  return static_cast<int>(std::min<long long>(vc, V));
}

cu::Gemm gemm_of(bool ta, bool tb, int m, int n, int k, mx::Dtype ab, mx::Dtype c,
                 size_t b_off = 0, size_t c_off = 0) {
  cu::Gemm g{ta, tb, m, n, k, ab, ab, c};
  g.b_off = b_off;
  g.c_off = c_off;
  return g;
}

template <typename T>
void forward(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
             std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  const int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  const auto dt = in[0].dtype();
  for (auto& o : out) {
    cu::alloc_output(o, enc);
  }
  if (N == 0) {
    return;
  }
  auto h = aligned<T>(enc, in[0]);
  auto w = aligned<T>(enc, in[1]);
  const auto& y = in[2];
  const mx::array* bias = p.has_bias() ? &in[3] : nullptr;
  const int vmax = chunk_width(N, V);
  auto z = scratch(enc, {N, vmax}, mx::float32);
  auto state = scratch(enc, {2, N}, mx::float32);
  const float* zp = d > 0 ? gpu_ptr<float>(z) : nullptr;
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  for (int v0 = 0; v0 < V; v0 += vmax) {
    const int vc = std::min(vmax, V - v0);
    const size_t off = size_t(v0) * d; // of W's (and dW's) rows v0 :
    if (d > 0) {
      gemm(enc, gemm_of(false, true, N, vc, d, dt, mx::float32, off), 1.0f, h, w,
           0.0f, z);
    }
    // z is registered as written: the next chunk's GEMM waits for this read.
    track(enc, {&y, bias}, {&z, &state, &out[0], &out[1]});
    const int first = v0 == 0, last = v0 + vc >= V;
    run(enc, reinterpret_cast<const void*>(&lce_chunk_forward<T>), dim3(N), zp, bp,
        gpu_ptr<int32_t>(y), N, vc, v0, V, first, last, gpu_ptr<float>(state),
        gpu_ptr<float>(out[0]), gpu_ptr<float>(out[1]));
  }
}

template <typename T>
void backward(const LinearCrossEntropyVJP& p, const std::vector<mx::array>& in,
              std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  constexpr bool f32 = std::is_same_v<T, float>;
  const int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  const auto dt = in[0].dtype();
  int k = 0;
  mx::array* dh = p.need_dh() ? &out[k++] : nullptr;
  mx::array* dw = p.need_dw() ? &out[k++] : nullptr;
  mx::array* db = p.need_db() ? &out[k++] : nullptr;
  for (auto& o : out) {
    cu::alloc_output(o, enc);
  }
  if (N == 0) { // the op never builds this node for an empty batch; zeros all the same
    for (auto* o : {dh, dw, db}) {
      if (o) {
        fill<T>(enc, *o, 0.0f);
      }
    }
    return;
  }
  auto h = aligned<T>(enc, in[0]);
  auto w = aligned<T>(enc, in[1]);
  const auto& y = in[2];
  const auto& lse = in[3];
  const auto& g = in[4];
  const mx::array* bias = p.has_bias() ? &in[5] : nullptr;
  const int vmax = chunk_width(N, V);
  auto z = scratch(enc, {N, vmax}, mx::float32);
  // G in T; for float32 it overwrites Z in place.
  auto G = f32 ? z : scratch(enc, {N, vmax}, dt);
  std::optional<mx::array> dh_acc, ones;
  if (dh) {
    dh_acc = f32 ? *dh : scratch(enc, {N, d}, mx::float32);
  }
  if (db) {
    ones = scratch(enc, {1, N}, dt);
    fill<T>(enc, *ones, 1.0f);
  }
  const mx::array* acc = dh_acc ? &*dh_acc : nullptr;
  const float* zp = d > 0 ? gpu_ptr<float>(z) : nullptr;
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  for (int v0 = 0; v0 < V; v0 += vmax) {
    const int vc = std::min(vmax, V - v0);
    const size_t off = size_t(v0) * d; // of W's (and dW's) rows v0 :
    if (d > 0) {
      // After the previous chunk's gradient GEMMs, which read G (and Z for float32).
      track(enc, {acc, dw, db}, {});
      gemm(enc, gemm_of(false, true, N, vc, d, dt, mx::float32, off), 1.0f, h, w,
           0.0f, z);
    }
    track(enc, {&y, &lse, &g, bias, acc, dw, db}, {&z, &G});
    const unsigned col_blocks = unsigned((vc + kGradCols - 1) / kGradCols);
    run(enc, reinterpret_cast<const void*>(&lce_chunk_grad<T>), dim3(N, col_blocks), zp,
        bp, gpu_ptr<int32_t>(y), gpu_ptr<float>(lse), gpu_ptr<float>(g), vc, v0, V,
        gpu_ptr<T>(G));
    if (acc) { // dh (+)= G · W[v0 : v0 + vc]
      gemm(enc, gemm_of(false, false, N, d, vc, dt, mx::float32, off), 1.0f, G, w,
           v0 == 0 ? 0.0f : 1.0f, *dh_acc);
    }
    if (dw) { // dW[v0 : v0 + vc] = Gᵀ · h
      gemm(enc, gemm_of(true, false, vc, d, N, dt, dt, 0, off), 1.0f, G, h, 0.0f,
           *dw);
    }
    if (db) { // db[v0 : v0 + vc] = 1ᵀ · G
      gemm(enc, gemm_of(false, false, 1, vc, N, dt, dt, 0, size_t(v0)), 1.0f, *ones, G,
           0.0f, *db);
    }
  }
  if (dh && !f32) {
    copy<float, T>(enc, *dh_acc, *dh);
  }
}

} // namespace

void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  if (q_.quantized) {
    throw std::logic_error("[linear_cross_entropy] the GPU kernels take a dense head.");
  }
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
  if (q_.quantized) {
    throw std::logic_error("[linear_cross_entropy] the GPU kernels take a dense head.");
  }
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
