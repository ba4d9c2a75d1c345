// CUDA kernels of the dora family. The layer runs as DoRALinear / DoRALinearVJP (at the end
// of this file: W A with the norms in its epilogue (lowrank.cuh), then LoRA's GEMMs
// (lora.cuh) or, on a quantized W, QLoRA's with m / n folded into W's blocks (qlora.cuh));
// the cases those do not take compose these kernels with the LoRA / QLoRA primitive
// (ops/dora.cpp compose_gpu). Neither makes an out x in temporary.
// - DoRARowSqNorm: c_i = ||W_i||^2, W dense or affine-quantized, one block per row.
// - DoRAInvNorm: 1 / n from the low-rank identity (ops/dora.h), G = Aᵀ A from partial
//   Gram matrices over blocks of A's rows, then one thread per output column.
// - DoRAScale: y = z * sv (+ bias), sv = m / n (float32, (out,)), elementwise over z.
// - DoRAScaleVJP, from one pass over dy and z (z (N, out), dy likewise):
//     dz = dy * sv     dsv_j = sum_i dy_ij z_ij     dbias_j = sum_i dy_ij
//   Each block sums a tile of rows x columns into one float32 partial row per row tile; a
//   second kernel adds the partial rows in a fixed order. No atomics, so the sums are the
//   same bits on every run.
// All maths in float32, each output rounded once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "backend/cuda/dtype.cuh"
#include "backend/cuda/gemm.cuh"
#include "common/quant.h"
#include "ops/dora.h"
#if defined(MLX_TUNER_DORA_FUSED_GPU)
#include "backend/cuda/lora.cuh"
#include "backend/cuda/lowrank.cuh"
#endif
#if defined(MLX_TUNER_QDORA_FUSED_GPU)
#include "backend/cuda/qlora.cuh"
#endif

namespace mlx_tuner {

namespace {

constexpr int kThreads = 256;

using cuda::aligned16;
using cuda::from_f;
using cuda::to_f;

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
    float v = to_f(row[j]);
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
    float w = to_f(sr[j / gs]) * float((v >> (bit & 7)) & ((1u << BITS) - 1)) +
        to_f(br[j / gs]);
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
  quant::dispatch_bits(bits, [&]<int BITS>() { launch_quant_bits<S, BITS>(enc, in, out, gs); });
}

// ---------------------------------------------------------------- DoRAScale

// Elements per 16-byte access; the kernels take VEC = 1 where a pointer or the row length
// does not allow it.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// One 32-bit word of a 16-byte vector as float32 values (one float or two halves, the
// lower address first), and back with round-to-nearest.
template <typename T>
__device__ void from_word(uint32_t w, float* f);
template <>
__device__ void from_word<float>(uint32_t w, float* f) {
  f[0] = __uint_as_float(w);
}
template <>
__device__ void from_word<__half>(uint32_t w, float* f) {
  float2 v = __half22float2(*reinterpret_cast<const __half2*>(&w));
  f[0] = v.x;
  f[1] = v.y;
}
template <>
__device__ void from_word<__nv_bfloat16>(uint32_t w, float* f) {
  float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  f[0] = v.x;
  f[1] = v.y;
}

template <typename T>
__device__ uint32_t to_word(const float* f);
template <>
__device__ uint32_t to_word<float>(const float* f) {
  return __float_as_uint(f[0]);
}
template <>
__device__ uint32_t to_word<__half>(const float* f) {
  __half2 h = __floats2half2_rn(f[0], f[1]);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ uint32_t to_word<__nv_bfloat16>(const float* f) {
  __nv_bfloat162 h = __floats2bfloat162_rn(f[0], f[1]);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// VEC adjacent elements: one 16-byte access (a uint4) when VEC > 1, which needs a 16-byte
// aligned pointer, else one T. Loading (Raw) and converting are apart so that a thread can
// issue several loads before it waits on the first. The vector intrinsics keep each access
// one 128-bit instruction: a plain uint4 store came out as four 4-byte ones where nvcc could
// not prove the alignment.
template <typename T, int VEC>
using Raw = std::conditional_t<VEC == 1, T, uint4>;

template <typename T, int VEC>
__device__ Raw<T, VEC> load_raw(const T* __restrict__ p) {
  static_assert(VEC == 1 || VEC * sizeof(T) == 16);
  if constexpr (VEC == 1) {
    return *p;
  } else {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
}

template <typename T, int VEC>
__device__ void unpack(const Raw<T, VEC>& r, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    f[0] = to_f(r);
  } else {
    constexpr int P = VEC / 4; // values per word
    from_word<T>(r.x, f);
    from_word<T>(r.y, f + P);
    from_word<T>(r.z, f + 2 * P);
    from_word<T>(r.w, f + 3 * P);
  }
}

template <typename T, int VEC>
__device__ void store(T* __restrict__ p, const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_f<T>(f[0]);
  } else {
    constexpr int P = VEC / 4;
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(to_word<T>(f), to_word<T>(f + P),
                                                   to_word<T>(f + 2 * P), to_word<T>(f + 3 * P)));
  }
}

// y = z * sv (+ bias) over the flat (rows * cols) array, VEC elements a step (a step may
// cross a row end: columns are tracked one by one), then the last total % VEC one by one.
// Also dz = dy * sv when only dz is wanted (bias null).
template <typename T, int VEC>
__global__ void scale_cols(const T* __restrict__ z, const float* __restrict__ sv,
                           const T* __restrict__ bias, T* __restrict__ y, long long total,
                           int cols) {
  long long stride = (long long)gridDim.x * blockDim.x;
  long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  long long steps = total / VEC;
  for (long long v = tid; v < steps; v += stride) {
    long long e = v * VEC;
    int c = static_cast<int>(e % cols);
    float f[VEC];
    unpack<T, VEC>(load_raw<T, VEC>(z + e), f);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      // No fused multiply-add: the product rounded first, as MLX's z * sv + b rounds it,
      // so that the output matches the reference bit for bit in float32.
      const float zs = __fmul_rn(f[k], sv[c]);
      f[k] = bias ? __fadd_rn(zs, to_f(bias[c])) : zs;
      c = c + 1 == cols ? 0 : c + 1;
    }
    store<T, VEC>(y + e, f);
  }
  for (long long e = steps * VEC + tid; e < total; e += stride) {
    int c = static_cast<int>(e % cols);
    float f = __fmul_rn(to_f(z[e]), sv[c]);
    y[e] = from_f<T>(bias ? __fadd_rn(f, to_f(bias[c])) : f);
  }
}

