// CUDA kernels of QLoRA (maths in ops/qlora.h). The big products are the shared cuBLASLt
// GEMM (gemm.cuh) on blocks of W dequantized into a scratch buffer of dtype T (x's);
// W is never dequantized whole.
//
//   forward  y = s xa B (+ bias), written first (xa = x_d A, saved in T); then per
//            block of R rows of W:   dequant W[r0:r0+R, :] -> Wc;  y[:, r0:r0+R] += x Wcᵀ
//   dx       dx = g Aᵀ first (x_d is x; g = s dy Bᵀ); then per block of C columns of W:
//            dequant W[:, c0:c0+C] -> Wc;  dx[:, c0:c0+C] += dy Wc
// Every block writes its own columns of the output, so each element is rounded to T once
// after the rank-r term. Two buffers alternate: the dequant of block c+1 may run beside
// the GEMM of block c. MLX orders its graph's nodes only by the last writer of each
// buffer a node registers, never by readers, so the dequant of block c+1 also registers
// the output as read: it then waits for the GEMM of block c-1, the last reader of its
// buffer. The rank-r products (xa, g, dA, dB, dx_d) are cuBLASLt GEMMs as in lora.cu,
// captured as one graph node (GemmBatch). x, x_d, scales, biases, bias arrive in T; A and
// B in float32 (narrowed to T in one launch); xa is saved in T.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <type_traits>

#include <tuple>

#include "backend/cuda/dtype.cuh"
#include "backend/cuda/gemm.cuh"
#include "backend/cuda/lowrank.cuh"
#include "backend/cuda/qlora.cuh"
#include "common/quant.h"
#include "ops/qlora.h"

namespace mlx_tuner {

namespace {

using cuda::as_dtype;
using cuda::gemm;
using cuda::reads_writes;
using cuda::scratch;

// A dequantized block is at most a quarter of the dense weight and at most kBlockBytes.
constexpr size_t kBlockBytes = size_t(16) << 20;
constexpr int kThreads = 256;

using cuda::from_f;
using cuda::to_f;

// Two values of a 16-bit T in one word, the first in the low half (memory order).
template <typename T>
__device__ inline uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// The BITS bytes that pack 8 consecutive codes (csrc/common/quant.h: a run of 8 fills
// exactly BITS bytes, byte aligned), as the low bytes of a little-endian 64-bit word.
// ALIGNED: one 2-, 4- or 8-byte load for BITS 2, 4, 8 (the row base is aligned to it).
template <int BITS, bool ALIGNED>
__device__ inline uint64_t load_run8(const uint8_t* src) {
  if constexpr (ALIGNED && BITS == 2) {
    return *reinterpret_cast<const uint16_t*>(src);
  } else if constexpr (ALIGNED && BITS == 4) {
    return *reinterpret_cast<const uint32_t*>(src);
  } else if constexpr (ALIGNED && BITS == 8) {
    return *reinterpret_cast<const unsigned long long*>(src);
  } else {
    uint64_t v = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      v |= uint64_t(src[i]) << (8 * i);
    }
    return v;
  }
}

// out[i, j] = dequant(W)[i, c0 + j] for i < rows, j < cols, row stride cols. wq, scales and
// biases point at the block's first row. One thread dequantizes 8 consecutive elements
// and stores them with one 16-byte write (two for float32), so that a warp's loads and
// stores are contiguous: one thread per 32 elements, the earlier layout, wrote 64-byte
// strided runs and took 13 us per 8 MB block on the H200 (0.8 TB/s).
// With rs (QDoRA's m / n for the block's rows), row i is scaled by rs[i] before the one
// rounding to T.
template <typename T, int BITS, bool ALIGNED>
__global__ void __launch_bounds__(kThreads) dequant_block(
    const uint8_t* wq, const T* scales, const T* biases, const float* rs, T* out, int rows,
    int cols, int c0, long long row_bytes, int groups, int group_size) {
  const int runs = cols / 8;
  const long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (idx >= (long long)rows * runs) {
    return;
  }
  const int row = int(idx / runs), run = int(idx % runs);
  const int col = c0 + run * 8;
  const uint64_t w = load_run8<BITS, ALIGNED>(wq + row * row_bytes + (long long)(col / 8) * BITS);
  const long long sg = (long long)row * groups + col / group_size;
  const float s = to_f(scales[sg]), b = to_f(biases[sg]);
  const float rsc = rs ? rs[row] : 1.0f;
  constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
  float v[8];
#pragma unroll
  for (int t = 0; t < 8; ++t) {
    v[t] = fmaf(s, float(uint32_t((w >> (t * BITS)) & mask)), b);
    if (rs) v[t] *= rsc;
  }
  uint4* dst = reinterpret_cast<uint4*>(out + (long long)row * cols + run * 8);
  if constexpr (sizeof(T) == 4) {
    dst[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                        __float_as_uint(v[3]));
    dst[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
                        __float_as_uint(v[7]));
  } else {
    dst[0] = make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                        pack2<T>(v[6], v[7]));
  }
}

