// Instantiations of the divergence kernels (templates in metal/divergence.h). Names
// match metal_launch_divergence_{forward,backward} in csrc/ops/divergence.cpp.
#include "metal/divergence.h"

using namespace divergence_metal;

#define DIV_FORWARD(op, kind, tname, T)                                          \
  template [[host_name(#op "_forward_" #tname)]] [[kernel]] void                \
  divergence_forward<T, kind>(                                                  \
      const device T*, const device T*, device T*, device float*, constant int&, \
      uint3, uint3, uint3, uint, uint);

#define DIV_BACKWARD(op, kind, which, gq, gp, tname, T)                          \
  template [[host_name(#op "_backward_" #which "_" #tname)]] [[kernel]] void     \
  divergence_backward<T, kind, gq, gp>(                                          \
      const device T*, const device T*, const device float*, const device float*, \
      device T*, device T*, constant int&, uint3, uint3, uint3);

#define DIV_ALL(op, kind, tname, T)                      \
  DIV_FORWARD(op, kind, tname, T)                        \
  DIV_BACKWARD(op, kind, dq, true, false, tname, T)      \
  DIV_BACKWARD(op, kind, dp, false, true, tname, T)      \
  DIV_BACKWARD(op, kind, dqdp, true, true, tname, T)

#define DIV_TYPES(op, kind)           \
  DIV_ALL(op, kind, float32, float)   \
  DIV_ALL(op, kind, float16, half)    \
  DIV_ALL(op, kind, bfloat16, bfloat)

DIV_TYPES(kl_div, 0)
DIV_TYPES(js_div, 1)
