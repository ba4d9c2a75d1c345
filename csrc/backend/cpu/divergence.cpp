#ifndef MT_DIV_BODY
// CPU kernels of the KL / JS divergence (maths: csrc/ops/divergence.h).
//
// Rows are split across threads (parallel_for), and read without a (rows, V) temporary:
// half types are converted to float32 a few vectors at a time. KL's forward is one pass
// (online max / sum-exp / sum-P(a-b) with one rescale per block of kBlock, 2 exps per
// element); JS's needs the normalizers first: an exp pass for the sums, then a log pass
// (2 exps + 1 log per element pair, the exps kept in a per-thread row buffer where it
// fits in L2, else computed again; see "JS forward"). The backward is one pass given the
// stats (KL: 2 exps, JS: 2 exps + 1 log). These loops are bound by the exp / log
// arithmetic, so those are hand-vectorized and data for later is software-prefetched.
// SIMD: GCC/Clang vector extensions, compiled per target on x86-64 (generic and AVX2+FMA
// with 8 lanes, AVX-512 with 16), picked at run time.
#include <cmath>
#include <algorithm>
#include <string>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h> // sysconf
#endif


#include "backend/cpu/encoder.h"
#include "common/parallel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/divergence.h"

// Vectors are only passed between always-inline functions: the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mlx_tuner {

namespace {

#define MT_INLINE inline __attribute__((always_inline))

constexpr int kBlock = 512; // elements per block (a multiple of the lane count)
constexpr float kInf = std::numeric_limits<float>::infinity();

// exp offsets of a row side: its max, or 0 for a fully masked side (max = -inf), so that
// exp(x - offset) is 0 there instead of NaN. With the side's log-sum, +inf when masked.
MT_INLINE float exp_offset(float m) {
  return m == -kInf ? 0.f : m;
}
MT_INLINE float log_sum_offset(float m, float log_sum) {
  return m == -kInf ? kInf : log_sum;
}
constexpr float kLn2 = 0.693147180559945f;

// Software prefetch: the exp-heavy loops leave DRAM idle, so they pull in data that is
// read later (hardware prefetchers alone left one core at ~7 GB/s here).
template <typename T>
MT_INLINE void prefetch(const T* p) {
  __builtin_prefetch(p, 0, 3);
}
constexpr int kAhead = 2 * kBlock; // prefetch distance (elements) in the streaming loops

template <typename T>
struct Args {
  const T* q;
  const T* p;
  T* out; // forward: div (rows); backward: dq (rows, V)
  T* out2; // backward: dp (rows, V)
  float* stats; // forward output
  const float* cstats; // backward input
  const float* cot; // backward: cotangent per row
  int V;
  int js_cache_max_v = 0; // JS forward: the largest V whose exps it keeps in a row buffer

  // Row r's forward stats (csrc/ops/divergence.h): offsets, log-sums, s0, s1.
  void put_stats(int64_t r, float mq, float lsq, float mp, float lsp, float s0, float s1) const {
    float* st = stats + r * kDivStats;
    st[kMaxQ] = mq;
    st[kLogSumQ] = lsq;
    st[kMaxP] = mp;
    st[kLogSumP] = lsp;
    st[kS0] = s0;
    st[kS1] = s1;
  }
};

} // namespace
} // namespace mlx_tuner

// The SIMD helpers and kernels below are compiled once per lane count: 16 (one zmm) for
// AVX-512, 8 for AVX2 and the generic target (wider vectors there are split badly).
#define MT_DIV_BODY
#define MT_DIV_LANES 16
#define MT_DIV_NS lanes16
#include "backend/cpu/divergence.cpp"
#undef MT_DIV_LANES
#undef MT_DIV_NS
#define MT_DIV_LANES 8
#define MT_DIV_NS lanes8
#include "backend/cpu/divergence.cpp"
#undef MT_DIV_LANES
#undef MT_DIV_NS
#undef MT_DIV_BODY

