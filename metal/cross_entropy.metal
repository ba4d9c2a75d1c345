// Instantiations of metal/cross_entropy.h: kernel × dtype.
#include "metal/cross_entropy.h"

#define LCE_INSTANTIATE(name, T)                                              \
  template [[host_name("lce_forward_" #name)]] [[kernel]] decltype(lce_forward<T>) \
      lce_forward<T>;                                                         \
  template [[host_name("lce_backward_dh_" #name)]] [[kernel]]                 \
  decltype(lce_backward_dh<T>) lce_backward_dh<T>;                            \
  template [[host_name("lce_backward_dw_" #name)]] [[kernel]]                 \
  decltype(lce_backward_dw<T>) lce_backward_dw<T>;

LCE_INSTANTIATE(float32, float)
LCE_INSTANTIATE(float16, half)
LCE_INSTANTIATE(bfloat16, bfloat)