// y[i] = bias[i % n] (or 0 without bias) for i < total.
template <typename T>
__global__ void fill_rows(T* y, const T* bias, long long total, int n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i < total; i += (long long)gridDim.x * blockDim.x) {
    y[i] = bias ? bias[i % n] : from_f<T>(0.0f);
  }
}

template <typename F>
void dispatch_type(mx::Dtype t, F&& f) {
  if (t == mx::float32) {
    f.template operator()<float>();
  } else if (t == mx::float16) {
    f.template operator()<__half>();
  } else if (t == mx::bfloat16) {
    f.template operator()<__nv_bfloat16>();
  } else {
    throw std::invalid_argument("[qlora_linear] float32, float16 or bfloat16 expected");
  }
}

// y = broadcast bias over the rows (zeros without bias); y's last dim is the bias's.
void fill(mx::cu::CommandEncoder& enc, mx::array& y, const mx::array* bias) {
  long long total = y.size();
  if (total == 0) {
    return;
  }
  int n = y.shape(-1);
  reads_writes(enc, {bias}, {&y});
  dim3 grid(unsigned(std::min<long long>((total + kThreads - 1) / kThreads, 4096)));
  dispatch_type(y.dtype(), [&]<typename T>() {
    T* yp = mx::gpu_ptr<T>(y);
    const T* bp = bias ? mx::gpu_ptr<T>(*bias) : nullptr;
    cuda::launch(enc, reinterpret_cast<const void*>(&fill_rows<T>), grid, dim3(kThreads), 0u,
                 yp, bp, total, n);
  });
}

// The quantized weight (out x in) and the block dequantizer over it.
struct Quantized {
  const mx::array& wq;
  const mx::array& scales; // in T
  const mx::array& biases;
  int out, in, bits, group_size;
  const mx::array* rs = nullptr; // rows scaled by it (float32 (out,)) when given

  // buf[0:rows, 0:cols] = dequant(W)[r0:r0+rows, c0:c0+cols]; `after` (the GEMMs' output,
  // or null for a fresh buffer) is registered as read so that this node waits for the
  // last GEMM that read `buf`.
  void dequant(mx::cu::CommandEncoder& enc, mx::array& buf, int r0, int rows, int c0,
               int cols, const mx::array* after) const {
    // Non-const: the encoder passes kernel arguments by (non-const) address.
    long long row_bytes = (long long)in * bits / 8;
    int groups = in / group_size, gs = group_size;
    const uint8_t* w = mx::gpu_ptr<uint8_t>(wq) + (long long)r0 * row_bytes;
    // Rows are whole uint32 words and runs start at multiples of `bits` bytes: 2-, 4- and
    // 8-byte loads are aligned when the base is.
    const bool aligned = reinterpret_cast<uintptr_t>(w) % 8 == 0 && row_bytes % 8 == 0;
    const long long runs = (long long)rows * (cols / 8);
    if (runs == 0) {
      return;
    }
    reads_writes(enc, {&wq, &scales, &biases, rs, after}, {&buf});
    const float* rp = rs ? mx::gpu_ptr<float>(*rs) + r0 : nullptr;
    dim3 grid(unsigned((runs + kThreads - 1) / kThreads));
    dispatch_type(buf.dtype(), [&]<typename T>() {
      const T* s = mx::gpu_ptr<T>(scales) + (long long)r0 * groups;
      const T* b = mx::gpu_ptr<T>(biases) + (long long)r0 * groups;
      T* o = mx::gpu_ptr<T>(buf);
      auto go = [&]<int BITS>() {
        const void* k = aligned ? reinterpret_cast<const void*>(&dequant_block<T, BITS, true>)
                                : reinterpret_cast<const void*>(&dequant_block<T, BITS, false>);
        cuda::launch(enc, k, grid, dim3(kThreads), 0u, w, s, b, rp, o, rows, cols, c0,
                     row_bytes, groups, gs);
      };
      quant::dispatch_bits(bits, go);
    });
  }
};