// The backward's tile: kTX threads across columns (VEC adjacent columns each, one warp per
// tile row: coalesced) x kTY threads across rows.
constexpr int kTX = 32, kTY = 8;
// Rows of a tile at least this many, and row tiles only as many as fill the GPU with about
// kTargetBlocks blocks in all: the float32 partial rows stay small next to dy.
constexpr int kMinTileRows = 64, kTargetBlocks = 1024;

// One row's share of a thread: the sums, and dz = dy * sv when dz is not null.
template <typename T, int VEC, bool WITH_Z>
__device__ void grad_row(const Raw<T, VEC>& g_raw, const Raw<T, VEC>& z_raw,
                         const float (&s)[VEC], T* __restrict__ dz, float (&acc_sv)[VEC],
                         float (&acc_b)[VEC]) {
  float g[VEC];
  unpack<T, VEC>(g_raw, g);
  if constexpr (WITH_Z) {
    float zz[VEC];
    unpack<T, VEC>(z_raw, zz);
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc_sv[k] += g[k] * zz[k];
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc_b[k] += g[k];
  if (dz) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) g[k] *= s[k];
    store<T, VEC>(dz, g);
  }
}

// One block: rows [r0, r1) x columns [c_base, c_base + kTX * VEC). Writes dz (when dz is
// not null) and the tile's column sums of dy * z (WITH_Z: part_sv, z is read only then) and
// of dy (part_b, when not null) into row blockIdx.y of the (row_tiles x cols) partials.
// VEC > 1 needs cols % VEC == 0 and 16-byte aligned dy, z, dz.
// With den (DoRALinearVJP: sv = m, den = n), the scale is sv / den.
template <typename T, int VEC, bool WITH_Z>
__global__ void scale_cols_vjp(const T* __restrict__ dy, const float* __restrict__ sv,
                               const float* __restrict__ den, const T* __restrict__ z,
                               T* __restrict__ dz, float* __restrict__ part_sv,
                               float* __restrict__ part_b, int rows, int cols,
                               int rows_per_tile) {
  __shared__ float red[2][kTY][kTX * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const long long c_base = (long long)blockIdx.x * (kTX * VEC);
  const long long c0 = c_base + tx * VEC; // cols % VEC == 0: all VEC columns or none
  const long long r0 = (long long)blockIdx.y * rows_per_tile;
  const long long r1 = min((long long)rows, r0 + rows_per_tile);
  float acc_sv[VEC], acc_b[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc_sv[k] = acc_b[k] = 0.f;
  if (c0 < cols) {
    float s[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = den ? sv[c0 + k] / den[c0 + k] : sv[c0 + k];
    // Two rows a step, all their loads issued before the first use. A lone last row is
    // loaded twice (a valid address, no branch around the loads) and counted once.
    for (long long r = r0 + ty; r < r1; r += 2 * kTY) {
      const bool two = r + kTY < r1;
      const size_t off0 = (size_t)r * cols + c0;
      const size_t off1 = two ? off0 + (size_t)kTY * cols : off0;
      Raw<T, VEC> g0 = load_raw<T, VEC>(dy + off0), g1 = load_raw<T, VEC>(dy + off1);
      Raw<T, VEC> z0{}, z1{};
      if constexpr (WITH_Z) {
        z0 = load_raw<T, VEC>(z + off0);
        z1 = load_raw<T, VEC>(z + off1);
      }
      grad_row<T, VEC, WITH_Z>(g0, z0, s, dz ? dz + off0 : nullptr, acc_sv, acc_b);
      if (two) {
        grad_row<T, VEC, WITH_Z>(g1, z1, s, dz ? dz + off1 : nullptr, acc_sv, acc_b);
      }
    }
  }
  // Sum the kTY thread rows of each column, always in the same order.
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    red[0][ty][tx * VEC + k] = acc_sv[k];
    red[1][ty][tx * VEC + k] = acc_b[k];
  }
  __syncthreads();
  for (int c = ty * kTX + tx; c < kTX * VEC && c_base + c < cols; c += kTX * kTY) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int t = 0; t < kTY; ++t) {
      a += red[0][t][c];
      b += red[1][t][c];
    }
    size_t o = (size_t)blockIdx.y * cols + c_base + c;
    if (WITH_Z) part_sv[o] = a;
    if (part_b) part_b[o] = b;
  }
}