namespace mlx_tuner {
namespace {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// 2: AVX-512, 1: AVX2 + FMA, 0: generic. MLX_TUNER_CPU_ISA=generic|avx2 caps it, so the
// tests can run every build on one machine (tests/ops/test_divergence_isa.py).
int isa() {
  static int level = [] {
    int have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
        ? 2
        : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
    const char* cap = std::getenv("MLX_TUNER_CPU_ISA");
    if (cap != nullptr && std::string(cap) == "generic") {
      return 0;
    }
    if (cap != nullptr && std::string(cap) == "avx2") {
      return std::min(have, 1);
    }
    return have;
  }();
  return level;
}
#define MT_PICK(NAME, ...)                                                              \
  (isa() == 2   ? lanes16::NAME##_avx512<__VA_ARGS__>                                   \
       : isa() == 1 ? lanes8::NAME##_avx2<__VA_ARGS__>                                  \
                    : lanes8::NAME##_generic<__VA_ARGS__>)
#else
#define MT_PICK(NAME, ...) (lanes8::NAME##_generic<__VA_ARGS__>)
#endif

// Rows per task: enough work per chunk that scheduling is noise.
int64_t grain(int V) {
  return std::max<int64_t>(1, (1 << 15) / std::max(V, 1));
}

template <typename T, Divergence K>
void run_forward(Args<T> a, int64_t rows) {
  auto fn = MT_PICK(forward, T, K);
  parallel_for(rows, grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

template <typename T, Divergence K>
void run_backward(Args<T> a, int64_t rows, bool gq, bool gp) {
  void (*fn)(const Args<T>&, int64_t, int64_t);
  if (gq && gp) {
    fn = MT_PICK(backward, T, K, true, true);
  } else if (gq) {
    fn = MT_PICK(backward, T, K, true, false);
  } else {
    fn = MT_PICK(backward, T, K, false, true);
  }
  parallel_for(rows, grain(a.V), [&](int64_t b, int64_t e) { fn(a, b, e); });
}

template <typename T>
void dispatch_forward(Divergence kind, const Args<T>& a, int64_t rows) {
  if (kind == Divergence::KL) {
    run_forward<T, Divergence::KL>(a, rows);
  } else {
    run_forward<T, Divergence::JS>(a, rows);
  }
}

template <typename T>
void dispatch_backward(Divergence kind, const Args<T>& a, int64_t rows, bool gq, bool gp) {
  if (kind == Divergence::KL) {
    run_backward<T, Divergence::KL>(a, rows, gq, gp);
  } else {
    run_backward<T, Divergence::JS>(a, rows, gq, gp);
  }
}

// Calls f(T{}) with T the C++ type of `dtype`.
template <typename F>
void with_type(mx::Dtype dtype, F&& f) {
  if (dtype == mx::float32) {
    f(float{});
  } else if (dtype == mx::float16) {
    f(mx::float16_t{});
  } else if (dtype == mx::bfloat16) {
    f(mx::bfloat16_t{});
  } else {
    throw std::invalid_argument("[divergence] unsupported dtype " + dtype_name(dtype));
  }
}

// The JS forward keeps exp(x - max) of both sides in a per-thread row buffer between its
// two passes. That pays while the buffer (8 V bytes) and the row's two inputs stay
// within the L2 cache; beyond, writing and reading the buffer from further out costs more
// than two more exps per element pair. Kept / recomputed time, alternated in one run on
// the 2-core CI machine (2 MB of L2 a core) with AVX-512: float32 0.81-0.83 at V = 32,000,
// 0.83-0.91 at 65,536, 1.06 at 98,304, 1.29-1.49 at 131,072-151,936; bfloat16 0.79-0.81 at
// 32,000, 0.84 at 98,304, 1.00-1.02 at 131,072, 1.13-1.17 at 151,936. So the largest V
// that keeps it is 5/8 of L2 over the bytes per element. Without AVX-512 the exps cost
// more (with AVX2 kept / recomputed was 0.65-0.69 up to 151,936): 3/4 of L2, as before.
// MLX_TUNER_JS_CACHE_MAX_V overrides it (the tests run both paths).
// bytes_per_v: the buffer's 8 bytes and the row's two inputs'.
int js_cache_max_v(int bytes_per_v) {
  if (const char* e = std::getenv("MLX_TUNER_JS_CACHE_MAX_V"); e != nullptr && *e != 0) {
    return std::atoi(e);
  }
  static const long l2 = [] {
    long v = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? v : 1L << 20;
  }();
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool avx512 = isa() == 2;
#else
  const bool avx512 = false;
#endif
  return int((avx512 ? l2 / 8 * 5 : l2 / 4 * 3) / bytes_per_v);
}

} // namespace

void DivergenceForward::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  auto& out = outputs[0];
  auto& stats = outputs[1];
  int64_t rows = out.size();
  int V = q.shape(-1);
  if (rows == 0) {
    return;
  }
  with_type(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    Args<T> a{q.data<T>(), p.data<T>(), out.data<T>(), nullptr, stats.data<float>(),
              nullptr, nullptr, V};
    a.js_cache_max_v = js_cache_max_v(8 + 2 * int(sizeof(T)));
    enc.dispatch([a, rows, kind = kind_]() { dispatch_forward<T>(kind, a, rows); });
  });
}

void DivergenceBackward::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  const auto& q = inputs[0];
  const auto& p = inputs[1];
  const auto& stats = inputs[2];
  const auto& cot = inputs[3];
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  int64_t rows = cot.size();
  int V = q.shape(-1);
  if (rows == 0) {
    return;
  }
  with_type(q.dtype(), [&](auto tag) {
    using T = decltype(tag);
    T* dq = grad_q_ ? outputs[0].data<T>() : nullptr;
    T* dp = grad_p_ ? outputs[grad_q_ ? 1 : 0].data<T>() : nullptr;
    Args<T> a{q.data<T>(), p.data<T>(), dq, dp, nullptr, stats.data<float>(),
              cot.data<float>(), V};
    enc.dispatch([a, rows, kind = kind_, gq = grad_q_, gp = grad_p_]() {
      dispatch_backward<T>(kind, a, rows, gq, gp);
    });
  });
}

} // namespace mlx_tuner

#else // MT_DIV_BODY: one lane count
namespace mlx_tuner {
namespace {
namespace MT_DIV_NS {

constexpr int W = MT_DIV_LANES;
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

MT_INLINE vf splat(float x) {
  return vf{} + x;
}
MT_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
MT_INLINE void vstore(float* p, vf v) {
  std::memcpy(p, &v, sizeof(vf));
}
MT_INLINE vf vsel(vi m, vf a, vf b) {
  return m ? a : b;
}
MT_INLINE vf vmax(vf a, vf b) {
  return vsel(a > b, a, b);
}
MT_INLINE vf vmin(vf a, vf b) {
  return vsel(a < b, a, b);
}
MT_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) {
    s += v[i];
  }
  return s;
}
MT_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) {
    m = v[i] > m ? v[i] : m;
  }
  return m;
}

// h e^r for |r| <= ln2/2: vexp's degree-6 minimax polynomial (fitted for relative error),
// Horner form, the factor h folded into the coefficients.
MT_INLINE vf vexp_poly(vf r, float h) {
  vf p = splat(1.3754e-3f * h);
  p = p * r + 8.36891e-3f * h;
  p = p * r + 4.166949e-2f * h;
  p = p * r + 1.6666518e-1f * h;
  p = p * r + 4.9999988e-1f * h;
  p = p * r + h;
  return p * r + h;
}

// exp(x) for float32 x <= 88 (callers pass x - max <= 0): relative error < 8e-8, 0 below
// -87 (and for -inf), NaN stays NaN (the scale is applied by a multiplication). Range
// reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 minimax polynomial (fitted here
// for relative error) in Horner form.
// I: instruction set of the caller (2 = AVX-512, whose vscalefps does the 2^n scaling with
// underflow to 0, and vmaxps the clamp: 12 vector ops instead of 16).
// HALF: exp(x) / 2 (exactly: the factor is folded into the coefficients).
template <int I, bool HALF = false>
MT_INLINE vf vexp(vf x) {
  const float h = HALF ? 0.5f : 1.f;
#if defined(__x86_64__)
  if constexpr (I == 2) {
    // Inline asm, not intrinsics: this body is only ever inlined into the AVX-512 entry
    // points, but GCC checks intrinsics against the target of this (generic) template.
    // vmaxps returns its second source for a NaN: max(-110, x) keeps a NaN x, and -110
    // makes -inf (anything below ~-103.3) come out as 0.
    vf xc, y;
    asm("vmaxps %1, %2, %0" : "=v"(xc) : "v"(x), "v"(splat(-110.f)));
    const float magic = 12582912.f;
    vf n = (xc * 1.44269504088896341f + magic) - magic;
    vf r = xc - n * 0.693359375f - n * -2.12194440e-4f;
    vf p = vexp_poly(r, h);
    asm("vscalefps %2, %1, %0" : "=v"(y) : "v"(p), "v"(n)); // p 2^n, subnormals included
    return y;
  }
#endif
  vi lo = x < -87.f;
  vf xc = vsel(lo, splat(-87.f), x);
  const float magic = 12582912.f; // 1.5 * 2^23: adding it rounds to an integer
  vf t = xc * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = vexp_poly(r, h);
  // 2^n from the low bits of t (magic's low 9 bits are zero); n >= -126 keeps it normal.
  vf y = p * (vf)(((vi)t + 127) << 23);
  return vsel(lo, splat(0.f), y);
}

