// MSL atomics. Lanes switch only at sync points, so a read-modify-write is atomic by
// construction; the emulator cannot show memory-ordering bugs (see README).
#pragma once

namespace metal {

enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release,
                    memory_order_acq_rel, memory_order_seq_cst };

template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;

template <class A, class T>
METAL_FUNC void atomic_store_explicit(A obj, T v, memory_order) { obj->value = v; }
template <class A>
METAL_FUNC auto atomic_load_explicit(A obj, memory_order) { return obj->value; }
template <class A, class T>
METAL_FUNC auto atomic_exchange_explicit(A obj, T v, memory_order) {
  auto old = obj->value;
  obj->value = v;
  return old;
}
template <class A, class P, class T>
METAL_FUNC bool atomic_compare_exchange_weak_explicit(A obj, P expected, T desired,
                                                      memory_order, memory_order) {
  if (obj->value == *expected) {
    obj->value = desired;
    return true;
  }
  *expected = obj->value;
  return false;
}
#define METALEMU_ATOMIC_RMW(NAME, EXPR)                                    \
  template <class A, class T>                                              \
  METAL_FUNC auto atomic_fetch_##NAME##_explicit(A obj, T v, memory_order) { \
    auto old = obj->value;                                                 \
    using V = decltype(old);                                               \
    V b = V(v);                                                            \
    obj->value = (EXPR);                                                   \
    return old;                                                            \
  }
METALEMU_ATOMIC_RMW(add, V(old + b))
METALEMU_ATOMIC_RMW(sub, V(old - b))
METALEMU_ATOMIC_RMW(max, old < b ? b : old)
METALEMU_ATOMIC_RMW(min, b < old ? b : old)
METALEMU_ATOMIC_RMW(and, V(old & b))
METALEMU_ATOMIC_RMW(or, V(old | b))
METALEMU_ATOMIC_RMW(xor, V(old ^ b))
#undef METALEMU_ATOMIC_RMW

}  // namespace metal