// dsv_j / dbias_j = the row_tiles partial rows added in order (zeros when row_tiles is 0,
// the empty batch). Null outputs are skipped.
template <typename T>
__global__ void sum_partials(const float* __restrict__ part_sv, const float* __restrict__ part_b,
                             float* __restrict__ dsv, T* __restrict__ dbias, int row_tiles,
                             int cols) {
  long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  if (dsv) {
    float a = 0.f;
    for (int t = 0; t < row_tiles; ++t) a += part_sv[(size_t)t * cols + c];
    dsv[c] = a;
  }
  if (dbias) {
    float b = 0.f;
    for (int t = 0; t < row_tiles; ++t) b += part_b[(size_t)t * cols + c];
    dbias[c] = from_f<T>(b);
  }
}

// W's element (j, k) for dm_finish's recompute: dense, or decoded from affine codes and
// rounded to T as the forward's dequantized blocks are.
template <typename T>
struct DenseW {
  const T* w;
  int in;
  __device__ float operator()(int j, int k) const {
    return to_f(w[(size_t)j * in + k]);
  }
};
template <typename T>
struct QuantW {
  const uint8_t* q;
  const T *scales, *biases;
  int in, gs, bits;
  __device__ float operator()(int j, int k) const {
    const size_t bit = ((size_t)j * in + k) * bits; // rows are whole bytes (in % 32 == 0)
    unsigned v = q[bit >> 3];
    if ((bit & 7) + bits > 8) v |= unsigned(q[(bit >> 3) + 1]) << 8;
    const size_t g = (size_t)j * (in / gs) + k / gs;
    const float w = fmaf(to_f(scales[g]), float((v >> (bit & 7)) & ((1u << bits) - 1)),
                         to_f(biases[g]));
    return to_f(from_f<T>(w));
  }
};

// DoRALinearVJP's dm from y = rs u (rs = m / n): dm_j = sum_rows dy_j u_j / n_j
// = (the row_tiles partial rows of dy * y, added in order) / m_j. Where y lost u (m_j = 0,
// or rs under lo: the CPU kernel's recompute_column), u_j = x W_j^T + s xa B_j is recomputed
// from the inputs instead, by the whole block (rare: this is the correctness path, one
// column at a time). The block's columns are taken one by one, so the result does not
// depend on the order in which they were found.
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    dm_finish(const float* __restrict__ part, int row_tiles, const float* __restrict__ m,
              const float* __restrict__ n, float lo, const T* __restrict__ x, W w,
              const T* __restrict__ xa, const float* __restrict__ b,
              const T* __restrict__ dy, float* __restrict__ dm, int rows, int in, int r,
              int cols, float s) {
  __shared__ int lost[kThreads];
  __shared__ int nlost;
  if (threadIdx.x == 0) nlost = 0;
  __syncthreads();
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c < cols) {
    const float rs = m[c] / n[c];
    if (isfinite(rs) && fabsf(rs) >= lo) {
      float a = 0.f;
      for (int t = 0; t < row_tiles; ++t) a += part[(size_t)t * cols + c];
      dm[c] = a / m[c];
    } else {
      lost[atomicAdd(&nlost, 1)] = c;
    }
  }
  __syncthreads();
  const int count = nlost;
  for (int q = 0; q < count; ++q) {
    const int j = lost[q];
    float t = 0.f;
    for (int row = threadIdx.x; row < rows; row += kThreads) {
      const T* xr = x + (size_t)row * in;
      float u = 0.f;
      for (int k = 0; k < in; ++k) u += to_f(xr[k]) * w(j, k);
      for (int k = 0; k < r; ++k) u += s * to_f(xa[(size_t)row * r + k]) * b[(size_t)k * cols + j];
      t += to_f(dy[(size_t)row * cols + j]) * u;
    }
    t = block_sum(t);
    if (threadIdx.x == 0) dm[j] = t / n[j];
    __syncthreads(); // block_sum's shared partials are reused by the next column
  }
}

// rs[i] = m[i] / n[i]: the backward's row scale (the forward writes n).
__global__ void ratio(const float* m, const float* n, float* rs, int count) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < count) rs[i] = m[i] / n[i];
}

// ---------------------------------------------------------------- DoRAInvNorm
// Both kernels are a few microseconds of arithmetic; what they must avoid is latency:
// chains of dependent global loads, and per-thread arrays indexed by a run-time rank
// (those live in local memory). So A's rows are staged in shared memory by one coalesced
// pass, the partial sums use independent accumulators, and inv_norm's loops run over a
// compile-time rank bound R (entries past r are zeros).
constexpr int kGramRows = 128;      // rows of A per partial Gram matrix
constexpr int kInvNormThreads = 128; // columns per inv_norm block (4096 columns: 32 blocks)

