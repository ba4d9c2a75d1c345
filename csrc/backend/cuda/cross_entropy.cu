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
//
// grad_in_forward (flash-attention style, 2 GEMMs per step instead of 3): per chunk,
// after Z, one kernel per row n takes m' = max(m, max_j z_nj), α = exp(m − m') (0 when
// m = -inf), writes P_nj = exp(z_nj − m') in T (in place in Z for float32) except at
// the target (P = 0 there; its q = exp(z_ny − m') stays in float32), updates the sums
// s = s α + Σ_j exp(z_nj − m') (float32, for lse), sp = sp α + Σ_j P_nj (as stored),
// q = q α, and rescales row n of the float32 accumulator acc (N, d) by α; then acc =
// P · W_c + (c > 0) acc. At the end, with S = sp + q (the weights then sum to 1),
//   dh_unit_n = Σ_{v≠y} P_nv (W_v − W_y) / S = (acc_n − sp W[y_n]) / S
// (0 for ignored tokens): no cancellation against W_y when p_y is near 1, which a
// rounded P_y would bring. The loss comes from s, as in the plain forward. The kernel
// registers P and acc as written, so it waits for the previous acc GEMM's read of P;
// for float32 the next Z GEMM registers acc to wait for that read of P = Z too.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>

#include "backend/cuda/dtype.cuh"
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
// grad_in_forward's in-place 16-bit chunk, at most: on the H200 (N 8192, d 1024, V
// 151,936) 16,384-wide chunks spend 6.46 ms in their GEMMs against 6.83 ms for 8,192-wide
// ones (cuBLASLt then picks the materialized logit GEMM's 192 x 192 tile, and the float32
// accumulator is read and written 10 times instead of 19).
constexpr size_t kChunkBytesInPlace = size_t(256) << 20;

using cu::from_f;
using cu::to_f;

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

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Elements 4j .. 4j + 3 of a row as floats: one 16-byte load of float, 8 of 16-bit types
// (rows start 4-element aligned when vc % 4 == 0).
template <typename Z>
__device__ inline void load4(const Z* row, int j, float x[4]) {
  const Vec4<Z> q = reinterpret_cast<const Vec4<Z>*>(row)[j];
  for (int k = 0; k < 4; ++k) {
    x[k] = to_f(q.v[k]);
  }
}