// Lanes of `table` picked by idx (0..W-1): vpermps with AVX-512.
MT_INLINE vf vlookup(vf table, vi idx) {
#if defined(__clang__)
  vf r;
  for (int i = 0; i < W; ++i) {
    r[i] = table[idx[i] & (W - 1)];
  }
  return r;
#else
  return __builtin_shuffle(table, idx);
#endif
}

// log(x) for normal x > 0 (callers mask x < FLT_MIN); absolute error < 1e-7 on (0, 2].
// x = 2^e m, m in [1, 2); c = 1 + (k + 1/2)/16 from m's top 4 bits, so m / c = 1 + f with
// |f| < 1/32: log x = e ln2 + log c + log1p(f), log1p by 4 Taylor terms (error < 6e-9).
// Without AVX-512 (no vpermps over 16 lanes) the lookup is slow: I < 2 uses a table-free
// degree-8 polynomial on f = m - 1, m in [sqrt(1/2), sqrt(2)) (Cephes logf coefficients).
template <int I>
MT_INLINE vf vlog(vf x) {
  if constexpr (I < 2 || W != 16) {
    vi b = (vi)x;
    vi e = ((b >> 23) & 0xff) - 127;
    vf m = (vf)((b & 0x7fffff) | 0x3f800000); // [1, 2)
    vi big = m > 1.41421356f;
    m = vsel(big, m * 0.5f, m);
    vf ef = __builtin_convertvector(e - big, vf); // big is -1 where true
    vf f = m - 1.f;
    vf z = f * f;
    vf p = splat(7.0376836292e-2f);
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    vf y = f * z * p - 0.5f * z + ef * -2.12194440e-4f;
    return f + y + ef * 0.693359375f;
  } else {
    const vf inv_c = {0.9696969985961914f, 0.9142857193946838f, 0.8648648858070374f,
                      0.8205128312110901f, 0.7804877758026123f, 0.7441860437393188f,
                      0.7111111283302307f, 0.6808510422706604f, 0.6530612111091614f,
                      0.6274510025978088f, 0.6037735939025879f, 0.581818163394928f,
                      0.5614035129547119f, 0.5423728823661804f, 0.5245901346206665f,
                      0.5079365372657776f};
    const vf log_c = {0.03077162802219391f, 0.08961215615272522f, 0.14518198370933533f,
                      0.19782572984695435f, 0.24783620238304138f, 0.2954642176628113f,
                      0.34092655777931213f, 0.3844117224216461f, 0.42608442902565f,
                      0.4660896956920624f, 0.5045560002326965f, 0.541597306728363f,
                      0.5773153305053711f, 0.6118015646934509f, 0.6451380252838135f,
                      0.6773987412452698f}; // -log(inv_c) exactly, rounded
    vi b = (vi)x;
    vf e = __builtin_convertvector((b >> 23) - 127, vf);
    vi mant = b & 0x7fffff;
    vi k = mant >> 19;
    vf m = (vf)(mant | 0x3f800000);
    vf f = m * vlookup(inv_c, k) - 1.f;
    vf t = f * (1.f / 3 - 0.25f * f) - 0.5f;
    vf y = (t * f) * f + f;
    return (e * -2.12194440e-4f + (y + vlookup(log_c, k))) + e * 0.693359375f;
  }
}

// ------------------------------------------------------------------ dtype conversions
MT_INLINE float to_float(float x) {
  return x;
}
MT_INLINE float to_float(mx::bfloat16_t x) {
  uint16_t h;
  std::memcpy(&h, &x, 2);
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MT_INLINE float to_float(mx::float16_t x) {
  // Exponent rebias, with subnormals renormalized by a float subtraction.
  uint16_t h;
  std::memcpy(&h, &x, 2);
  uint32_t o = uint32_t(h & 0x7fff) << 13;
  uint32_t e = o & (0x7c00u << 13);
  o += (127 - 15) << 23;
  float f;
  if (e == (0x7c00u << 13)) { // inf / nan
    o += (128 - 16) << 23;
    std::memcpy(&f, &o, 4);
  } else if (e == 0) { // zero / subnormal
    o += 1 << 23;
    std::memcpy(&f, &o, 4);
    f -= 6.103515625e-05f; // 2^-14
  } else {
    std::memcpy(&f, &o, 4);
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u |= uint32_t(h & 0x8000) << 16;
  std::memcpy(&f, &u, 4);
  return f;
}
MT_INLINE void from_float(float f, float* o) {
  *o = f;
}
MT_INLINE void from_float(float f, mx::bfloat16_t* o) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t h = (u & 0x7fffffff) > 0x7f800000
      ? uint16_t((u >> 16) | 0x40)
      : uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16); // round to nearest even
  std::memcpy(o, &h, 2);
}
MT_INLINE void from_float(float f, mx::float16_t* o) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000;
  u &= 0x7fffffff;
  uint16_t h;
  if (u >= 0x47800000) { // overflow to inf, or inf / nan
    h = u > 0x7f800000 ? 0x7e00 : 0x7c00;
  } else if (u < 0x38800000) { // half subnormal: let a float addition round it
    float g;
    std::memcpy(&g, &u, 4);
    g += 0.5f;
    uint32_t gu;
    std::memcpy(&gu, &g, 4);
    h = uint16_t(gu - 0x3f000000);
  } else { // normal: rebias and round to nearest even
    u += (uint32_t(15 - 127) << 23) + 0xfff + ((u >> 13) & 1);
    h = uint16_t(u >> 13);
  }
  h |= sign;
  std::memcpy(o, &h, 2);
}

// A block of n <= kBlock elements as float32, padded with -inf to a multiple of W
// (-inf is a masked entry: it contributes nothing anywhere).
template <typename T>
MT_INLINE const float* load_block(const T* src, int n, float* buf) {
  int i0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (n % W == 0) {
      return src;
    }
  } else if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    // bf16 is the top half of a float32: widen and shift (vpmovzxwd + vpslld).
    for (; i0 + W <= n; i0 += W) {
      vh h;
      std::memcpy(&h, src + i0, sizeof(vh));
      vi u = __builtin_convertvector(h, vi) << 16;
      vstore(buf + i0, (vf)u);
    }
  }
  for (int i = i0; i < n; ++i) {
    buf[i] = to_float(src[i]);
  }
  for (int i = n; i % W != 0; ++i) {
    buf[i] = -kInf;
  }
  return buf;
}



