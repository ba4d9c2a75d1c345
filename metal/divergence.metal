// Instantiations of the divergence kernels (templates in metal/divergence.h). Names
// match metal_launch_divergence_{forward,backward} in csrc/ops/divergence.cpp.
#include <metal_stdlib> // first: the emulator defines __METAL_VERSION__ in it

#include "metal/divergence.h"

using namespace divergence_metal;

#define DIV_KERNEL(name, ...) \
  template [[host_name(name)]] [[kernel]] decltype(__VA_ARGS__) __VA_ARGS__;

#define DIV_ALL(op, kind, tname, T)                                                   \
  DIV_KERNEL(#op "_forward_" #tname, divergence_forward<T, kind>)                     \
  DIV_KERNEL(#op "_backward_dq_" #tname, divergence_backward<T, kind, true, false>)   \
  DIV_KERNEL(#op "_backward_dp_" #tname, divergence_backward<T, kind, false, true>)   \
  DIV_KERNEL(#op "_backward_dqdp_" #tname, divergence_backward<T, kind, true, true>)

#define DIV_TYPES(op, kind)           \
  DIV_ALL(op, kind, float32, float)   \
  DIV_ALL(op, kind, float16, half)    \
  DIV_ALL(op, kind, bfloat16, bfloat)

DIV_TYPES(kl_div, 0)
DIV_TYPES(js_div, 1)