// One block per token n: merges the chunk's logits z[n, 0 : vc] (+ bias[v0 :]) into the
// running state (m = state[n], s = state[N + n]) and keeps the target's logit in loss[n]
// until the last chunk writes lse and the loss. z = nullptr means logits 0 (d = 0).
template <typename T, typename Z>
__global__ void lce_chunk_forward(const Z* z, const T* bias, const int32_t* y, int N,
                                  int vc, int v0, int V, int first, int last,
                                  float* state, float* loss, float* lse) {
  const int n = blockIdx.x;
  const Z* row = z ? z + size_t(n) * vc : nullptr;
  const T* b = bias ? bias + v0 : nullptr;
  Lse a{-INFINITY, 0.0f};
  if (row && vc % 4 == 0) { // vector loads: rows start 4-element aligned
    for (int j = threadIdx.x; j < vc / 4; j += kThreads) {
      float x[4];
      load4(row, j, x);
      for (int k = 0; k < 4; ++k) {
        push(a, b ? x[k] + to_f(b[4 * j + k]) : x[k]);
      }
    }
  } else {
    for (int j = threadIdx.x; j < vc; j += kThreads) {
      const float x = row ? to_f(row[j]) : 0.0f;
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
    zt = (row ? to_f(row[t - v0]) : 0.0f) + (b ? to_f(b[t - v0]) : 0.0f);
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
// (adjacent when vc % 4 == 0: vector loads, one 4-wide store). G may be z itself (Z = T):
// each element is read, then written, by the same thread.
template <typename T, typename Z>
__global__ void lce_chunk_grad(const Z* z, const T* bias, const int32_t* y,
                               const float* lse, const float* g, int vc, int v0, int V,
                               T* G) {
  const int n = blockIdx.x;
  const int t = y[n];
  const float gn = (t >= 0 && t < V) ? g[n] : 0.0f;
  const float l = lse[n];
  const Z* row = z ? z + size_t(n) * vc : nullptr;
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
      load4(row, j0 / 4, x);
    } else {
      for (int k = 0; k < 4; ++k) {
        x[k] = j0 + k * step < vc ? to_f(row[j0 + k * step]) : 0.0f;
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

struct MaxOp {
  __device__ float operator()(float a, float b) const {
    return fmaxf(a, b);
  }
};
struct SumOp {
  __device__ float operator()(float a, float b) const {
    return a + b;
  }
};

// The reduction of v over the block, returned to every thread. part: kThreads / 32
// floats of shared memory; the closing barrier lets the caller reuse it at once.
template <typename Op>
__device__ float block_all_reduce(float v, Op op, float* part) {
  for (int o = 16; o > 0; o /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  }
  if (threadIdx.x % 32 == 0) {
    part[threadIdx.x / 32] = v;
  }
  __syncthreads();
  v = part[0];
  for (int w = 1; w < kThreads / 32; ++w) {
    v = op(v, part[w]);
  }
  __syncthreads();
  return v;
}

// grad_in_forward, one block per token n (maths at the top of this file): merges chunk
// z[n, 0 : vc] (+ bias[v0 :]) into state (rows m, s, sp, q of N floats), writes P[n, :]
// and rescales acc[n, :]. P may be z itself (Z = T): each element is read, then
// written, by one thread, and the target's logit is read before the first barrier.
// z = P = acc = nullptr: d = 0.
template <typename T, typename Z>
__global__ void lce_chunk_softmax(const Z* z, const T* bias, const int32_t* y, int N,
                                  int vc, int v0, int V, int d, int first, int last,
                                  float* state, float* loss, float* lse, T* P,
                                  float* acc) {
  __shared__ float part[kThreads / 32];
  const int n = blockIdx.x;
  const Z* row = z ? z + size_t(n) * vc : nullptr;
  const T* b = bias ? bias + v0 : nullptr;
  T* prow = P ? P + size_t(n) * vc : nullptr;
  const bool vec = row && vc % 4 == 0; // 16-byte loads: rows start 16-byte aligned
  const int t = y[n];
  const bool hit = t >= v0 && t - v0 < vc;
  float zt = 0.0f;
  if (threadIdx.x == 0 && hit) {
    zt = (row ? to_f(row[t - v0]) : 0.0f) + (b ? to_f(b[t - v0]) : 0.0f);
  }
  auto logit = [&](int j, float x) { return b ? x + to_f(b[j]) : x; };
  float cmax = -INFINITY;
  if (vec) {
    for (int j = threadIdx.x; j < vc / 4; j += kThreads) {
      float x[4];
      load4(row, j, x);
      for (int k = 0; k < 4; ++k) {
        cmax = fmaxf(cmax, logit(4 * j + k, x[k]));
      }
    }
  } else {
    for (int j = threadIdx.x; j < vc; j += kThreads) {
      cmax = fmaxf(cmax, logit(j, row ? to_f(row[j]) : 0.0f));
    }
  }
  cmax = block_all_reduce(cmax, MaxOp{}, part);
  const float m_old = first ? -INFINITY : state[n];
  const float m = fmaxf(m_old, cmax);
  const float alpha = m_old == m ? 1.0f : (m_old == -INFINITY ? 0.0f : __expf(m_old - m));
  // p = 0 for a -inf logit, also when m = -inf (no exp(-inf − -inf) = NaN).
  auto prob = [&](float x) { return x == -INFINITY ? 0.0f : __expf(x - m); };
  const int jt = t - v0; // the target's column (P = 0 there), if in this chunk
  float s = 0.0f, sp = 0.0f;
  if (vec) {
    // The hot loop, with no test per element: me = 0 when m = -inf (every logit so far
    // -inf) gives exp(-inf − 0) = 0; the target's P is zeroed after the loop, and the
    // bias test is hoisted out. On the H200 (10 chunks of 8192 x 16,384 bf16) this pass
    // went 1.70 -> 1.53 ms, 69% -> 76% of the copy rate. (Keeping each thread's logits in
    // registers between the two passes, 4.66 ms, and four 16-byte loads in flight a
    // thread, 1.90 ms, were slower.)
    const float me = m == -INFINITY ? 0.0f : m;
    auto exp_pass = [&](auto with_bias) {
      for (int j = threadIdx.x; j < vc / 4; j += kThreads) {
        float x[4];
        load4(row, j, x);
        Vec4<T> o;
        for (int k = 0; k < 4; ++k) {
          if constexpr (decltype(with_bias)::value) {
            x[k] += to_f(b[4 * j + k]);
          }
          const float pk = __expf(x[k] - me);
          o.v[k] = from_f<T>(pk);
          s += pk;
          sp += to_f(o.v[k]);
        }
        *reinterpret_cast<Vec4<T>*>(prow + 4 * j) = o; // vec implies P (d > 0)
      }
    };
    if (b) {
      exp_pass(std::true_type{});
    } else {
      exp_pass(std::false_type{});
    }
    // The target's P is 0: its owner (who wrote it above) takes it back out of sp.
    if (hit && (jt / 4) % kThreads == int(threadIdx.x)) {
      sp -= to_f(prow[jt]);
      prow[jt] = from_f<T>(0.0f);
    }
  } else {
    for (int j = threadIdx.x; j < vc; j += kThreads) {
      const float pj = prob(logit(j, row ? to_f(row[j]) : 0.0f));
      const T pt = from_f<T>(j == jt ? 0.0f : pj);
      s += pj;
      sp += to_f(pt);
      if (prow) {
        prow[j] = pt;
      }
    }
  }
  s = block_all_reduce(s, SumOp{}, part);
  sp = block_all_reduce(sp, SumOp{}, part);
  if (!first && alpha != 1.0f && acc) {
    float* arow = acc + size_t(n) * d;
    for (int k = threadIdx.x; k < d; k += kThreads) {
      arow[k] *= alpha;
    }
  }
  if (threadIdx.x != 0) {
    return;
  }
  float qy = hit ? prob(zt) : 0.0f; // the target is in one chunk only
  if (!first) {
    s += state[N + n] * alpha;
    sp += state[2 * N + n] * alpha;
    qy += state[3 * N + n] * alpha;
    if (!hit) {
      zt = loss[n];
    }
  }
  state[n] = m;
  state[N + n] = s;
  state[2 * N + n] = sp;
  state[3 * N + n] = qy;
  if (last) {
    const float l = m + logf(s);
    lse[n] = l;
    loss[n] = (t >= 0 && t < V) ? l - zt : 0.0f;
  } else {
    loss[n] = zt;
  }
}

// dh_unit = (acc − sp W[y]) / (sp + q) in place over acc (N, d), with sp = state[2N :]
// and q = state[3N :]; a zero row for ignored tokens (and where every logit is -inf).
template <typename T>
__global__ void lce_dh_unit(float* acc, const float* state, const int32_t* y, const T* w,
                            int N, int d, int V, long long total) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long n = i / d, k = i % d;
    const int t = y[n];
    const float sp = state[2 * N + n], S = sp + state[3 * N + n];
    float v = 0.0f;
    if (t >= 0 && t < V && S != 0.0f) {
      v = (acc[i] - sp * to_f(w[t * (long long)d + k])) / S;
    }
    acc[i] = v;
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
// the most that keeps the logit chunk (elem bytes each) within budget; at least 256,
// at most V.
int chunk_width(int N, int V, size_t elem = sizeof(float), size_t budget = kChunkBytes) {
  long long vc;
  const char* env = std::getenv("MLX_TUNER_CE_CHUNK");
  if (env != nullptr && env[0] != '\0') {
    vc = std::max(1LL, std::atoll(env));
    vc = (vc + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  } else {
    vc = static_cast<long long>(budget / (elem * std::max(N, 1)));
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

// What both forwards start from: the outputs allocated, h and W 256-byte aligned. None
// for an empty batch (nothing to compute).
struct ForwardSetup {
  int N, d, V;
  mx::Dtype dt;
  mx::array h, w;
  const mx::array& y;
  const mx::array* bias;
};

template <typename T>
std::optional<ForwardSetup> forward_setup(const LinearCrossEntropy& p,
                                          const std::vector<mx::array>& in,
                                          std::vector<mx::array>& out,
                                          mx::cu::CommandEncoder& enc) {
  const int N = in[0].shape(0), d = in[0].shape(1), V = in[1].shape(0);
  for (auto& o : out) {
    cu::alloc_output(o, enc);
  }
  if (N == 0) {
    return std::nullopt;
  }
  return ForwardSetup{N, d, V, in[0].dtype(), aligned<T>(enc, in[0]),
                      aligned<T>(enc, in[1]), in[2], p.has_bias() ? &in[3] : nullptr};
}

// The logit chunks are bfloat16 when the inputs are, in every mode: the loss alone, the
// gradient in the forward (P written over them in place) and the backward (G written
// over them in place). That is the chunk traffic of the materialized path (bf16 logits
// and their gradient), the logits rounded as it rounds them; the sums stay float32. On
// the H200 (N 8192, d 1024, V 151,936) the gradient-in-forward step took 10.56 ms against
// 12.81 for float32 chunks, the loss alone 6.06 against 7.22 ms, the loss with dh and dW
// 19.08 against 22.29 ms. Not for float16, whose range a logit can leave.
// MLX_TUNER_CE_LOGITS=float32 keeps float32 chunks. (Two chunk buffers taken in turn, so
// that the next logit GEMM could run beside this chunk's softmax, were slower: 11.76 ms.)
bool logits_in_compute_dtype(mx::Dtype dt) {
  const char* e = std::getenv("MLX_TUNER_CE_LOGITS");
  return dt == mx::bfloat16 && !(e != nullptr && std::string(e) == "float32");
}

// The loss alone: Z is the chunk's logit type (float, or T itself).
template <typename T, typename Z>
void forward_as(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
                std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  auto setup = forward_setup<T>(p, in, out, enc);
  if (!setup) {
    return;
  }
  const auto& [N, d, V, dt, h, w, y, bias] = *setup;
  const int vmax = chunk_width(N, V, sizeof(Z)); // the same bytes as a float32 chunk
  const mx::Dtype zdt = std::is_same_v<T, Z> ? dt : mx::float32;
  auto z = scratch(enc, {N, vmax}, zdt);
  auto state = scratch(enc, {2, N}, mx::float32);
  const Z* zp = d > 0 ? gpu_ptr<Z>(z) : nullptr;
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  for (int v0 = 0; v0 < V; v0 += vmax) {
    const int vc = std::min(vmax, V - v0);
    const size_t off = size_t(v0) * d; // of W's (and dW's) rows v0 :
    if (d > 0) {
      gemm(enc, gemm_of(false, true, N, vc, d, dt, zdt, off), 1.0f, h, w, 0.0f, z);
    }
    // z is registered as written: the next chunk's GEMM waits for this read.
    track(enc, {&y, bias}, {&z, &state, &out[0], &out[1]});
    const int first = v0 == 0, last = v0 + vc >= V;
    run(enc, reinterpret_cast<const void*>(&lce_chunk_forward<T, Z>), dim3(N), zp, bp,
        gpu_ptr<int32_t>(y), N, vc, v0, V, first, last, gpu_ptr<float>(state),
        gpu_ptr<float>(out[0]), gpu_ptr<float>(out[1]));
  }
}

// Calls f(std::type_identity<Z>{}) with the chunks' logit type Z: T itself for bfloat16
// inputs (logits_in_compute_dtype), float otherwise.
template <typename T, typename F>
void with_logit_type(mx::Dtype dt, F&& f) {
  if constexpr (!std::is_same_v<T, float>) {
    if (logits_in_compute_dtype(dt)) {
      return f(std::type_identity<T>{});
    }
  }
  f(std::type_identity<float>{});
}

template <typename T>
void forward(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
             std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  with_logit_type<T>(in[0].dtype(), [&](auto z) {
    forward_as<T, typename decltype(z)::type>(p, in, out, enc);
  });
}

// grad_in_forward: loss, lse and dh_unit (out[2], the accumulator until the end) in two
// GEMMs per chunk (maths and ordering at the top of this file). Z is the chunk's logit
// type: float, or T itself (logits_in_compute_dtype), P then written over Z.
template <typename T, typename Z>
void forward_with_grad_as(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
                          std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  // P overwrites Z when both have T's type: the next GEMM into the same Z buffer then
  // waits for the acc GEMM's read of P.
  constexpr bool in_place = std::is_same_v<T, Z>;
  auto setup = forward_setup<T>(p, in, out, enc);
  if (!setup) {
    return;
  }
  const auto& [N, d, V, dt, h, w, y, bias] = *setup;
  const int vmax =
      in_place ? chunk_width(N, V, sizeof(Z), kChunkBytesInPlace) : chunk_width(N, V);
  const mx::Dtype zdt = in_place ? dt : mx::float32;
  auto z = scratch(enc, {N, vmax}, zdt);
  // P in T: for 16-bit T and float Z half the float32 chunk's bytes more (64 MiB within
  // the budget).
  auto P = in_place ? z : scratch(enc, {N, vmax}, dt);
  auto state = scratch(enc, {4, N}, mx::float32); // m, s, sp, q
  auto& acc = out[2];
  float* ap = d > 0 ? gpu_ptr<float>(acc) : nullptr;
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  float* st = gpu_ptr<float>(state);
  const Z* zp = d > 0 ? gpu_ptr<Z>(z) : nullptr;
  T* pp = d > 0 ? gpu_ptr<T>(P) : nullptr;
  for (int v0 = 0; v0 < V; v0 += vmax) {
    const int vc = std::min(vmax, V - v0);
    const size_t off = size_t(v0) * d; // of W's rows v0 :
    const int first = v0 == 0, last = v0 + vc >= V;
    if (d > 0) {
      // In place: after the previous acc GEMM, which read P = Z.
      track(enc, {in_place ? &acc : nullptr}, {});
      gemm(enc, gemm_of(false, true, N, vc, d, dt, zdt, off), 1.0f, h, w, 0.0f, z);
    }
    // Z registered as written: the next Z GEMM into it waits for this read. acc: this
    // waits for the previous acc GEMM (its read of P, its write of acc).
    track(enc, {&y, bias}, {&z, &P, &acc, &state, &out[0], &out[1]});
    run(enc, reinterpret_cast<const void*>(&lce_chunk_softmax<T, Z>), dim3(N), zp, bp,
        gpu_ptr<int32_t>(y), N, vc, v0, V, d, first, last, st, gpu_ptr<float>(out[0]),
        gpu_ptr<float>(out[1]), pp, ap);
    if (d > 0) { // acc (+)= P · W[v0 : v0 + vc]
      gemm(enc, gemm_of(false, false, N, d, vc, dt, mx::float32, off), 1.0f, P, w,
           first ? 0.0f : 1.0f, acc);
    }
  }
  const long long total = (long long)N * d;
  if (total > 0) {
    track(enc, {&y, &w, &state}, {&acc});
    run(enc, reinterpret_cast<const void*>(&lce_dh_unit<T>), grid_for(total), ap, st,
        gpu_ptr<int32_t>(y), gpu_ptr<T>(w), N, d, V, total);
  }
}

template <typename T>
void forward_with_grad(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
                       std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  with_logit_type<T>(in[0].dtype(), [&](auto z) {
    forward_with_grad_as<T, typename decltype(z)::type>(p, in, out, enc);
  });
}

// Z is the chunk's logit type (float, or T itself: G then written over Z in place).
template <typename T, typename Z>
void backward_as(const LinearCrossEntropyVJP& p, const std::vector<mx::array>& in,
                 std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  constexpr bool f32 = std::is_same_v<T, float>;
  constexpr bool in_place = std::is_same_v<T, Z>;
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
  const int vmax = chunk_width(N, V, sizeof(Z));
  const mx::Dtype zdt = in_place ? dt : mx::float32;
  auto z = scratch(enc, {N, vmax}, zdt);
  // G in T; it overwrites Z in place when they share a type.
  auto G = in_place ? z : scratch(enc, {N, vmax}, dt);
  std::optional<mx::array> dh_acc, ones;
  if (dh) {
    dh_acc = f32 ? *dh : scratch(enc, {N, d}, mx::float32);
  }
  if (db) {
    ones = scratch(enc, {1, N}, dt);
    fill<T>(enc, *ones, 1.0f);
  }
  const mx::array* acc = dh_acc ? &*dh_acc : nullptr;
  const Z* zp = d > 0 ? gpu_ptr<Z>(z) : nullptr;
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  for (int v0 = 0; v0 < V; v0 += vmax) {
    const int vc = std::min(vmax, V - v0);
    const size_t off = size_t(v0) * d; // of W's (and dW's) rows v0 :
    if (d > 0) {
      // After the previous chunk's gradient GEMMs, which read G (= Z in place).
      track(enc, {acc, dw, db}, {});
      gemm(enc, gemm_of(false, true, N, vc, d, dt, zdt, off), 1.0f, h, w, 0.0f, z);
    }
    track(enc, {&y, &lse, &g, bias, acc, dw, db}, {&z, &G});
    const unsigned col_blocks = unsigned((vc + kGradCols - 1) / kGradCols);
    run(enc, reinterpret_cast<const void*>(&lce_chunk_grad<T, Z>), dim3(N, col_blocks), zp,
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

template <typename T>
void backward(const LinearCrossEntropyVJP& p, const std::vector<mx::array>& in,
              std::vector<mx::array>& out, mx::cu::CommandEncoder& enc) {
  with_logit_type<T>(in[0].dtype(), [&](auto z) {
    backward_as<T, typename decltype(z)::type>(p, in, out, enc);
  });
}

} // namespace

void LinearCrossEntropy::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cuda::HostTimer timer("linear_cross_entropy");
  auto& enc = mx::cu::get_command_encoder(stream());
  if (q_.quantized) {
    throw std::logic_error("[linear_cross_entropy] the GPU kernels take a dense head.");
  }
  const bool fa = grad_in_forward_;
  switch (inputs[0].dtype()) {
    case mx::float32:
      return fa ? forward_with_grad<float>(*this, inputs, outputs, enc)
                : forward<float>(*this, inputs, outputs, enc);
    case mx::float16:
      return fa ? forward_with_grad<__half>(*this, inputs, outputs, enc)
                : forward<__half>(*this, inputs, outputs, enc);
    case mx::bfloat16:
      return fa ? forward_with_grad<__nv_bfloat16>(*this, inputs, outputs, enc)
                : forward<__nv_bfloat16>(*this, inputs, outputs, enc);
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

void LinearCrossEntropyVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cuda::HostTimer timer("linear_cross_entropy_vjp");
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