// ------------------------------------------------------------------ JS: exp, log, loads
// bf16 / f16 inputs need float32 work only well below their own rounding (2^-9, 2^-12):
// exp by a degree-4 polynomial, log by a 32-entry table and three terms of log1p
// (absolute error < 3e-7), and the bf16 widening done two vectors at a time. The float32
// JS forward uses the same log with ln2 in two parts, and a degree-6 exp.

// NaN-preserving lower clamp: z < lo becomes lo, NaN stays NaN.
template <int I>
MT_INLINE vf clamp_lo(vf z, float lo) {
#if defined(__x86_64__)
  if constexpr (I == 2) {
    vf r;
    asm("vmaxps %1, %2, %0" : "=v"(r) : "v"(z), "v"(splat(lo))); // NaN: returns z
    return r;
  }
#endif
  return vsel(z < lo, splat(lo), z);
}

// exp(z) for z <= 0 with relative error < 5.5e-6 (degree-4 polynomial; JS of nearly equal
// distributions is about the mean of this error, so not less); zc is set to z clamped
// below (-110 with AVX-512, -87 otherwise), so that exp(z) * zc is 0 (not NaN) for
// z = -inf. exp is 0 below the clamp, NaN stays NaN.
// HALF: exp(z) / 2 (the factor is folded into the polynomial).
template <int I, bool HALF = false>
MT_INLINE vf vexp_half(vf z, vf& zc) {
  const float magic = 12582912.f;
  const float h = HALF ? 0.5f : 1.f;
  zc = clamp_lo<I>(z, I == 2 ? -110.f : -87.f);
  vf t = zc * 1.44269504088896341f + magic;
  vf n = t - magic;
  vf r = n * -kLn2 + zc;
  vf p = splat(4.13201e-2f * h);
  p = p * r + 1.6753502e-1f * h;
  p = p * r + 5.0004673e-1f * h;
  p = p * r + h;
  p = p * r + h;
#if defined(__x86_64__)
  if constexpr (I == 2) {
    vf y;
    asm("vscalefps %2, %1, %0" : "=v"(y) : "v"(p), "v"(n));
    return y;
  }
#endif
  vf y = p * (vf)(((vi)t + 127) << 23);
  return vsel(z < -87.f, splat(0.f), y);
}

// Lanes of the 32-entry table {lo, hi} picked by idx (low 5 bits): vpermt2ps.
MT_INLINE vf vlookup32(vf lo, vf hi, vi idx) {
#if defined(__clang__)
  vf r;
  for (int i = 0; i < W; ++i) {
    int k = idx[i] & (2 * W - 1);
    r[i] = k < W ? lo[k] : hi[k - W];
  }
  return r;
#else
  return __builtin_shuffle(lo, hi, idx);
#endif
}

// log(x) for x >= FLT_MIN (callers add FLT_MIN), NaN stays NaN; absolute error < 3e-7,
// < 1e-7 with ACC (e ln2 in two parts: float32 inputs).
// AVX-512: x = 2^e m, c = 1 + (k + 1/2)/32 from m's top 5 bits, m / c = 1 + f, |f| < 1/64,
// log1p(f) by three terms.
template <int I, bool ACC = false>
MT_INLINE vf vlog_half(vf x) {
#if defined(__x86_64__)
  if constexpr (I == 2 && W == 16) {
    const vf inv_lo = {0.9846153855323792f, 0.9552238583564758f, 0.9275362491607666f,
                       0.9014084339141846f, 0.8767123222351074f, 0.8533333539962769f,
                       0.8311688303947449f, 0.8101266026496887f, 0.790123462677002f,
                       0.7710843086242676f, 0.7529411911964417f, 0.7356321811676025f,
                       0.7191011309623718f, 0.7032967209815979f, 0.6881720423698425f,
                       0.6736842393875122f};
    const vf inv_hi = {0.6597937941551208f, 0.6464646458625793f, 0.6336633563041687f,
                       0.6213592290878296f, 0.6095238327980042f, 0.5981308221817017f,
                       0.5871559381484985f, 0.5765765905380249f, 0.5663716793060303f,
                       0.5565217137336731f, 0.5470085740089417f, 0.5378151535987854f,
                       0.5289255976676941f, 0.5203251838684082f, 0.5120000243186951f,
                       0.5039370059967041f};
    const vf log_lo = {0.015504186f, 0.0458095595f, 0.0752234012f, 0.10379681f,
                       0.131576359f, 0.158605009f, 0.184922338f, 0.210564747f,
                       0.235566065f, 0.259957552f, 0.283768147f, 0.307025045f,
                       0.32975328f, 0.351976395f, 0.373716414f, 0.394993752f};
    const vf log_hi = {0.41582793f, 0.436236769f, 0.456237435f, 0.475845903f,
                       0.495077223f, 0.513945758f, 0.532464862f, 0.55064708f,
                       0.568504751f, 0.58604908f, 0.603290796f, 0.620240331f,
                       0.636907518f, 0.653301299f, 0.669430614f, 0.685303986f};
    // -log(inv_c) of the rounded inv_c
    vf e, m;
    asm("vgetexpps %1, %0" : "=v"(e) : "v"(x));
    asm("vgetmantps $0, %1, %0" : "=v"(m) : "v"(x)); // [1, 2)
    vi k = (vi)x >> 18; // vpermt2ps reads the low 5 bits: the mantissa's top 5
    vf f = m * vlookup32(inv_lo, inv_hi, k) - 1.f;
    vf y = (f * f) * (f * (1.f / 3) - 0.5f) + f;
    if constexpr (ACC) {
      return (e * -2.12194440e-4f + (y + vlookup32(log_lo, log_hi, k))) + e * 0.693359375f;
    }
    return (y + vlookup32(log_lo, log_hi, k)) + e * 0.693147180559945f;
  }
#endif
  return vlog<I>(x);
}

// 2W consecutive elements as two float32 vectors. bf16: the even and the odd elements
// (one shift, one and); float32 and f16: the two halves. The forward only needs q and p in
// the same order; the backward's store_pair puts them back.
template <typename T, int I>
MT_INLINE void load_pair(const T* src, vf& a, vf& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = vload(src);
    b = vload(src + W);
  } else if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    vu u;
    std::memcpy(&u, src, sizeof(vu));
    a = (vf)(u << 16);
    b = (vf)(u & 0xffff0000u);
  } else {
    vh h[2];
    std::memcpy(h, src, sizeof(h));
    vf r[2];
    for (int k = 0; k < 2; ++k) {
#if defined(__x86_64__)
      if constexpr (I == 2) {
        asm("vcvtph2ps %1, %0" : "=v"(r[k]) : "v"(h[k]));
        continue;
      }
#endif
      vu x = __builtin_convertvector(h[k], vu);
      vu o = (x & 0x7fff) << 13;
      vf f = (vf)o * 0x1p112f; // rebias; subnormal halves come out exact
      f = (vf)(((x & 0x7c00) == 0x7c00) ? (o | 0x7f800000u) : (vu)f); // inf, NaN
      r[k] = (vf)((vu)f | ((x & 0x8000) << 16));
    }
    a = r[0];
    b = r[1];
  }
}

