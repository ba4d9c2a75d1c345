// Instantiations of metal/qlora.h, written out (no macros): gemm per dtype x bits x
// direction, skinny per (input, output) type.
#include "metal/qlora.h"

template [[host_name("qlora_gemm_fwd_float32_b2")]] [[kernel]] decltype(qlora_gemm<float, 2, true>) qlora_gemm<float, 2, true>;
template [[host_name("qlora_gemm_bwd_float32_b2")]] [[kernel]] decltype(qlora_gemm<float, 2, false>) qlora_gemm<float, 2, false>;
template [[host_name("qlora_gemm_fwd_float32_b3")]] [[kernel]] decltype(qlora_gemm<float, 3, true>) qlora_gemm<float, 3, true>;
template [[host_name("qlora_gemm_bwd_float32_b3")]] [[kernel]] decltype(qlora_gemm<float, 3, false>) qlora_gemm<float, 3, false>;
template [[host_name("qlora_gemm_fwd_float32_b4")]] [[kernel]] decltype(qlora_gemm<float, 4, true>) qlora_gemm<float, 4, true>;
template [[host_name("qlora_gemm_bwd_float32_b4")]] [[kernel]] decltype(qlora_gemm<float, 4, false>) qlora_gemm<float, 4, false>;
template [[host_name("qlora_gemm_fwd_float32_b5")]] [[kernel]] decltype(qlora_gemm<float, 5, true>) qlora_gemm<float, 5, true>;
template [[host_name("qlora_gemm_bwd_float32_b5")]] [[kernel]] decltype(qlora_gemm<float, 5, false>) qlora_gemm<float, 5, false>;
template [[host_name("qlora_gemm_fwd_float32_b6")]] [[kernel]] decltype(qlora_gemm<float, 6, true>) qlora_gemm<float, 6, true>;
template [[host_name("qlora_gemm_bwd_float32_b6")]] [[kernel]] decltype(qlora_gemm<float, 6, false>) qlora_gemm<float, 6, false>;
template [[host_name("qlora_gemm_fwd_float32_b8")]] [[kernel]] decltype(qlora_gemm<float, 8, true>) qlora_gemm<float, 8, true>;
template [[host_name("qlora_gemm_bwd_float32_b8")]] [[kernel]] decltype(qlora_gemm<float, 8, false>) qlora_gemm<float, 8, false>;
template [[host_name("qlora_gemm_fwd_float16_b2")]] [[kernel]] decltype(qlora_gemm<half, 2, true>) qlora_gemm<half, 2, true>;
template [[host_name("qlora_gemm_bwd_float16_b2")]] [[kernel]] decltype(qlora_gemm<half, 2, false>) qlora_gemm<half, 2, false>;
template [[host_name("qlora_gemm_fwd_float16_b3")]] [[kernel]] decltype(qlora_gemm<half, 3, true>) qlora_gemm<half, 3, true>;
template [[host_name("qlora_gemm_bwd_float16_b3")]] [[kernel]] decltype(qlora_gemm<half, 3, false>) qlora_gemm<half, 3, false>;
template [[host_name("qlora_gemm_fwd_float16_b4")]] [[kernel]] decltype(qlora_gemm<half, 4, true>) qlora_gemm<half, 4, true>;
template [[host_name("qlora_gemm_bwd_float16_b4")]] [[kernel]] decltype(qlora_gemm<half, 4, false>) qlora_gemm<half, 4, false>;
template [[host_name("qlora_gemm_fwd_float16_b5")]] [[kernel]] decltype(qlora_gemm<half, 5, true>) qlora_gemm<half, 5, true>;
template [[host_name("qlora_gemm_bwd_float16_b5")]] [[kernel]] decltype(qlora_gemm<half, 5, false>) qlora_gemm<half, 5, false>;
template [[host_name("qlora_gemm_fwd_float16_b6")]] [[kernel]] decltype(qlora_gemm<half, 6, true>) qlora_gemm<half, 6, true>;
template [[host_name("qlora_gemm_bwd_float16_b6")]] [[kernel]] decltype(qlora_gemm<half, 6, false>) qlora_gemm<half, 6, false>;
template [[host_name("qlora_gemm_fwd_float16_b8")]] [[kernel]] decltype(qlora_gemm<half, 8, true>) qlora_gemm<half, 8, true>;
template [[host_name("qlora_gemm_bwd_float16_b8")]] [[kernel]] decltype(qlora_gemm<half, 8, false>) qlora_gemm<half, 8, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b2")]] [[kernel]] decltype(qlora_gemm<bfloat, 2, true>) qlora_gemm<bfloat, 2, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b2")]] [[kernel]] decltype(qlora_gemm<bfloat, 2, false>) qlora_gemm<bfloat, 2, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b3")]] [[kernel]] decltype(qlora_gemm<bfloat, 3, true>) qlora_gemm<bfloat, 3, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b3")]] [[kernel]] decltype(qlora_gemm<bfloat, 3, false>) qlora_gemm<bfloat, 3, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b4")]] [[kernel]] decltype(qlora_gemm<bfloat, 4, true>) qlora_gemm<bfloat, 4, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b4")]] [[kernel]] decltype(qlora_gemm<bfloat, 4, false>) qlora_gemm<bfloat, 4, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b5")]] [[kernel]] decltype(qlora_gemm<bfloat, 5, true>) qlora_gemm<bfloat, 5, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b5")]] [[kernel]] decltype(qlora_gemm<bfloat, 5, false>) qlora_gemm<bfloat, 5, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b6")]] [[kernel]] decltype(qlora_gemm<bfloat, 6, true>) qlora_gemm<bfloat, 6, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b6")]] [[kernel]] decltype(qlora_gemm<bfloat, 6, false>) qlora_gemm<bfloat, 6, false>;
template [[host_name("qlora_gemm_fwd_bfloat16_b8")]] [[kernel]] decltype(qlora_gemm<bfloat, 8, true>) qlora_gemm<bfloat, 8, true>;
template [[host_name("qlora_gemm_bwd_bfloat16_b8")]] [[kernel]] decltype(qlora_gemm<bfloat, 8, false>) qlora_gemm<bfloat, 8, false>;

template [[host_name("qlora_skinny_float32_float32")]] [[kernel]] decltype(qlora_skinny<float, float>) qlora_skinny<float, float>;
template [[host_name("qlora_skinny_float16_float32")]] [[kernel]] decltype(qlora_skinny<half, float>) qlora_skinny<half, float>;
template [[host_name("qlora_skinny_float32_float16")]] [[kernel]] decltype(qlora_skinny<float, half>) qlora_skinny<float, half>;
template [[host_name("qlora_skinny_bfloat16_float32")]] [[kernel]] decltype(qlora_skinny<bfloat, float>) qlora_skinny<bfloat, float>;
template [[host_name("qlora_skinny_float32_bfloat16")]] [[kernel]] decltype(qlora_skinny<float, bfloat>) qlora_skinny<float, bfloat>;