// Block length (rows of W for the forward, columns for dx) given the other side `width`:
// at most a quarter of the dense weight and kBlockBytes, a multiple of kAlign (the last
// block may be shorter). MLX_TUNER_QLORA_CHUNK_ROWS overrides it (tests), rounded up to a
// multiple of kAlign. kAlign keeps the GEMMs' output offsets at 256 bytes, the alignment
// cuBLASLt's heuristic assumes by default, and the columns whole runs of 32 codes.
constexpr int kAlign = 128;

int block_len(int len, int width, size_t esz) {
  int b = 0;
  if (const char* e = std::getenv("MLX_TUNER_QLORA_CHUNK_ROWS"); e && std::atoi(e) > 0) {
    b = (std::atoi(e) + kAlign - 1) / kAlign * kAlign;
  } else {
    size_t line = size_t(width) * esz;
    size_t cap = std::min(kBlockBytes, size_t(len) * line / 4);
    b = int(std::max<size_t>(kAlign, cap / line / kAlign * kAlign));
  }
  return std::min(b, len);
}

int leading_rows(const mx::array& x) {
  long long m = 1;
  for (int d = 0; d + 1 < int(x.ndim()); ++d) {
    m *= x.shape(d);
  }
  return int(m);
}

} // namespace

namespace cuda {

bool qlora_own_fits(int r, mx::Dtype t, int k, int out,
                    std::initializer_list<const mx::array*> projected, bool switchable) {
  return r > 0 && k > 0 && lowrank_fits(r, t, {k, out}, projected, switchable);
}

void qlora_forward(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array* xd_in,
                   const QuantWeight& qw, const mx::array& a, const mx::array& b,
                   const mx::array* bias, float s, mx::array& y, mx::array& xa,
                   const mx::array* row_scale) {
  const auto& xd = xd_in ? *xd_in : x;
  const int out = qw.wq.shape(0), k = x.shape(-1), r = a.shape(1), m = leading_rows(x);
  if (m == 0) {
    return;
  }
  const auto T = x.dtype();
  const bool own = qlora_own_fits(r, T, k, out, {&xd}, !row_scale);
  if (row_scale && !own) {
    throw std::logic_error("[qlora_linear] a row scale needs the rank-r kernels (qlora_own_fits)");
  }
  // The rank-r term (+ bias) first; the base GEMMs accumulate into it (beta = 1).
  float beta = 1.0f;
  if (own) { // kernels of ours (lowrank.cuh)
    auto mm = lowrank_pack(enc, T, {{a, r, 1, k, r, true},
                                    {b, out, 1, r, out, false, 16, 1.0f, row_scale}});
    lowrank_project(enc, xd, mm[0], r, 1.0f, xa);
    lowrank_expand(enc, xa, mm[1], s, bias, y);
  } else if (r > 0 && k > 0) {
    auto [a_t, b_t] = as_dtype(enc, a, b, T);
    GemmBatch batch(enc); // both rank-r GEMMs as one graph node
    gemm(enc, {false, false, m, r, k, T, T, T}, 1.0f, xd, a_t, 0.0f, xa);
    gemm(enc, {false, false, m, out, r, T, T, T}, s, xa, b_t, 0.0f, y, bias);
  } else {
    fill(enc, xa, nullptr); // x_d A over an empty input dimension
    if (bias || k == 0) {
      fill(enc, y, bias);
    } else {
      beta = 0.0f;
    }
  }
  if (k == 0 || out == 0) {
    return;
  }
  // Blocks of R rows of W: y[:, r0:r0+R] += x Wcᵀ.
  Quantized q{qw.wq, qw.scales, qw.biases, out, k, qw.bits, qw.group_size, row_scale};
  const int R = block_len(out, k, mx::size_of(T));
  const int nb = (out + R - 1) / R;
  std::vector<mx::array> bufs;
  for (int i = 0; i < std::min(nb, 2); ++i) {
    bufs.push_back(scratch(enc, {R, k}, T));
  }
  q.dequant(enc, bufs[0], 0, R, 0, k, nullptr);
  for (int c = 0; c < nb; ++c) {
    const int r0 = c * R, rc = std::min(R, out - r0);
    if (c + 1 < nb) { // its buffer was last read by the GEMM of block c - 1
      const int r1 = r0 + R;
      q.dequant(enc, bufs[(c + 1) % 2], r1, std::min(R, out - r1), 0, k, c > 0 ? &y : nullptr);
    }
    Gemm g{false, true, m, rc, k, T, T, T};
    g.ldc = out;
    g.c_off = size_t(r0);
    gemm(enc, g, 1.0f, x, bufs[c % 2], beta, y);
  }
}

void qlora_backward(mx::cu::CommandEncoder& enc, const mx::array& xd, bool has_xd,
                    const mx::array& xa, const QuantWeight& qw, const mx::array& a,
                    const mx::array& b, const mx::array& dy, float s, const QLoRAGradOut& grads,
                    const mx::array* row_scale) {
  mx::array *dx = grads.x, *dxd = grads.x_dropped, *da = grads.a, *db = grads.b;
  const int out = qw.wq.shape(0), k = xd.shape(-1), r = a.shape(1);
  const int m = leading_rows(xd);
  if (m == 0) { // sums over no rows are zeros
    for (auto* z : {da, db}) {
      if (z) {
        fill(enc, *z, nullptr);
      }
    }
    return;
  }
  const auto T = xd.dtype();
  // g = s dy Bᵀ (float32 accumulate, stored in T for the next products); zero when out or r
  // is 0.
  const bool have_g = r > 0 && out > 0;
  const bool lora_dx = dx && !has_xd && have_g;
  std::optional<mx::array> g_t, a_t, b_t;
  const bool need_g = have_g && (da || dxd || lora_dx);
  // rank-r kernels of ours
  const bool own = have_g && qlora_own_fits(r, T, k, out, {&dy, &xd}, !row_scale);
  if (row_scale && !own) {
    throw std::logic_error("[qlora_linear] a row scale needs the rank-r kernels (qlora_own_fits)");
  }
  if (need_g) {
    if (!own) std::tie(a_t, b_t) = as_dtype(enc, a, b, T);
    g_t = scratch(enc, {m, r}, T);
  }
  // Without g, dx_d and dA are zeros (out or r is 0); dB is empty then.
  if (dxd && !have_g) fill(enc, *dxd, nullptr);
  if (da && !have_g) fill(enc, *da, nullptr);
  if (dx && k > 0 && !lora_dx && out == 0) {
    fill(enc, *dx, nullptr);
    return;
  }
  if (own) { // the same products as below, by lowrank.cuh's kernels
    std::vector<mx::array> mm; // B^T (out, r) for g; A^T (r, k) for dx_d and dx
    const bool need_at = dxd || (dx && k > 0 && lora_dx);
    // The reduce's counters, zeroed by the pack (when there is one): no finish node.
    std::optional<mx::array> counters;
    if (need_g && (da || db)) counters = reduce_counters(enc, std::max(k, out));
    mx::array* cnt = counters ? &*counters : nullptr;
    const LowRankMatrix bt{b, 1, out, out, r, true, 16, 1.0f, row_scale};
    if (need_g && need_at) {
      mm = lowrank_pack(enc, T, {bt, {a, 1, r, r, k, false}}, cnt);
    } else if (need_g) {
      mm = lowrank_pack(enc, T, {bt}, cnt);
    }
    if (need_g) lowrank_project(enc, dy, mm[0], r, s, *g_t);
    if (dxd) lowrank_expand(enc, *g_t, mm[1], 1.0f, nullptr, *dxd);
    std::vector<ReduceJob> jobs; // dA, dB: those asked for, in one launch
    if (da) jobs.push_back({xd, *g_t, *da, r, 1, 1.0f});
    if (db) jobs.push_back({dy, xa, *db, 1, out, s, row_scale});
    lowrank_reduce(enc, jobs, cnt);
    if (dx && k > 0 && lora_dx) lowrank_expand(enc, *g_t, mm[1], 1.0f, nullptr, *dx);
  } else {
    GemmBatch batch(enc); // the rank-r GEMMs as one graph node
    if (need_g) {
      gemm(enc, {false, true, m, r, out, T, T, T}, s, dy, *b_t, 0.0f, *g_t);
    }
    if (dxd && have_g) { // dx_d = g Aᵀ
      gemm(enc, {false, true, m, k, r, T, T, T}, 1.0f, *g_t, *a_t, 0.0f, *dxd);
    }
    if (da && have_g) { // dA = x_dᵀ g, in A's dtype (float32)
      gemm(enc, {true, false, k, r, m, T, T, da->dtype()}, 1.0f, xd, *g_t, 0.0f, *da);
    }
    if (db && have_g) { // dB = s xaᵀ dy (xa is saved in T)
      gemm(enc, {true, false, r, out, m, T, T, db->dtype()}, s, xa, dy, 0.0f, *db);
    }
    if (dx && k > 0 && lora_dx) { // dx = g Aᵀ first (x_d is x); the blocks of W add to it
      gemm(enc, {false, true, m, k, r, T, T, T}, 1.0f, *g_t, *a_t, 0.0f, *dx);
    }
  }
  if (!dx || k == 0) {
    return;
  }
  // Blocks of C columns of W: dx[:, c0:c0+C] += dy Wc (over dx = g Aᵀ, or from zero).
  const float beta = lora_dx ? 1.0f : 0.0f;
  Quantized q{qw.wq, qw.scales, qw.biases, out, k, qw.bits, qw.group_size, row_scale};
  const int C = block_len(k, out, mx::size_of(T));
  const int nb = (k + C - 1) / C;
  std::vector<mx::array> bufs;
  for (int i = 0; i < std::min(nb, 2); ++i) {
    bufs.push_back(scratch(enc, {out, C}, T));
  }
  q.dequant(enc, bufs[0], 0, out, 0, C, nullptr);
  for (int c = 0; c < nb; ++c) {
    const int c0 = c * C, cc = std::min(C, k - c0);
    if (c + 1 < nb) { // its buffer was last read by the GEMM of block c - 1
      const int c1 = c0 + C;
      q.dequant(enc, bufs[(c + 1) % 2], 0, out, c1, std::min(C, k - c1), c > 0 ? dx : nullptr);
    }
    Gemm g{false, false, m, cc, out, T, T, T};
    g.ldb = cc; // the block buffer holds out x cc
    g.ldc = k;
    g.c_off = size_t(c0);
    gemm(enc, g, 1.0f, dy, bufs[c % 2], beta, *dx);
  }
}

} // namespace cuda