// load_pair of elements [j, j + 2W) of a row of V, padded with -inf past V.
template <typename T, int I>
MT_INLINE void load_pair_at(const T* row, int j, int V, vf& a, vf& b) {
  if (j + 2 * W <= V) {
    load_pair<T, I>(row + j, a, b);
    return;
  }
  T tmp[2 * W];
  for (int i = 0; i < 2 * W; ++i) {
    from_float(-kInf, tmp + i);
  }
  std::memcpy(tmp, row + j, (V - j) * sizeof(T));
  load_pair<T, I>(tmp, a, b);
}

// The inverse of load_pair for at most n elements; rounds to nearest even.
template <typename T, int I>
MT_INLINE void store_pair(T* dst, vf a, vf b, int n) {
  uint16_t tmp[2 * W];
  uint16_t* out = n >= 2 * W ? reinterpret_cast<uint16_t*>(dst) : tmp;
  if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    // NaNs here come from arithmetic or from bf16 inputs: their low 16 bits are zero,
    // so the rounding add cannot carry them into infinity.
    vu ua = (vu)a, ub = (vu)b;
    ua = (ua + 0x7fff + ((ua >> 16) & 1)) >> 16;
    ub = (ub + 0x7fff + ((ub >> 16) & 1)) & 0xffff0000u;
    vu u = ua | ub;
    std::memcpy(out, &u, sizeof(vu));
  } else {
    float f[2 * W];
    vstore(f, a);
    vstore(f + W, b);
#if defined(__x86_64__)
    if constexpr (I == 2) {
      vh h[2];
      asm("vcvtps2ph $0, %1, %0" : "=v"(h[0]) : "v"(a));
      asm("vcvtps2ph $0, %1, %0" : "=v"(h[1]) : "v"(b));
      std::memcpy(out, h, sizeof(h));
    } else
#endif
    {
      for (int i = 0; i < 2 * W; ++i) {
        from_float(f[i], reinterpret_cast<T*>(out + i));
      }
    }
  }
  if (n < 2 * W) {
    std::memcpy(dst, tmp, n * sizeof(T));
  }
}

// JS forward: (1) maxima, (2) e = exp(z), z = x - max, with S = sum e, into a per-thread
// row buffer while it and the row fit in L2 (Args::js_cache_max_v), (3) with
// L = log(e_q / 2 + e_p S_q / (2 S_p)) = lm + log S_q, KLq = sum e_q (z_q - L) / S_q and
// KLp = sum e_p (z_p - L) / S_p + log S_q - log S_p, z recomputed from the input (cheaper
// than storing it), and e too above the buffer's limit. Two exps and one log per element
// pair (four exps without the buffer); each term is a difference taken per element, so
// KL stays accurate as P -> Q. float32 adds c = log S_q - log S_p to each term instead:
// summed, the terms then stay as small as KLp, and so does the rounding of their sum.
// With AVX-512, e = 2^u with u = x log2(e) - max log2(e), one FMA (vexp2_half), and
// z = u ln2 folds into z - L.

constexpr float kLog2e = 1.44269504088896341f;

// e / 2 = 2^u / 2 for u as above (AVX-512 only): f = u - floor(u) in [0, 1] by vreduceps,
// 2^f by a polynomial, then vscalefps's p 2^floor(u). The polynomials are minimax for
// relative error with p(0) = 1 and p(1) = 2 (fitted here), so that the row maximum's
// e, u ~ 0, is exact as with z = 0: relative error 6.7e-8 at degree 6 (float32), 3.4e-6
// at degree 4 (half types; JS of nearly equal distributions is about the mean of this
// error, so not less). u = -inf gives 0 (vreduceps returns 0 for infinities), u >= 128
// inf, NaN NaN; u is exact to its rounding (no range reduction).
template <bool F32>
MT_INLINE vf vexp2_half(vf u) {
  vf f, p, y;
#if defined(__x86_64__)
  asm("vreduceps $9, %1, %0" : "=v"(f) : "v"(u)); // round down, no precision exception
#endif
  if constexpr (F32) {
    p = splat(0.5f * 2.1715026e-4f);
    p = p * f + 0.5f * 1.2440877e-3f;
    p = p * f + 0.5f * 9.6780639e-3f;
    p = p * f + 0.5f * 5.5484153e-2f;
    p = p * f + 0.5f * 2.4022952e-1f;
    p = p * f + 0.5f * 6.9314700e-1f;
    p = p * f + 0.5f;
  } else {
    p = splat(0.5f * 1.3555747e-2f);
    p = p * f + 0.5f * 5.2032370e-2f;
    p = p * f + 0.5f * 2.4137977e-1f;
    p = p * f + 0.5f * 6.9303215e-1f;
    p = p * f + 0.5f;
  }
#if defined(__x86_64__)
  asm("vscalefps %2, %1, %0" : "=v"(y) : "v"(p), "v"(u));
#endif
  return y;
}

// The exponent argument of a side with offset o: u = x log2(e) - po with AVX-512
// (po = js_po(o)), z = x - o otherwise.
template <int I>
MT_INLINE float js_po(float o) {
  return I == 2 ? o * kLog2e : o;
}
template <int I>
MT_INLINE vf js_arg(vf x, float po) {
  if constexpr (I == 2) {
    return x * kLog2e - po; // one FMA: exact for huge logits too
  } else {
    return x - po;
  }
}
// log sum exp(x - o) - log S, for the stats: S sums 2^u = exp(x - po / log2(e)).
template <int I>
MT_INLINE float js_log_sum_shift(float o) {
  return I == 2 ? float(double(js_po<I>(o)) / double(kLog2e) - double(o)) : 0.f;
}

// e / 2 of js_arg's a. Generic / AVX2: the clamped exps (vexp, vexp_half).
template <typename T, int I>
MT_INLINE vf js_exp(vf a) {
  if constexpr (I == 2) {
    return vexp2_half<std::is_same_v<T, float>>(a);
  } else if constexpr (std::is_same_v<T, float>) {
    return vexp<I, true>(a);
  } else {
    vf unused;
    return vexp_half<I, true>(a, unused);
  }
}

// z - L of js_arg's a.
template <int I>
MT_INLINE vf js_z_minus(vf a, vf L) {
  if constexpr (I == 2) {
    return a * kLn2 - L;
  } else {
    return a - L;
  }
}

