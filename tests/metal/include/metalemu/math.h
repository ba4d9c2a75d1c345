// MSL math (metal::, metal::fast::, metal::precise::) and the __metal_* builtins that
// MLX's bf16_math.h calls. Scalars compute in float (the C library's correctly rounded
// functions): `fast::` precision differences against Apple GPUs are NOT emulated.
// Builtins, not <cmath>: MSL has no C math in the global namespace (MLX defines its own
// log1p there). Templates, so MLX's own non-template bfloat overloads win overload resolution.
#pragma once

namespace metal {

template <class T>
constexpr bool is_fp_scalar_v = is_floating_point_v<T> && !is_vector_v<T>;

#define METALEMU_UNARY(NAME, EXPR)                                        \
  template <class T, std::enable_if_t<is_fp_scalar_v<T>, int> = 0>        \
  METAL_FUNC T NAME(T x) {                                                \
    float v = (float)x;                                                   \
    return (T)(EXPR);                                                     \
  }                                                                       \
  template <class T, std::enable_if_t<is_vector_v<T>, int> = 0>           \
  METAL_FUNC T NAME(T x) {                                                \
    T r;                                                                  \
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = NAME(x[i]);         \
    return r;                                                             \
  }
#define METALEMU_UNARY_LIST(X)                                                         \
  X(exp, __builtin_expf(v)) X(exp2, __builtin_exp2f(v)) X(exp10, __builtin_powf(10.0f, v))               \
  X(log, __builtin_logf(v)) X(log2, __builtin_log2f(v)) X(log10, __builtin_log10f(v))                    \
  X(sqrt, __builtin_sqrtf(v)) X(rsqrt, 1.0f / __builtin_sqrtf(v)) X(sin, __builtin_sinf(v))              \
  X(cos, __builtin_cosf(v)) X(tan, __builtin_tanf(v)) X(asin, __builtin_asinf(v)) X(acos, __builtin_acosf(v))  \
  X(atan, __builtin_atanf(v)) X(sinh, __builtin_sinhf(v)) X(cosh, __builtin_coshf(v))                    \
  X(tanh, __builtin_tanhf(v)) X(asinh, __builtin_asinhf(v)) X(acosh, __builtin_acoshf(v))                \
  X(atanh, __builtin_atanhf(v)) X(floor, __builtin_floorf(v)) X(ceil, __builtin_ceilf(v))                \
  X(round, __builtin_roundf(v)) X(rint, __builtin_rintf(v)) X(trunc, __builtin_truncf(v))                \
  X(fabs, __builtin_fabsf(v)) X(fract, v - __builtin_floorf(v)) X(sinpi, __builtin_sinf(3.14159265358979f * v)) \
  X(cospi, __builtin_cosf(3.14159265358979f * v)) X(tanpi, __builtin_tanf(3.14159265358979f * v))  \
  X(saturate, __builtin_fminf(__builtin_fmaxf(v, 0.0f), 1.0f))                                     \
  X(sign, v > 0 ? 1.0f : v < 0 ? -1.0f : v)
METALEMU_UNARY_LIST(METALEMU_UNARY)

#define METALEMU_BINARY(NAME, EXPR)                                       \
  template <class T, std::enable_if_t<is_fp_scalar_v<T>, int> = 0>        \
  METAL_FUNC T NAME(T x, T y) {                                           \
    float a = (float)x, b = (float)y;                                     \
    return (T)(EXPR);                                                     \
  }                                                                       \
  template <class T, std::enable_if_t<is_vector_v<T>, int> = 0>           \
  METAL_FUNC T NAME(T x, T y) {                                           \
    T r;                                                                  \
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = NAME(x[i], y[i]);   \
    return r;                                                             \
  }
#define METALEMU_BINARY_LIST(X)                                                      \
  X(pow, __builtin_powf(a, b)) X(powr, __builtin_powf(a, b)) X(fmod, __builtin_fmodf(a, b))           \
  X(atan2, __builtin_atan2f(a, b)) X(copysign, __builtin_copysignf(a, b)) X(fdim, __builtin_fdimf(a, b)) \
  X(fmax, __builtin_fmaxf(a, b)) X(fmin, __builtin_fminf(a, b)) X(nextafter, __builtin_nextafterf(a, b)) \
  X(step, b < a ? 0.0f : 1.0f) X(divide, a / b)
METALEMU_BINARY_LIST(METALEMU_BINARY)

// One namespace per precision; the emulator computes both the same way.
namespace fast {
#define METALEMU_USING(NAME, EXPR) using metal::NAME;
METALEMU_UNARY_LIST(METALEMU_USING)
METALEMU_BINARY_LIST(METALEMU_USING)
}  // namespace fast
namespace precise {
METALEMU_UNARY_LIST(METALEMU_USING)
METALEMU_BINARY_LIST(METALEMU_USING)
}  // namespace precise
#undef METALEMU_USING

// abs/max/min/clamp for every arithmetic type and vector; float max/min ignore NaN
// like MSL's fmax/fmin.
template <class T>
METAL_FUNC T abs(T x) {
  if constexpr (is_vector_v<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = abs(x[i]);
    return r;
  } else {
    return x < T(0) ? T(-x) : x;
  }
}
template <class T>
METAL_FUNC T max(T a, T b) {
  if constexpr (is_vector_v<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = max(a[i], b[i]);
    return r;
  } else if constexpr (is_floating_point_v<T>) {
    return (T)__builtin_fmaxf((float)a, (float)b);
  } else {
    return a < b ? b : a;
  }
}
template <class T>
METAL_FUNC T min(T a, T b) {
  if constexpr (is_vector_v<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = min(a[i], b[i]);
    return r;
  } else if constexpr (is_floating_point_v<T>) {
    return (T)__builtin_fminf((float)a, (float)b);
  } else {
    return b < a ? b : a;
  }
}
// Mixed-type calls (max(h, 0.0f)) resolve to the common type, as MSL's promotions do.
template <class A, class B, std::enable_if_t<!std::is_same_v<A, B> && !is_vector_v<A> && !is_vector_v<B>, int> = 0>
METAL_FUNC auto max(A a, B b) {
  using C = decltype(a + b);
  return max(C(a), C(b));
}
template <class A, class B, std::enable_if_t<!std::is_same_v<A, B> && !is_vector_v<A> && !is_vector_v<B>, int> = 0>
METAL_FUNC auto min(A a, B b) {
  using C = decltype(a + b);
  return min(C(a), C(b));
}
template <class T, class U, class V>
METAL_FUNC T clamp(T x, U lo, V hi) {
  return min(max(x, T(lo)), T(hi));
}
template <class T>
METAL_FUNC T fma(T a, T b, T c) {
  if constexpr (is_vector_v<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = fma(a[i], b[i], c[i]);
    return r;
  } else {
    return (T)__builtin_fmaf((float)a, (float)b, (float)c);
  }
}
template <class T, class U>
METAL_FUNC T mix(T x, T y, U a) {
  return x + (y - x) * a;
}
template <class T, class C>
METAL_FUNC T select(T a, T b, C c) {
  if constexpr (is_vector_v<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::n; i++) r[i] = c[i] ? b[i] : a[i];
    return r;
  } else {
    return c ? b : a;
  }
}
template <class T>
METAL_FUNC T fmedian3(T a, T b, T c) {
  return max(min(a, b), min(max(a, b), c));
}
template <class T>
METAL_FUNC bool isnan(T x) { return x != x; }
template <class T>
METAL_FUNC bool isinf(T x) { return __builtin_isinf((float)x); }
template <class T>
METAL_FUNC bool isfinite(T x) { return __builtin_isfinite((float)x); }
template <class T>
METAL_FUNC bool signbit(T x) { return __builtin_signbit((float)x); }
template <class T>
METAL_FUNC typename vec_traits<T>::elem dot(T a, T b) {
  typename vec_traits<T>::elem s = 0;
  for (int i = 0; i < vec_traits<T>::n; i++) s += a[i] * b[i];
  return s;
}
template <class T>
METAL_FUNC bool all(T v) {
  if constexpr (is_vector_v<T>) {
    for (int i = 0; i < vec_traits<T>::n; i++)
      if (!v[i]) return false;
    return true;
  } else {
    return bool(v);
  }
}
template <class T>
METAL_FUNC bool any(T v) {
  if constexpr (is_vector_v<T>) {
    for (int i = 0; i < vec_traits<T>::n; i++)
      if (v[i]) return true;
    return false;
  } else {
    return bool(v);
  }
}
template <class T>
METAL_FUNC T ldexp(T x, int e) { return (T)__builtin_ldexpf((float)x, e); }
template <class T, class I>
METAL_FUNC T frexp(T x, thread I& e) {
  int k;
  T r = (T)__builtin_frexpf((float)x, &k);
  e = k;
  return r;
}
METAL_FUNC uint popcount(uint x) { return __builtin_popcount(x); }
METAL_FUNC int popcount(int x) { return __builtin_popcount((uint)x); }
METAL_FUNC ulong popcount(ulong x) { return __builtin_popcountl(x); }
METAL_FUNC uint clz(uint x) { return x ? __builtin_clz(x) : 32; }
METAL_FUNC uint ctz(uint x) { return x ? __builtin_ctz(x) : 32; }
METAL_FUNC uint mulhi(uint a, uint b) { return (uint)(((ulong)a * b) >> 32); }
METAL_FUNC int mulhi(int a, int b) { return (int)(((long)a * b) >> 32); }
METAL_FUNC uint extract_bits(uint x, uint off, uint bits) {
  return bits == 32 ? x : (x >> off) & ((1u << bits) - 1);
}
METAL_FUNC uint reverse_bits(uint x) {
  uint r = 0;
  for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

}  // namespace metal