void QLoRA::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  cuda::HostTimer timer("qlora_linear");
  auto& enc = mx::cu::get_command_encoder(stream());
  const mx::array* xd = p_.has_xd ? &in[6] : nullptr;
  const mx::array* bias = p_.has_bias ? &in[p_.has_xd ? 7 : 6] : nullptr;
  for (auto& o : outs) cuda::alloc_output(o, enc);
  const auto T = in[0].dtype();
  auto sc = as_dtype(enc, in[2], T);
  auto bi = as_dtype(enc, in[3], T);
  std::optional<mx::array> bias_t;
  if (bias) {
    bias_t = as_dtype(enc, *bias, T);
    bias = &*bias_t;
  }
  cuda::qlora_forward(enc, in[0], xd, {in[1], sc, bi, p_.bits, p_.group_size}, in[4], in[5],
                      bias, p_.scale, outs[0], outs[1]);
}

void QLoRAVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  cuda::HostTimer timer("qlora_linear_vjp");
  auto& enc = mx::cu::get_command_encoder(stream());
  for (auto& o : outs) cuda::alloc_output(o, enc);
  size_t o = 0;
  auto take = [&](bool on) -> mx::array* { return on ? &outs[o++] : nullptr; };
  cuda::QLoRAGradOut grads;
  grads.x = take(g_.dx);
  grads.x_dropped = take(g_.dxd);
  grads.a = take(g_.da);
  grads.b = take(g_.db);
  const auto T = in[6].dtype();
  auto dy = as_dtype(enc, in[0], T);
  // W's scales and biases in T only where dx reads W (converted copies are graph nodes).
  auto sc = g_.dx ? as_dtype(enc, in[2], T) : in[2];
  auto bi = g_.dx ? as_dtype(enc, in[3], T) : in[3];
  cuda::qlora_backward(enc, in[6], p_.has_xd, in[7], {in[1], sc, bi, p_.bits, p_.group_size},
                       in[4], in[5], dy, p_.scale, grads);
}

} // namespace mlx_tuner
