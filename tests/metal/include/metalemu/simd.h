// Barriers and SIMD-group functions (simdgroup size 32). Every simd_* call is a
// collective: the lane deposits its value and parks until all live lanes of its
// simdgroup have done the same; lanes that exited do not take part (their slots are
// poisoned), which matches a GPU's inactive lanes.
#pragma once

namespace metal {

enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
METAL_FUNC constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(uint(a) | uint(b));
}
METAL_FUNC void threadgroup_barrier(mem_flags f) { metalemu::barrier((unsigned)f); }
METAL_FUNC void simdgroup_barrier(mem_flags) {
  uint32_t m;
  metalemu::simd_exchange(nullptr, 0, &m);
}

namespace detail {
// One simdgroup collective: all live lanes' values of type T.
template <class T>
struct Collective {
  const unsigned char* slots;
  uint32_t active;
  uint lane;
  explicit Collective(const T& x) {
    static_assert(sizeof(T) <= metalemu::kSlot, "simd_* value too large for the emulator");
    slots = metalemu::simd_exchange(&x, sizeof(T), &active);
    lane = metalemu::lane()->thread_index_in_simdgroup;
  }
  T at(uint i) const {
    T v;
    std::memcpy((void*)&v, slots + (i & 31) * metalemu::kSlot, sizeof(T));
    return v;
  }
  bool live(uint i) const { return (active >> (i & 31)) & 1u; }
  uint first() const { return __builtin_ctz(active); }
  // Folds f over the live lanes in [0, end).
  template <class F>
  T fold(T init, uint end, F f) const {
    T r = init;
    for (uint i = 0; i < end; i++)
      if (live(i)) r = f(r, at(i));
    return r;
  }
};
}  // namespace detail

#define METALEMU_SIMD_FOLD(NAME, INIT, OP)                                           \
  template <class T>                                                                 \
  METAL_FUNC T simd_##NAME(T x) {                                                    \
    detail::Collective<T> c(x);                                                      \
    return c.fold(c.at(c.first()), 32, [&](T a, T b) { return OP; });                \
  }                                                                                  \
  template <class T>                                                                 \
  METAL_FUNC T simd_prefix_inclusive_##NAME(T x) {                                   \
    detail::Collective<T> c(x);                                                      \
    return c.fold(INIT, c.lane + 1, [&](T a, T b) { return OP; });                   \
  }                                                                                  \
  template <class T>                                                                 \
  METAL_FUNC T simd_prefix_exclusive_##NAME(T x) {                                   \
    detail::Collective<T> c(x);                                                      \
    return c.fold(INIT, c.lane, [&](T a, T b) { return OP; });                       \
  }
// simd_sum folds from lane 0's value: the first fold step is a + a, so start at 0.
template <class T>
METAL_FUNC T simd_sum(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(0), 32, [](T a, T b) { return T(a + b); });
}
template <class T>
METAL_FUNC T simd_prefix_inclusive_sum(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(0), c.lane + 1, [](T a, T b) { return T(a + b); });
}
template <class T>
METAL_FUNC T simd_prefix_exclusive_sum(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(0), c.lane, [](T a, T b) { return T(a + b); });
}
template <class T>
METAL_FUNC T simd_product(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(1), 32, [](T a, T b) { return T(a * b); });
}
template <class T>
METAL_FUNC T simd_prefix_inclusive_product(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(1), c.lane + 1, [](T a, T b) { return T(a * b); });
}
template <class T>
METAL_FUNC T simd_prefix_exclusive_product(T x) {
  detail::Collective<T> c(x);
  return c.fold(T(1), c.lane, [](T a, T b) { return T(a * b); });
}
template <class T>
METAL_FUNC T simd_max(T x) {
  detail::Collective<T> c(x);
  return c.fold(c.at(c.first()), 32, [](T a, T b) { return max(a, b); });
}
template <class T>
METAL_FUNC T simd_min(T x) {
  detail::Collective<T> c(x);
  return c.fold(c.at(c.first()), 32, [](T a, T b) { return min(a, b); });
}
template <class T>
METAL_FUNC T simd_and(T x) {
  if constexpr (is_floating_point_v<T>) {  // bitwise on the representation
    using U = std::conditional_t<sizeof(T) == 2, ushort, uint>;
    return as_type<T>(simd_and(as_type<U>(x)));
  } else {
    detail::Collective<T> c(x);
    return c.fold(T(~T(0)), 32, [](T a, T b) { return T(a & b); });
  }
}
template <class T>
METAL_FUNC T simd_or(T x) {
  if constexpr (is_floating_point_v<T>) {  // bitwise on the representation
    using U = std::conditional_t<sizeof(T) == 2, ushort, uint>;
    return as_type<T>(simd_or(as_type<U>(x)));
  } else {
    detail::Collective<T> c(x);
    return c.fold(T(0), 32, [](T a, T b) { return T(a | b); });
  }
}
template <class T>
METAL_FUNC T simd_xor(T x) {
  if constexpr (is_floating_point_v<T>) {  // bitwise on the representation
    using U = std::conditional_t<sizeof(T) == 2, ushort, uint>;
    return as_type<T>(simd_xor(as_type<U>(x)));
  } else {
    detail::Collective<T> c(x);
    return c.fold(T(0), 32, [](T a, T b) { return T(a ^ b); });
  }
}
#undef METALEMU_SIMD_FOLD

