// Planted address-space mistakes: each must be a compile error, as under Apple's compiler.
#include <metal_stdlib>
using namespace metal;

float first(threadgroup const float* p) { return p[0]; }

[[kernel]] void address_space_bug(
    device const float* x [[buffer(0)]],
    device float* y [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
#if defined(BUG_DEVICE_AS_THREADGROUP)
  y[gid] = first(x);  // a device pointer where a threadgroup pointer is expected
#elif defined(BUG_DROPPED_QUALIFIER)
  const float* p = x;  // a thread (default) pointer to device memory
  y[gid] = p[gid];
#elif defined(BUG_WRITE_CONST)
  x[gid] = 0.0f;  // writing through `device const`
#else
  y[gid] = x[gid];
#endif
}