// part[blk][k r + l] = sum over A's rows j in block blk of A[j,k] A[j,l]
__global__ void __launch_bounds__(kThreads) gram_partial(const float* a, float* part, int rows,
                                                         int r) {
  __shared__ float tile[kGramRows * kInvNormMaxRank];
  const int j0 = blockIdx.x * kGramRows, nj = min(rows - j0, kGramRows);
#pragma unroll 4
  for (int e = threadIdx.x; e < nj * r; e += kThreads) tile[e] = a[(size_t)j0 * r + e];
  __syncthreads();
  for (int e = threadIdx.x; e < r * r; e += kThreads) {
    const int k = e / r, l = e % r;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int j = 0;
    for (; j + 4 <= nj; j += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] += tile[(j + u) * r + k] * tile[(j + u) * r + l];
    }
    for (; j < nj; ++j) acc[0] += tile[j * r + k] * tile[j * r + l];
    part[(size_t)blockIdx.x * r * r + e] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
}

// inv_n[i] = 1 / sqrt(max(c_i + 2 s B[:,i].P[i,:] + s^2 B[:,i]ᵀ G B[:,i], 0)), one thread
// per column; every block first sums the partial Gram matrices into shared memory, G
// padded to R x R with zeros.
// With m (DoRALinear's path): n[i] = the norm and inv_n[i] = m_i / n_i (rs) instead.
template <typename T, int R>
__global__ void __launch_bounds__(kInvNormThreads)
    inv_norm(const T* p, const float* b, const float* part, int nparts, const float* c,
             float* inv_n, int out, int r, float s, bool p_t, const float* m, float* n) {
  __shared__ __align__(16) float g[R * R];
  for (int e = threadIdx.x; e < R * R; e += kInvNormThreads) {
    const int k = e / R, l = e % R;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (k < r && l < r) {
      const float* src = part + k * r + l;
      const size_t step = (size_t)r * r;
      int q = 0;
      for (; q + 4 <= nparts; q += 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) acc[u] += src[(q + u) * step];
      }
      for (; q < nparts; ++q) acc[0] += src[q * step];
    }
    g[e] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  __syncthreads();
  const int i = blockIdx.x * kInvNormThreads + threadIdx.x;
  if (i >= out) return;
  float bc[R];
  float cross = 0.f;
#pragma unroll
  for (int k = 0; k < R; ++k) {
    bc[k] = 0.f;
    if (k < r) {
      bc[k] = b[(size_t)k * out + i];
      cross += bc[k] * to_f(p_t ? p[(size_t)k * out + i] : p[(size_t)i * r + k]);
    }
  }
  float quad = 0.f;
#pragma unroll
  for (int k = 0; k < R; ++k) {
    float t = 0.f;
#pragma unroll
    for (int l = 0; l < R; ++l) t += g[k * R + l] * bc[l];
    quad += bc[k] * t;
  }
  const float n2 = fmaxf(c[i] + 2.f * s * cross + s * s * quad, 0.f);
  if (m) { // rs = m / n as the CPU kernel and the backward's scale_cols_vjp divide it
    n[i] = sqrtf(n2);
    inv_n[i] = m[i] / n[i];
  } else {
    inv_n[i] = 1.f / sqrtf(n2);
  }
}

template <typename F>
void by_type(mx::Dtype t, F&& f) {
  switch (t) {
    case mx::float32: return f.template operator()<float>();
    case mx::float16: return f.template operator()<__half>();
    case mx::bfloat16: return f.template operator()<__nv_bfloat16>();
    default: throw std::invalid_argument("[dora_scale] float32, float16 or bfloat16 expected");
  }
}

long long ceil_div(long long a, long long b) {
  return (a + b - 1) / b;
}

// out = in * sv (+ bias), elementwise (the forward, and dz alone).
template <typename T>
void launch_scale(mx::cu::CommandEncoder& enc, const mx::array& in, const mx::array& sv,
                  const mx::array* bias, mx::array& out) {
  long long total = in.size();
  int cols = in.shape(1);
  if (total == 0) return;
  const T* ip = gpu_ptr<T>(in);
  const float* sp = gpu_ptr<float>(sv);
  const T* bp = bias ? gpu_ptr<T>(*bias) : nullptr;
  T* op = gpu_ptr<T>(out);
  bool vec = aligned16(ip) && aligned16(op);
  constexpr int V = kVec<T>;
  long long work = vec ? std::max(total / V, 1LL) : total;
  dim3 grid(static_cast<unsigned>(std::min(ceil_div(work, kThreads), 4096LL)));
  auto kernel = vec ? reinterpret_cast<const void*>(&scale_cols<T, V>)
                    : reinterpret_cast<const void*>(&scale_cols<T, 1>);
  cuda::launch(enc, kernel, grid, dim3(kThreads), 0u, ip, sp, bp, op, total, cols);
}