// Shuffles read another lane's value; reading an inactive lane gives poison (NaN / -1).
template <class T>
METAL_FUNC T simd_shuffle(T x, ushort lane) {
  detail::Collective<T> c(x);
  return c.at(lane);
}
template <class T>
METAL_FUNC T simd_broadcast(T x, ushort lane) {
  detail::Collective<T> c(x);
  return c.at(lane);
}
template <class T>
METAL_FUNC T simd_broadcast_first(T x) {
  detail::Collective<T> c(x);
  return c.at(c.first());
}
template <class T>
METAL_FUNC T simd_shuffle_xor(T x, ushort mask) {
  detail::Collective<T> c(x);
  return c.at(c.lane ^ mask);
}
template <class T>
METAL_FUNC T simd_shuffle_down(T x, ushort delta) {
  detail::Collective<T> c(x);
  return c.lane + delta < 32 ? c.at(c.lane + delta) : x;
}
template <class T>
METAL_FUNC T simd_shuffle_up(T x, ushort delta) {
  detail::Collective<T> c(x);
  return c.lane >= delta ? c.at(c.lane - delta) : x;
}
template <class T>
METAL_FUNC T simd_shuffle_rotate_down(T x, ushort delta) {
  detail::Collective<T> c(x);
  return c.at((c.lane + delta) & 31);
}
template <class T>
METAL_FUNC T simd_shuffle_rotate_up(T x, ushort delta) {
  detail::Collective<T> c(x);
  return c.at((c.lane + 32 - (delta & 31)) & 31);
}
// Shift within groups of `width` lanes, filling from `fill` of the neighbouring slots.
template <class T>
METAL_FUNC T simd_shuffle_and_fill_down(T x, T fill, ushort delta, ushort width = 32) {
  struct P { T x, f; } p{x, fill};
  detail::Collective<P> c(p);
  uint l = c.lane % width, base = c.lane - l;
  return l + delta < width ? c.at(base + l + delta).x : c.at(base + l + delta - width).f;
}
template <class T>
METAL_FUNC T simd_shuffle_and_fill_up(T x, T fill, ushort delta, ushort width = 32) {
  struct P { T x, f; } p{x, fill};
  detail::Collective<P> c(p);
  uint l = c.lane % width, base = c.lane - l;
  return l >= delta ? c.at(base + l - delta).x : c.at(base + width + l - delta).f;
}