template <typename T, int I>
MT_INLINE void js_row_max(const T* qr, const T* pr, int n, float& mq, float& mp) {
  vf vq = splat(-kInf), vp = splat(-kInf);
  for (int j = 0; j < n; j += 2 * W) {
    vf q0, q1, p0, p1;
    load_pair_at<T, I>(qr, j, n, q0, q1);
    load_pair_at<T, I>(pr, j, n, p0, p1);
    vq = vmax(vq, vmax(q0, q1));
    vp = vmax(vp, vmax(p0, p1));
  }
  mq = hmax(vq);
  mp = hmax(vp);
}

// The next row's chunk j of both sides, for the passes over this row: prefetched (PF;
// prefetches do not fault past the end) and folded into its maxima vmq, vmp (NEXT), so
// that the next row's offsets are found while this row's data is loaded anyway.
template <typename T, int I, bool NEXT, bool PF>
MT_INLINE void next_row(const T* qr, const T* pr, int V, int j, vf& vmq, vf& vmp) {
  if constexpr (PF) {
    prefetch(qr + V + j);
    prefetch(pr + V + j);
  }
  if constexpr (NEXT) {
    vf x[4];
    load_pair_at<T, I>(qr + V, j, V, x[0], x[1]);
    load_pair_at<T, I>(pr + V, j, V, x[2], x[3]);
    vmq = vmax(vmq, vmax(x[0], x[1]));
    vmp = vmax(vmp, vmax(x[2], x[3]));
  }
}

// The exp pass over a row: stores e / 2 (CACHE) and returns S / 2, given the offsets oq, op.
// NEXT: also finds the maxima of the row after (loads interleaved with the exp
// arithmetic). PF: prefetches the next row.
template <typename T, int I, bool NEXT, bool CACHE, bool PF>
MT_INLINE void js_exp_pass(const T* qr, const T* pr, int V, float oq, float op, float* row,
                           float& Sq, float& Sp, vf& vmq, vf& vmp) {
  vf sq{}, sp{};
  for (int j = 0; j < V; j += 2 * W) {
    next_row<T, I, NEXT, PF>(qr, pr, V, j, vmq, vmp);
    vf x[4];
    load_pair_at<T, I>(qr, j, V, x[0], x[1]);
    load_pair_at<T, I>(pr, j, V, x[2], x[3]);
    for (int k = 0; k < 4; ++k) {
      vf e = js_exp<T, I>(js_arg<I>(x[k], k < 2 ? oq : op));
      if constexpr (CACHE) {
        vstore(row + 2 * j + k * W, e);
      }
      (k < 2 ? sq : sp) += e;
    }
  }
  Sq = hsum(sq);
  Sp = hsum(sp);
}

// The log pass: sums of e (z - L) / 2 for q and p, given g = S_q / S_p (float32: of
// e_p (z_p + c - L) / 2). CACHE false: e / 2 recomputed as the exp pass did (the same
// bits). NEXT as in the exp pass; PF: prefetches the next row.
template <typename T, int I, bool CACHE, bool NEXT, bool PF>
MT_INLINE void js_log_pass(const T* qr, const T* pr, int V, float oq, float op, float g,
                           float c, const float* row, float& Aq, float& Ap, vf& vmq,
                           vf& vmp) {
  constexpr float kTiny = std::numeric_limits<float>::min();
  vf aq{}, ap{};
  for (int j = 0; j < V; j += 2 * W) {
    next_row<T, I, NEXT, PF>(qr, pr, V, j, vmq, vmp);
    vf x[4];
    load_pair_at<T, I>(qr, j, V, x[0], x[1]);
    load_pair_at<T, I>(pr, j, V, x[2], x[3]);
    // The four exps first, then the two logs: independent chains side by side.
    vf u[4], h[4], L[2];
    for (int k = 0; k < 4; ++k) {
      u[k] = js_arg<I>(x[k], k < 2 ? oq : op);
      h[k] = CACHE ? vload(row + 2 * j + k * W) : js_exp<T, I>(u[k]);
    }
    for (int k = 0; k < 2; ++k) {
      // e = 0 on both sides (-inf logits, or far below the maxima) is log(0) without
      // FLT_MIN, and e * (z - L) NaN for z = -inf without the clamps (e = 0 below them).
      L[k] = vlog_half<I, std::is_same_v<T, float>>(h[2 + k] * g + (h[k] + kTiny));
    }
    for (int k = 0; k < 4; ++k) {
      vf zl = js_z_minus<I>(clamp_lo<I>(u[k], I == 2 ? -160.f : -110.f),
                            k >= 2 && std::is_same_v<T, float> ? L[k - 2] - c : L[k % 2]);
      (k < 2 ? aq : ap) += h[k] * zl;
    }
  }
  Aq = hsum(aq);
  Ap = hsum(ap);
}

// Row r's divergence and stats from the sums of the passes (S and A of e / 2).
template <typename T, int I>
MT_INLINE void js_finish(const Args<T>& a, int64_t r, float mq, float mp, float Sq, float Sp,
                         float Aq, float Ap) {
  Sq *= 2.f; // the buffer and the sums hold e / 2
  Sp *= 2.f;
  const float lsq = std::log(Sq), lsp = std::log(Sp);
  // A fully masked row (S_q = 0) has Q = 0, so M = P / 2: KLq = 0, KLp = log 2.
  float kq = Sq > 0.f ? kLn2 : 0.f, kp = Sp > 0.f ? kLn2 : 0.f;
  if (Sq > 0.f && Sp > 0.f) {
    kq = 2.f * Aq / Sq;
    kp = 2.f * Ap / Sp + (std::is_same_v<T, float> ? 0.f : lsq - lsp);
  } else if (!(Sq >= 0.f && Sp >= 0.f)) { // NaN
    kq = kp = std::numeric_limits<float>::quiet_NaN();
  }
  // The backward only needs an offset for x with lsq = log sum exp(x - offset): a
  // sample's maximum serves.
  const float oq = exp_offset(mq), op = exp_offset(mp);
  a.put_stats(r, mq, lsq + js_log_sum_shift<I>(oq), mp, lsp + js_log_sum_shift<I>(op), kq,
              kp);
  from_float(0.5f * (kq + kp), a.out + r);
}

