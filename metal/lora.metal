// Instantiations of the LoRA kernels (templates in lora.h): activation dtype T x LoRA
// parameter dtype U (T itself or float32) x bias / which backward pairs. Names are built
// by the host's metal_launch_lora_* functions (csrc/ops/lora.cpp).
#include "lora.h"

#define LORA_INSTANTIATE(name, ...) \
  template [[host_name(name)]] [[kernel]] decltype(__VA_ARGS__) __VA_ARGS__;

#define LORA_XA(tn, T, un, U) LORA_INSTANTIATE("lora_xa_" #tn "_" #un, lora_xa<T, U>)
#define LORA_LINEAR(tn, T, un, U)                                                        \
  LORA_INSTANTIATE("lora_linear_" #tn "_" #un "_bias", lora_linear<T, U, true>)         \
  LORA_INSTANTIATE("lora_linear_" #tn "_" #un "_nobias", lora_linear<T, U, false>)
#define LORA_BACKWARD(tn, T, un, U)                                                      \
  LORA_INSTANTIATE("lora_g_" #tn "_" #un, lora_g<T, U>)                                 \
  LORA_INSTANTIATE("lora_dx_" #tn "_" #un, lora_dx<T, U, true, true>)                   \
  LORA_INSTANTIATE("lora_dxd_" #tn "_" #un, lora_dx<T, U, false, true>)                 \
  LORA_INSTANTIATE("lora_da_" #tn "_" #un, lora_da<T, U>)                               \
  LORA_INSTANTIATE("lora_db_" #tn "_" #un, lora_db<T, U>)
#define LORA_ALL(tn, T, un, U) \
  LORA_XA(tn, T, un, U) LORA_LINEAR(tn, T, un, U) LORA_BACKWARD(tn, T, un, U)
// dx = dy W alone (x_dropped given) reads no LoRA parameter: one per activation dtype.
#define LORA_DX_BASE(tn, T) \
  LORA_INSTANTIATE("lora_dx_base_" #tn, lora_dx<T, T, true, false>)

LORA_ALL(float32, float, float32, float)
LORA_ALL(float16, half, float16, half)
LORA_ALL(float16, half, float32, float)
LORA_ALL(bfloat16, bfloat, bfloat16, bfloat)
LORA_ALL(bfloat16, bfloat, float32, float)
LORA_DX_BASE(float32, float)
LORA_DX_BASE(float16, half)
LORA_DX_BASE(bfloat16, bfloat)