// The tiles of scale_cols_vjp: dz = dy * sv (or sv / den) where dz is given, and the
// (row_tiles x cols) float32 partial column sums of dy * z (with_z) and of dy (with_b).
struct Partials {
  std::optional<mx::array> sv, b;
  int row_tiles = 0; // 0 for an empty batch: the finish kernels then write zeros
};

template <typename T>
Partials launch_scale_vjp_tiles(mx::cu::CommandEncoder& enc, const mx::array& dy,
                                const mx::array& sv, const mx::array* den, const mx::array* z,
                                mx::array* dz, bool with_b) {
  int rows = dy.shape(0), cols = dy.shape(1);
  Partials part;
  if (rows == 0 || cols == 0) return part;
  const T* gp = gpu_ptr<T>(dy);
  const T* zp = z ? gpu_ptr<T>(*z) : nullptr;
  T* dzp = dz ? gpu_ptr<T>(*dz) : nullptr;
  constexpr int V = kVec<T>;
  bool vec = cols % V == 0 && aligned16(gp) && (!zp || aligned16(zp)) &&
      (!dzp || aligned16(dzp));
  int tile_cols = kTX * (vec ? V : 1);
  long long col_tiles = ceil_div(cols, tile_cols);
  int row_tiles = int(std::min(ceil_div(rows, kMinTileRows),
                               std::max(1LL, ceil_div(kTargetBlocks, col_tiles))));
  int rows_per_tile = int(ceil_div(rows, row_tiles));
  row_tiles = int(ceil_div(rows, rows_per_tile)); // no empty tile
  part.row_tiles = row_tiles;
  float* psv = nullptr;
  float* pb = nullptr;
  if (z) {
    part.sv = cuda::scratch(enc, {row_tiles, cols}, mx::float32);
    psv = gpu_ptr<float>(*part.sv);
  }
  if (with_b) {
    part.b = cuda::scratch(enc, {row_tiles, cols}, mx::float32);
    pb = gpu_ptr<float>(*part.b);
  }
  cuda::reads_writes(enc, {&dy, &sv, den, z},
                     {dz, part.sv ? &*part.sv : nullptr, part.b ? &*part.b : nullptr});
  // row_tiles <= kTargetBlocks keeps gridDim.y far below its 65535 limit.
  dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  const void* kernel = nullptr;
  if (vec) {
    kernel = z ? reinterpret_cast<const void*>(&scale_cols_vjp<T, V, true>)
               : reinterpret_cast<const void*>(&scale_cols_vjp<T, V, false>);
  } else {
    kernel = z ? reinterpret_cast<const void*>(&scale_cols_vjp<T, 1, true>)
               : reinterpret_cast<const void*>(&scale_cols_vjp<T, 1, false>);
  }
  const float* sp = gpu_ptr<float>(sv);
  const float* dp = den ? gpu_ptr<float>(*den) : nullptr;
  cuda::launch(enc, kernel, grid, dim3(kTX, kTY), 0u, gp, sp, dp, zp, dzp, psv, pb, rows, cols,
               rows_per_tile);
  return part;
}

template <typename T>
void launch_scale_vjp(mx::cu::CommandEncoder& enc, const mx::array& dy, const mx::array& sv,
                      const mx::array* z, mx::array* dz, mx::array* dsv, mx::array* dbias) {
  int cols = dy.shape(1);
  if (cols == 0) return; // every output is empty
  auto part = launch_scale_vjp_tiles<T>(enc, dy, sv, nullptr, dsv ? z : nullptr, dz, dbias);
  cuda::reads_writes(enc, {part.sv ? &*part.sv : nullptr, part.b ? &*part.b : nullptr},
                     {dsv, dbias});
  const float* psv = part.sv ? gpu_ptr<float>(*part.sv) : nullptr;
  const float* pb = part.b ? gpu_ptr<float>(*part.b) : nullptr;
  float* dsvp = dsv ? gpu_ptr<float>(*dsv) : nullptr;
  T* dbp = dbias ? gpu_ptr<T>(*dbias) : nullptr;
  int row_tiles = part.row_tiles;
  cuda::launch(enc, reinterpret_cast<const void*>(&sum_partials<T>),
               dim3(unsigned(ceil_div(cols, kThreads))), dim3(kThreads), 0u, psv, pb, dsvp, dbp,
               row_tiles, cols);
}