// Offsets: half types with AVX-512 take the maxima of a sample (the row's first
// elements), which serve as well as the row maxima unless exp overflows (then the row is
// redone from the row maxima). float32 needs the exact maxima (sample offsets can leave z
// and L near 80, where their rounding is 4e-6): with AVX-512 those of row r + 1 are found
// in row r's log pass, whose loads of it serve as the prefetch; generic / AVX2 find them
// in the exp pass. Either way a chunk's first row has a pass of its own.
template <typename T, int I, bool CACHE>
MT_INLINE void js_forward_rows(const Args<T>& a, int64_t r0, int64_t r1) {
  const int V = a.V;
  const int Vp = (V + 2 * W - 1) / (2 * W) * (2 * W);
  thread_local std::vector<float> buf;
  if (CACHE && buf.size() < size_t(2 * Vp)) {
    buf.resize(2 * Vp);
  }
  // Chunk c of 2W elements holds e_q / 2, e_p / 2 (2W each) at 4W c.
  float* row = buf.data();
  constexpr bool kSample = I == 2 && !std::is_same_v<T, float>;
  vf vmq = splat(-kInf), vmp = splat(-kInf), unused;
  bool have_next = false;
  for (int64_t r = r0; r < r1; ++r) {
    const T* qr = a.q + r * V;
    const T* pr = a.p + r * V;
    const bool next = !kSample && r + 1 < r1;
    float mq, mp, Sq = 0.f, Sp = 0.f, Aq = 0.f, Ap = 0.f;
    if (kSample) {
      js_row_max<T, I>(qr, pr, std::min(V, 8 * W), mq, mp);
      if (!(mq > -kInf && mp > -kInf)) { // a masked sample: -inf is no offset for the rest
        js_row_max<T, I>(qr, pr, V, mq, mp);
      }
    } else if (have_next) {
      mq = hmax(vmq);
      mp = hmax(vmp);
    } else {
      js_row_max<T, I>(qr, pr, V, mq, mp);
    }
    vmq = splat(-kInf);
    vmp = splat(-kInf);
    have_next = false;
    float oq = js_po<I>(exp_offset(mq)), op = js_po<I>(exp_offset(mp));
    if constexpr (kSample) {
      js_exp_pass<T, I, false, CACHE, false>(qr, pr, V, oq, op, row, Sq, Sp, unused, unused);
      if (!(Sq > 0.f && Sp > 0.f && Sq < kInf && Sp < kInf)) { // overflow, or a masked side
        js_row_max<T, I>(qr, pr, V, mq, mp);
        oq = js_po<I>(exp_offset(mq));
        op = js_po<I>(exp_offset(mp));
        js_exp_pass<T, I, false, CACHE, false>(qr, pr, V, oq, op, row, Sq, Sp, unused, unused);
      }
    } else if (next && I < 2) {
      js_exp_pass<T, I, true, CACHE, true>(qr, pr, V, oq, op, row, Sq, Sp, vmq, vmp);
      have_next = true;
    } else {
      js_exp_pass<T, I, false, CACHE, I < 2>(qr, pr, V, oq, op, row, Sq, Sp, unused, unused);
    }
    if (Sq > 0.f && Sp > 0.f) {
      const float g = Sq / Sp, c = std::log(Sq) - std::log(Sp);
      if (next && I == 2) {
        js_log_pass<T, I, CACHE, true, false>(qr, pr, V, oq, op, g, c, row, Aq, Ap, vmq, vmp);
        have_next = true;
      } else {
        js_log_pass<T, I, CACHE, false, kSample>(qr, pr, V, oq, op, g, c, row, Aq, Ap, unused,
                                                 unused);
      }
    }
    js_finish<T, I>(a, r, mq, mp, Sq, Sp, Aq, Ap);
  }
}

// JS backward for half types, one pass: Q, P, lm as in the forward, then
// dq = c/2 Q (lq - lm - KLq), dp = c/2 P (lp - lm - KLp). A clamped lq keeps Q = 0 entries
// (-inf logits) at 0 without a mask.
template <typename T, bool GQ, bool GP, int I>
MT_INLINE void js_backward_rows_half(const Args<T>& a, int64_t r0, int64_t r1) {
  const int V = a.V;
  constexpr float kTiny = std::numeric_limits<float>::min();
  for (int64_t r = r0; r < r1; ++r) {
    const T* qr = a.q + r * V;
    const T* pr = a.p + r * V;
    const float* st = a.cstats + r * kDivStats;
    const float mq = st[kMaxQ], lsq = st[kLogSumQ], mp = st[kMaxP], lsp = st[kLogSumP];
    const float oq = exp_offset(mq), lq_off = log_sum_offset(mq, lsq);
    const float op = exp_offset(mp), lp_off = log_sum_offset(mp, lsp);
    const float hc = 0.5f * a.cot[r];
    const float kq = st[kS0], kp = st[kS1];
    for (int j = 0; j < V; j += 2 * W) {
      prefetch(qr + j + kAhead);
      prefetch(pr + j + kAhead);
      vf xq[2], xp[2], g[2][2];
      load_pair_at<T, I>(qr, j, V, xq[0], xq[1]);
      load_pair_at<T, I>(pr, j, V, xp[0], xp[1]);
      for (int k = 0; k < 2; ++k) {
        vf lq, lp;
        vf Q = vexp_half<I>((xq[k] - oq) - lq_off, lq);
        vf P = vexp_half<I>((xp[k] - op) - lp_off, lp);
        vf lm = vlog_half<I>((P + Q) * 0.5f + kTiny); // M > 0 for log
        if constexpr (GQ) {
          g[0][k] = (Q * hc) * ((lq - lm) - kq);
        }
        if constexpr (GP) {
          g[1][k] = (P * hc) * ((lp - lm) - kp);
        }
      }
      if constexpr (GQ) {
        store_pair<T, I>(a.out + r * V + j, g[0][0], g[0][1], V - j);
      }
      if constexpr (GP) {
        store_pair<T, I>(a.out2 + r * V + j, g[1][0], g[1][1], V - j);
      }
    }
  }
}