// ---- Apple-internal builtins that MLX's bf16_math.h calls (args: value..., fast flag)
#define METALEMU_B1(NAME, EXPR) \
  template <class T> METAL_FUNC T __metal_##NAME(T x, int = 0) { float v = (float)x; return (T)(EXPR); }
METALEMU_UNARY_LIST(METALEMU_B1)
METALEMU_B1(log1p, __builtin_log1pf(v)) METALEMU_B1(expm1, __builtin_expm1f(v))
#undef METALEMU_B1
#define METALEMU_B2(NAME, EXPR) \
  template <class T, class U> METAL_FUNC T __metal_##NAME(T x, U y, int = 0) { float a = (float)x, b = (float)y; return (T)(EXPR); }
METALEMU_BINARY_LIST(METALEMU_B2)
METALEMU_B2(ldexp, __builtin_ldexpf(a, (int)b))
#undef METALEMU_B2
template <class T>
METAL_FUNC T __metal_fma(T a, T b, T c, int = 0) { return (T)__builtin_fmaf((float)a, (float)b, (float)c); }
template <class T>
METAL_FUNC T __metal_fmax3(T a, T b, T c, int = 0) { return metal::max(metal::max(a, b), c); }
template <class T>
METAL_FUNC T __metal_fmin3(T a, T b, T c, int = 0) { return metal::min(metal::min(a, b), c); }
template <class T>
METAL_FUNC T __metal_fmedian3(T a, T b, T c, int = 0) { return metal::fmedian3(a, b, c); }
template <class T, class I>
METAL_FUNC T __metal_frexp(T x, I* e) {
  int k;
  T r = (T)__builtin_frexpf((float)x, &k);
  *e = k;
  return r;
}