// G = A^T A by partial Gram matrices, then one thread per column: out = 1 / n, or with m,
// out = m / n and n_out = n.
void launch_norm(mx::cu::CommandEncoder& enc, const mx::array& p, const mx::array& b,
                 const mx::array& a, const mx::array& c, const mx::array* m, float scale,
                 bool p_transposed, mx::array& out, mx::array* n_out) {
  // launch() passes its arguments by address: mutable locals of the kernels' types
  int rows = a.shape(0), r = a.shape(1), n_cols = out.size();
  if (n_cols == 0) return;
  int nparts = int(ceil_div(rows, kGramRows));
  auto part = cuda::scratch(enc, {std::max(nparts, 1), std::max(r * r, 1)}, mx::float32);
  float* pp = gpu_ptr<float>(part);
  if (nparts > 0 && r > 0) {
    cuda::reads_writes(enc, {&a}, {&part});
    cuda::launch(enc, reinterpret_cast<const void*>(&gram_partial), dim3(unsigned(nparts)),
                 dim3(kThreads), 0u, static_cast<const float*>(gpu_ptr<float>(a)), pp, rows, r);
  }
  cuda::reads_writes(enc, {&p, &b, &part, &c, m}, {&out, n_out});
  const float* cp = gpu_ptr<float>(c);
  const float* bp = gpu_ptr<float>(b);
  const float* partp = pp;
  const float* mp = m ? gpu_ptr<float>(*m) : nullptr;
  float* yp = gpu_ptr<float>(out);
  float* np = n_out ? gpu_ptr<float>(*n_out) : nullptr;
  float s = scale;
  bool pt = p_transposed;
  dim3 grid(unsigned(ceil_div(n_cols, kInvNormThreads)));
  by_type(p.dtype(), [&]<typename T>() {
    const void* k = r <= 16 ? reinterpret_cast<const void*>(&inv_norm<T, 16>)
                            : reinterpret_cast<const void*>(&inv_norm<T, kInvNormMaxRank>);
    cuda::launch(enc, k, grid, dim3(kInvNormThreads), 0u, static_cast<const T*>(gpu_ptr<T>(p)),
                 bp, partp, nparts, cp, yp, n_cols, r, s, pt, mp, np);
  });
}

} // namespace

void DoRAInvNorm::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  cuda::HostTimer timer("dora_inv_norm");
  auto& enc = mx::cu::get_command_encoder(stream());
  cuda::alloc_output(out, enc);
  if (bits_ == 0) {
    launch_norm(enc, in[0], in[1], in[2], in[3], nullptr, scale_, p_transposed_, out, nullptr);
    return;
  }
#if defined(MLX_TUNER_DORA_FUSED_GPU)
  // P = W A from the codes (lowrank.cu), A packed in the scales' dtype as for project.
  const auto &wq = in[0], &scales = in[1], &biases = in[2], &b = in[3], &a = in[4], &c = in[5];
  const int out_rows = wq.shape(0), k = a.shape(0), r = a.shape(1);
  if (r < 1 || k < 1) { // dora_inv_norm_quant takes neither
    throw std::logic_error("[dora_inv_norm_quant] an empty rank or input dimension");
  }
  auto p = cuda::scratch(enc, {out_rows, r}, mx::float32);
  if (out_rows > 0) {
    auto pk = cuda::lowrank_pack(enc, scales.dtype(), {{a, r, 1, k, r, true}});
    cuda::lowrank_project_quant(enc, wq, scales, biases, bits_, group_size_, pk[0], r, &p);
  }
  launch_norm(enc, p, b, a, c, nullptr, scale_, false, out, nullptr);
#else
  throw std::logic_error("[dora_inv_norm_quant] this build has no CUDA kernel for it");
#endif
}

void DoRAScale::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  cuda::HostTimer timer("dora_scale");
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& a : in) enc.set_input_array(a);
  cuda::alloc_output(out, enc);
  const mx::array* bias = has_bias_ ? &in[2] : nullptr;
  by_type(out.dtype(), [&]<typename T>() { launch_scale<T>(enc, in[0], in[1], bias, out); });
}

void DoRAScaleVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  cuda::HostTimer timer("dora_scale_vjp");
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& o : outs) cuda::alloc_output(o, enc);
  int k = 0;
  mx::array* dz = want_.z ? &outs[k++] : nullptr;
  mx::array* dsv = want_.sv ? &outs[k++] : nullptr;
  mx::array* dbias = want_.bias ? &outs[k++] : nullptr;
  const mx::array& dy = in[0];
  const mx::array& sv = in[1];
  const mx::array* z = want_.sv ? &in[2] : nullptr;
  by_type(dy.dtype(), [&]<typename T>() {
    if (!dsv && !dbias) { // dz alone: the forward's elementwise kernel
      cuda::reads_writes(enc, {&dy, &sv}, {dz});
      launch_scale<T>(enc, dy, sv, nullptr, *dz);
    } else {
      launch_scale_vjp<T>(enc, dy, sv, z, dz, dsv, dbias);
    }
  });
}

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

#if defined(MLX_TUNER_DORA_FUSED_GPU)
// DoRA as two primitives (ops/dora.cpp): one node each way in MLX's graph where the
// composition of the other backends costs about ten (each op's host time adds up). Dense W:
// LoRA's forward and backward (lora.cuh). Quantized W (with the qlora family): QLoRA's
// (qlora.cuh), m / n folded into W's dequantized blocks and B's packed copy.