// ------------------------------------------------------------------ forward
template <typename T, Divergence K, int I>
MT_INLINE void forward_rows(const Args<T>& a, int64_t r0, int64_t r1) {
  if constexpr (K == Divergence::JS) {
    if (a.V <= a.js_cache_max_v) {
      js_forward_rows<T, I, true>(a, r0, r1);
    } else {
      js_forward_rows<T, I, false>(a, r0, r1);
    }
    return;
  }
  alignas(32) float bq[kBlock];
  alignas(32) float bp[kBlock];
  const int V = a.V;
  for (int64_t r = r0; r < r1; ++r) {
    const T* qr = a.q + r * V;
    const T* pr = a.p + r * V;
    float mq = -kInf, mp = -kInf;
    vf sq{}, sp{}, tk{};
    for (int j = 0; j < V; j += kBlock) {
      int n = std::min(kBlock, V - j);
      const float* xq = load_block(qr + j, n, bq);
      const float* xp = load_block(pr + j, n, bp);
      int nv = (n + W - 1) / W;
      vf vmq = splat(-kInf), vmp = splat(-kInf);
      for (int i = 0; i < nv; ++i) {
        vmq = vmax(vmq, vload(xq + i * W));
        vmp = vmax(vmp, vload(xp + i * W));
      }
      float bmq = hmax(vmq), bmp = hmax(vmp);
      // One rescale per block when the running maximum grows (exp(-inf) = 0 at start).
      if (bmq > mq) {
        sq *= std::exp(mq - bmq);
        mq = bmq;
      }
      if (bmp > mp) {
        float s = std::exp(mp - bmp);
        sp *= s;
        tk *= s;
        mp = bmp;
      }
      float oq = exp_offset(mq), op = exp_offset(mp);
      for (int i = 0; i < nv; ++i) {
        vf vq = vload(xq + i * W), vp = vload(xp + i * W);
        prefetch(qr + j + kAhead + i * W);
        prefetch(pr + j + kAhead + i * W);
        vf eq = vexp<I>(vq - oq), ep = vexp<I>(vp - op);
        sq += eq;
        sp += ep;
        tk += vsel(vp > -kInf, ep * (vp - vq), splat(0.f));
      }
    }
    float lsq = std::log(hsum(sq)), lsp = std::log(hsum(sp));
    // sum P (a - b) + lse_q - lse_p, the lse difference taken term by term.
    float div = hsum(tk) / hsum(sp) + ((mq - mp) + (lsq - lsp));
    a.put_stats(r, mq, lsq, mp, lsp, div, 0.f);
    from_float(div, a.out + r);
  }
}

// ------------------------------------------------------------------ backward
template <typename T>
MT_INLINE void store_block(T* dst, const float* src, int n) {
  int i0 = 0;
  if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
    for (; i0 + W <= n; i0 += W) { // round to nearest even; NaN stays a (quiet) NaN
      vu u = (vu)vload(src + i0);
      vu r = (u + 0x7fff + ((u >> 16) & 1)) >> 16;
      vi nan = (vi)(u & 0x7fffffff) > 0x7f800000;
      r = nan ? (u >> 16) | 0x40 : r;
      vh h = __builtin_convertvector(r, vh);
      std::memcpy(dst + i0, &h, sizeof(vh));
    }
  }
  for (int i = i0; i < n; ++i) {
    from_float(src[i], dst + i);
  }
}

template <typename T, Divergence K, bool GQ, bool GP, int I>
MT_INLINE void backward_rows(const Args<T>& a, int64_t r0, int64_t r1) {
  alignas(32) float bq[kBlock];
  alignas(32) float bp[kBlock];
  alignas(32) float gq[kBlock];
  alignas(32) float gp[kBlock];
  const int V = a.V;
  for (int64_t r = r0; r < r1; ++r) {
    const T* qr = a.q + r * V;
    const T* pr = a.p + r * V;
    const float* st = a.cstats + r * kDivStats;
    const float mq = st[kMaxQ], lsq = st[kLogSumQ], mp = st[kMaxP], lsp = st[kLogSumP];
    // A fully masked row (max = -inf) gets lq = -inf everywhere, so Q = 0, not NaN.
    const float oq = exp_offset(mq), lq_off = log_sum_offset(mq, lsq);
    const float op = exp_offset(mp), lp_off = log_sum_offset(mp, lsp);
    const float c = a.cot[r];
    const float half_c = K == Divergence::JS ? 0.5f * c : c;
    if (c == 0.f) { // e.g. a masked padding row, whose logits may be all -inf
      for (int64_t j = 0; j < V; ++j) {
        if constexpr (GQ) {
          from_float(0.f, a.out + r * V + j);
        }
        if constexpr (GP) {
          from_float(0.f, a.out2 + r * V + j);
        }
      }
      continue;
    }
    if constexpr (K == Divergence::JS && !std::is_same_v<T, float>) {
      js_backward_rows_half<T, GQ, GP, I>(a, r, r + 1);
      continue;
    }
    for (int j = 0; j < V; j += kBlock) {
      int n = std::min(kBlock, V - j);
      const float* xq = load_block(qr + j, n, bq);
      const float* xp = load_block(pr + j, n, bp);
      int nv = (n + W - 1) / W;
      for (int i = 0; i < nv; ++i) {
        prefetch(qr + j + kAhead + i * W);
        prefetch(pr + j + kAhead + i * W);
        vf lq = (vload(xq + i * W) - oq) - lq_off;
        vf lp = (vload(xp + i * W) - op) - lp_off;
        vf P = vexp<I>(lp);
        if constexpr (K == Divergence::KL) {
          if constexpr (GQ) {
            vstore(gq + i * W, c * (vexp<I>(lq) - P));
          }
          if constexpr (GP) {
            vf g = P * ((lp - lq) - st[kS0]);
            vstore(gp + i * W, vsel(lp > -kInf, c * g, splat(0.f)));
          }
        } else {
          // Masks as in the forward: Q (P) != 0 only for finite (or NaN) logits.
          vf Q = vexp<I>(lq);
          vf lm = vlog<I>((P + Q) * 0.5f);
          if constexpr (GQ) {
            vf g = Q * ((lq - lm) - st[kS0]);
            vstore(gq + i * W, vsel(Q != 0.f, half_c * g, splat(0.f)));
          }
          if constexpr (GP) {
            vf g = P * ((lp - lm) - st[kS1]);
            vstore(gp + i * W, vsel(P != 0.f, half_c * g, splat(0.f)));
          }
        }
      }
      if constexpr (GQ) {
        store_block(a.out + r * V + j, gq, n);
      }
      if constexpr (GP) {
        store_block(a.out2 + r * V + j, gp, n);
      }
    }
  }
}

// Each entry point is compiled for the generic target and, on x86-64, for AVX2 + FMA;
// the always-inline bodies above take the instruction set of their caller.
#define MT_ENTRIES(SUFFIX, ATTR, I)                                                  \
  template <typename T, Divergence K>                                             \
  ATTR void forward_##SUFFIX(const Args<T>& a, int64_t r0, int64_t r1) {          \
    forward_rows<T, K, I>(a, r0, r1);                                                \
  }                                                                               \
  template <typename T, Divergence K, bool GQ, bool GP>                           \
  ATTR void backward_##SUFFIX(const Args<T>& a, int64_t r0, int64_t r1) {         \
    backward_rows<T, K, GQ, GP, I>(a, r0, r1);                                       \
  }

MT_ENTRIES(generic, , 0)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
MT_ENTRIES(avx2, __attribute__((target("avx2,fma"))), 1)
MT_ENTRIES(avx512, __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), 2)
#endif

} // namespace MT_DIV_NS
} // namespace
} // namespace mlx_tuner
#endif // MT_DIV_BODY