struct simd_vote {
  using vote_t = ulong;
  vote_t v;
  explicit constexpr operator vote_t() const { return v; }
  bool all() const { return v == 0xFFFFFFFFul; }
  bool any() const { return v != 0; }
};
METAL_FUNC simd_vote simd_ballot(bool b) {
  detail::Collective<bool> c(b);
  ulong m = 0;
  for (uint i = 0; i < 32; i++)
    if (c.live(i) && c.at(i)) m |= 1ul << i;
  return simd_vote{m};
}
METAL_FUNC simd_vote simd_active_threads_mask() {
  detail::Collective<bool> c(true);
  return simd_vote{(ulong)c.active};
}
METAL_FUNC bool simd_all(bool b) {
  detail::Collective<bool> c(b);
  for (uint i = 0; i < 32; i++)
    if (c.live(i) && !c.at(i)) return false;
  return true;
}
METAL_FUNC bool simd_any(bool b) {
  detail::Collective<bool> c(b);
  for (uint i = 0; i < 32; i++)
    if (c.live(i) && c.at(i)) return true;
  return false;
}
METAL_FUNC bool simd_is_first() {
  detail::Collective<bool> c(true);
  return c.lane == c.first();
}

// quad_*: the same within groups of four lanes.
template <class T>
METAL_FUNC T quad_shuffle(T x, ushort lane) {
  detail::Collective<T> c(x);
  return c.at((c.lane & ~3u) + (lane & 3));
}
template <class T>
METAL_FUNC T quad_shuffle_xor(T x, ushort mask) {
  detail::Collective<T> c(x);
  return c.at((c.lane & ~3u) + ((c.lane ^ mask) & 3));
}
template <class T>
METAL_FUNC T quad_sum(T x) {
  detail::Collective<T> c(x);
  T r = T(0);
  for (uint i = c.lane & ~3u; i < (c.lane & ~3u) + 4; i++)
    if (c.live(i)) r = r + c.at(i);
  return r;
}

struct os_log {
  constexpr os_log(const char*, const char*) {}
  template <class... A>
  void log_debug(const char*, A...) const {}
  template <class... A>
  void log_info(const char*, A...) const {}
  template <class... A>
  void log_error(const char*, A...) const {}
};

}  // namespace metal

#define METALEMU_S1(NAME) \
  template <class T> METAL_FUNC T __metal_simd_##NAME(T x) { return metal::simd_##NAME(x); }
METALEMU_S1(sum) METALEMU_S1(product) METALEMU_S1(max) METALEMU_S1(min) METALEMU_S1(xor)
METALEMU_S1(and) METALEMU_S1(or) METALEMU_S1(prefix_inclusive_sum)
METALEMU_S1(prefix_exclusive_sum) METALEMU_S1(prefix_inclusive_product)
METALEMU_S1(prefix_exclusive_product) METALEMU_S1(broadcast_first)
#undef METALEMU_S1
#define METALEMU_S2(NAME)                                     \
  template <class T, class U>                                 \
  METAL_FUNC T __metal_simd_##NAME(T x, U l) {                \
    return metal::simd_##NAME(x, (ushort)l);                  \
  }
METALEMU_S2(shuffle) METALEMU_S2(shuffle_xor) METALEMU_S2(shuffle_up)
METALEMU_S2(shuffle_down) METALEMU_S2(shuffle_rotate_up) METALEMU_S2(shuffle_rotate_down)
METALEMU_S2(broadcast)
#undef METALEMU_S2
template <class T, class U, class W = ushort>
METAL_FUNC T __metal_simd_shuffle_and_fill_down(T x, T fill, U delta, W width = 32) {
  return metal::simd_shuffle_and_fill_down(x, fill, (ushort)delta, (ushort)width);
}
template <class T, class U, class W = ushort>
METAL_FUNC T __metal_simd_shuffle_and_fill_up(T x, T fill, U delta, W width = 32) {
  return metal::simd_shuffle_and_fill_up(x, fill, (ushort)delta, (ushort)width);
}
template <class U = ushort>
METAL_FUNC ushort __metal_get_thread_index_in_simdgroup(U = 0) {
  return (ushort)metalemu::lane()->thread_index_in_simdgroup;
}
template <class U = ushort>
METAL_FUNC ushort __metal_get_simdgroup_size(U = 0) { return 32; }