namespace {

// The forward's inputs, which the backward's start with (ops/dora.h DoRAInputs).
struct DoRAArgs {
  DoRAInputs idx;
  const mx::array &x, &w, &a, &b, &m;
  const mx::array* xd; // x_dropped, or null
  const mx::array *scales, *biases; // a quantized W's, in x's dtype (ops/dora.cpp); or null
  DoRAArgs(const DoRAConfig& cfg, const std::vector<mx::array>& in)
      : idx(cfg), x(in[idx.x]), w(in[idx.w]), a(in[idx.a]), b(in[idx.b]), m(in[idx.m]),
        xd(cfg.has_xd ? &in[idx.xd] : nullptr),
        scales(cfg.quantized ? &in[idx.scales] : nullptr),
        biases(cfg.quantized ? &in[idx.biases] : nullptr) {
    if (scales && (scales->dtype() != x.dtype() || biases->dtype() != x.dtype())) {
      throw std::logic_error("[dora_linear] the CUDA primitives take the scales in x's dtype");
    }
  }
};

} // namespace

void DoRALinear::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  cuda::HostTimer timer("dora_linear");
  auto& enc = mx::cu::get_command_encoder(stream());
  const DoRAArgs args(cfg_, in);
  const auto &x = args.x, &w = args.w, &a = args.a, &b = args.b, &m = args.m;
  const mx::array* xd = args.xd;
  auto& y = outs[0];
  auto& xa = outs[1];
  auto& nrm = outs[2];
  for (auto& o : outs) cuda::alloc_output(o, enc);
  int rows = x.shape(0), k = x.shape(1), out = m.shape(0), r = a.shape(1);
  if (out == 0) return;
  auto T = x.dtype();
  float s = cfg_.scale;
  std::optional<mx::array> c_own; // c = ||W_i||^2 when the layer did not cache it
  if (!cfg_.has_c) {
    c_own = cuda::scratch(enc, {out}, mx::float32);
    if (cfg_.quantized) {
      std::vector<mx::array> wsb = {w, *args.scales, *args.biases};
      cuda::reads_writes(enc, {&wsb[0], &wsb[1], &wsb[2]}, {&*c_own});
      by_type(wsb[1].dtype(), [&]<typename S>() {
        launch_quant<S>(enc, wsb, *c_own, cfg_.group_size, cfg_.bits);
      });
    } else {
      cuda::reads_writes(enc, {&w}, {&*c_own});
      by_type(T, [&]<typename U>() { launch_dense<U>(enc, w, *c_own); });
    }
  }
  const mx::array& c = cfg_.has_c ? in[args.idx.c] : *c_own;
  auto rs = cuda::scratch(enc, {out}, mx::float32); // m / n
  if (cfg_.quantized) {
#if defined(MLX_TUNER_QDORA_FUSED_GPU)
    // n and m / n in the epilogue of W A from the codes (A packed in T), then QLoRA's forward
    // with W's rows and B's columns scaled by m / n (ops/dora.cpp sends only what
    // qlora_own_fits takes).
    const cuda::QuantWeight qw{w, *args.scales, *args.biases, cfg_.bits, cfg_.group_size};
    auto pk = cuda::lowrank_pack(enc, T, {{a, r, 1, k, r, true}});
    const cuda::ProjectNorm norm{b, c, m, nrm, rs, s};
    cuda::lowrank_project_quant(enc, w, qw.scales, qw.biases, qw.bits, qw.group_size, pk[0], r,
                                nullptr, &norm);
    if (rows == 0) return;
    // The projected input (x_d, else x) is read by 16-byte vectors: an aligned copy of a
    // view that starts elsewhere, as m / n needs the rank-r kernels' path.
    if (xd) {
      auto xda = cuda::aligned16_copy(enc, *xd);
      cuda::qlora_forward(enc, x, &xda, qw, a, b, nullptr, s, y, xa, &rs);
    } else {
      cuda::qlora_forward(enc, cuda::aligned16_copy(enc, x), nullptr, qw, a, b, nullptr, s, y,
                          xa, &rs);
    }
    return;
#else
    throw std::logic_error("[dora_linear] the quantized GPU path composes in this build");
#endif
  }
  const mx::array& xp = xd ? *xd : x;
  if (cuda::lowrank_fits(r, T, {k, out}, {&w, &xp}) &&
      cuda::lora_gemm_fits(enc, T, k, out, {&x, &w, &y})) {
    // Hopper: A packed once for W A (whose epilogue makes n and m / n) and for LoRA's GEMM,
    // whose epilogue applies m / n (no pass over y).
    auto pk = cuda::lora_gemm_pack(enc, T, a, b, s);
    cuda::lowrank_project_norm(enc, w, pk[0], r, {b, c, m, nrm, rs, s});
    if (rows == 0) return;
    cuda::lora_gemm_forward(enc, x, w, xd, pk, nullptr, &rs, y, xa);
    return;
  }
  // Elsewhere: P by cuBLASLt, z = x W^T + s xa B by LoRA's forward, then one scale pass.
  auto p = cuda::scratch(enc, {out, r}, mx::float32); // P = W A
  auto a_t = cuda::as_dtype(enc, a, T);
  cuda::gemm(enc, {false, false, out, r, k, T, T, mx::float32}, 1.0f, w, a_t, 0.0f, p);
  launch_norm(enc, p, b, a, c, &m, s, false, rs, &nrm);
  if (rows == 0) return;
  auto z = cuda::scratch(enc, y.shape(), T);
  cuda::lora_forward(enc, x, w, a, b, nullptr, xd, s, z, xa);
  cuda::reads_writes(enc, {&z, &rs}, {&y});
  by_type(T, [&]<typename U>() { launch_scale<U>(enc, z, rs, nullptr, y); });
}

void DoRALinearVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  cuda::HostTimer timer("dora_linear_vjp");
  auto& enc = mx::cu::get_command_encoder(stream());
  const DoRAArgs args(cfg_, in);
  const auto &x = args.x, &w = args.w, &a = args.a, &b = args.b, &m = args.m;
  const mx::array* xd = args.xd;
  const int saved = args.idx.count; // then n, xa, y, dy
  const auto &nrm = in[saved], &xa = in[saved + 1], &y = in[saved + 2], &dy = in[saved + 3];
  for (auto& o : outs) cuda::alloc_output(o, enc);
  mx::array* out[kNumGrads] = {};
  for (int g = 0, k = 0; g < kNumGrads; ++g) {
    if (want_[g]) out[g] = &outs[k++];
  }
  int rows = x.shape(0), k = x.shape(1), cols = m.shape(0), r = a.shape(1);
  auto T = x.dtype();
  float s = cfg_.scale;
  bool need_g = out[kGradX] || out[kGradXd] || out[kGradA] || out[kGradB];
#if !defined(MLX_TUNER_QDORA_FUSED_GPU)
  if (cfg_.quantized) {
    throw std::logic_error("[dora_linear] the quantized GPU path composes in this build");
  }
#endif
  // Dense: g = dy * m / n, on which LoRA's backward then runs. Quantized: none (the scale
  // goes into QLoRA's backward).
  std::optional<mx::array> g;
  if (need_g && !cfg_.quantized) g = cuda::scratch(enc, {rows, cols}, T);
  by_type(T, [&]<typename U>() {
    // One pass over dy (and y, for dm): g, and the partial column sums of dy * y.
    if (!g && !out[kGradM]) return;
    auto part = launch_scale_vjp_tiles<U>(enc, dy, m, &nrm, out[kGradM] ? &y : nullptr,
                                          g ? &*g : nullptr, false);
    if (!out[kGradM] || cols == 0) return;
    cuda::reads_writes(enc, {part.sv ? &*part.sv : nullptr, &m, &nrm, &x, &w, args.scales,
                             args.biases, &xa, &b, &dy},
                       {out[kGradM]});
    const float* pp = part.sv ? gpu_ptr<float>(*part.sv) : nullptr;
    int row_tiles = part.row_tiles;
    float lo = T == mx::float16 ? 1.0f / 256 : 1e-30f; // the CPU kernel's recompute_column
    auto go = [&](auto wacc) {
      cuda::launch(enc, reinterpret_cast<const void*>(&dm_finish<U, decltype(wacc)>),
                   dim3(unsigned(ceil_div(cols, kThreads))), dim3(kThreads), 0u, pp, row_tiles,
                   static_cast<const float*>(gpu_ptr<float>(m)),
                   static_cast<const float*>(gpu_ptr<float>(nrm)), lo,
                   static_cast<const U*>(gpu_ptr<U>(x)), wacc,
                   static_cast<const U*>(gpu_ptr<U>(xa)),
                   static_cast<const float*>(gpu_ptr<float>(b)),
                   static_cast<const U*>(gpu_ptr<U>(dy)), gpu_ptr<float>(*out[kGradM]), rows, k,
                   r, cols, s);
    };
#if defined(MLX_TUNER_QDORA_FUSED_GPU)
    if (cfg_.quantized) {
      go(QuantW<U>{gpu_ptr<uint8_t>(w), gpu_ptr<U>(*args.scales), gpu_ptr<U>(*args.biases), k,
                   cfg_.group_size, cfg_.bits});
      return;
    }
#endif
    go(DenseW<U>{gpu_ptr<U>(w), k});
  });
  if (!need_g) return;
#if defined(MLX_TUNER_QDORA_FUSED_GPU)
  if (cfg_.quantized) { // dy's columns scaled by rs = m / n inside QLoRA's backward
    auto rs = cuda::scratch(enc, {cols}, mx::float32);
    cuda::reads_writes(enc, {&m, &nrm}, {&rs});
    if (cols > 0) {
      cuda::launch(enc, reinterpret_cast<const void*>(&ratio), dim3(unsigned(ceil_div(cols, kThreads))),
                   dim3(kThreads), 0u, static_cast<const float*>(gpu_ptr<float>(m)),
                   static_cast<const float*>(gpu_ptr<float>(nrm)), gpu_ptr<float>(rs), cols);
    }
    cuda::qlora_backward(enc, cuda::aligned16_copy(enc, xd ? *xd : x), xd != nullptr, xa,
                         {w, *args.scales, *args.biases, cfg_.bits, cfg_.group_size}, a, b,
                         cuda::aligned16_copy(enc, dy), s,
                         {out[kGradX], out[kGradXd], out[kGradA], out[kGradB]}, &rs);
    return;
  }
#endif
  cuda::lora_backward(enc, x, w, a, b, xa, *g, xd, s,
                      {out[kGradX], out[kGradXd], out[kGradA], out[kGradB]});
}
#endif

} // namespace mlx_tuner
