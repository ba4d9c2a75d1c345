// MSL scalar and vector types, type traits, numeric_limits, as_type.
// half = _Float16, bfloat = __bf16, vectors = clang ext_vector_type (swizzles work).
#pragma once

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;

#define METALEMU_VEC(T)                                  \
  typedef T T##2 __attribute__((ext_vector_type(2)));    \
  typedef T T##3 __attribute__((ext_vector_type(3)));    \
  typedef T T##4 __attribute__((ext_vector_type(4)));    \
  typedef T packed_##T##2 __attribute__((ext_vector_type(2))); \
  typedef T packed_##T##4 __attribute__((ext_vector_type(4)));
METALEMU_VEC(float)
METALEMU_VEC(half)
METALEMU_VEC(bfloat)
METALEMU_VEC(int)
METALEMU_VEC(uint)
METALEMU_VEC(short)
METALEMU_VEC(ushort)
METALEMU_VEC(char)
METALEMU_VEC(uchar)
METALEMU_VEC(long)
METALEMU_VEC(ulong)
METALEMU_VEC(bool)
#undef METALEMU_VEC
struct packed_float3 { float x, y, z; };

namespace metal {

template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

template <class T>
struct vec_traits {
  static constexpr int n = 1;
  using elem = T;
};
template <class E, int N>
struct vec_traits<E __attribute__((ext_vector_type(N)))> {
  static constexpr int n = N;
  using elem = E;
};
template <class T>
constexpr bool is_vector_v = vec_traits<std::remove_cv_t<T>>::n > 1;
template <class T>
constexpr bool is_half_or_bfloat_v = std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
template <class T>
struct is_floating_point
    : std::integral_constant<bool, std::is_floating_point_v<std::remove_cv_t<T>> ||
                                       is_half_or_bfloat_v<std::remove_cv_t<T>>> {};
template <class T>
constexpr bool is_floating_point_v = is_floating_point<T>::value;
template <class T>
struct is_arithmetic
    : std::integral_constant<bool, std::is_arithmetic_v<T> || is_floating_point_v<T>> {};
template <class T>
constexpr bool is_arithmetic_v = is_arithmetic<T>::value;
template <class T>
struct is_scalar : std::integral_constant<bool, is_arithmetic_v<T>> {};
template <class T>
constexpr bool is_scalar_v = is_scalar<T>::value;
template <class T>
struct is_signed : std::integral_constant<bool, std::is_signed_v<T> || is_floating_point_v<T>> {};
template <class T>
constexpr bool is_signed_v = is_signed<T>::value;

using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_convertible;
using std::is_convertible_v;
using std::is_integral;
using std::is_integral_v;
using std::is_pointer;
using std::is_pointer_v;
using std::is_same;
using std::is_same_v;
using std::is_unsigned;
using std::is_unsigned_v;
using std::is_void_v;
using std::make_signed;
using std::make_signed_t;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_reference;
using std::remove_reference_t;
using std::true_type;
using std::bool_constant;
using std::declval;
// MSL's address-space traits.
template <class T>
struct remove_addrspace { using type = T; };
template <class T>
struct remove_addrspace<device T> { using type = T; };
template <class T>
struct remove_addrspace<constant T> { using type = T; };
template <class T>
struct remove_addrspace<threadgroup T> { using type = T; };
template <class T>
using remove_addrspace_t = typename remove_addrspace<T>::type;

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr half max() { return (half)65504.0f; }
  static constexpr half min() { return (half)6.103515625e-05f; }
  static constexpr half lowest() { return (half)-65504.0f; }
  static constexpr half epsilon() { return (half)0.0009765625f; }
  static constexpr half infinity() { return (half)__builtin_huge_valf(); }
  static constexpr half quiet_NaN() { return (half)__builtin_nanf(""); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr bfloat max() { return __builtin_bit_cast(bfloat, (unsigned short)0x7F7F); }
  static constexpr bfloat min() { return __builtin_bit_cast(bfloat, (unsigned short)0x0080); }
  static constexpr bfloat lowest() { return __builtin_bit_cast(bfloat, (unsigned short)0xFF7F); }
  static constexpr bfloat epsilon() { return __builtin_bit_cast(bfloat, (unsigned short)0x3C00); }
  static constexpr bfloat infinity() { return __builtin_bit_cast(bfloat, (unsigned short)0x7F80); }
  static constexpr bfloat quiet_NaN() { return __builtin_bit_cast(bfloat, (unsigned short)0x7FC0); }
};

template <class To, class From>
METAL_FUNC constexpr To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  return __builtin_bit_cast(To, x);
}

}  // namespace metal

namespace metalemu {
// MSL vector construction: float4(a, b, c, d), float4(x) (splat), float4(half4) (value
// conversion), float4(float2, z, w). The rewriter turns `float4(` into `make<float4>(`.
template <class V, class... A>
METAL_FUNC constexpr V make(A... a) {
  using E = typename metal::vec_traits<V>::elem;
  constexpr int N = metal::vec_traits<V>::n;
  if constexpr (N == 1) {
    static_assert(sizeof...(A) == 1, "scalar constructor takes one value");
    return (V)(a, ...);
  } else if constexpr (sizeof...(A) == 0) {
    return V{};
  } else if constexpr (sizeof...(A) == 1 && (metal::is_vector_v<A> && ...)) {
    auto v = (a, ...);
    return __builtin_convertvector(v, V);
  } else if constexpr (sizeof...(A) == 1) {
    V r{};
    for (int i = 0; i < N; i++) r[i] = (E)(a, ...);
    return r;
  } else {
    E tmp[N + 8] = {};
    int k = 0;
    auto put = [&](auto x) {
      using X = decltype(x);
      if constexpr (metal::is_vector_v<X>) {
        for (int i = 0; i < metal::vec_traits<X>::n; i++) tmp[k++] = (E)x[i];
      } else {
        tmp[k++] = (E)x;
      }
    };
    (put(a), ...);
    V r{};
    for (int i = 0; i < N; i++) r[i] = tmp[i];
    return r;
  }
}
}  // namespace metalemu
