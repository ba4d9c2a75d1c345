// Instantiations of metal/dora.h (names: csrc/ops/dora.cpp, metal_launch_dora_*).
#include "dora.h"

template [[host_name("dora_row_sq_float32")]] [[kernel]] decltype(dora_row_sq_dense<float>) dora_row_sq_dense<float>;
template [[host_name("dora_row_sq_float16")]] [[kernel]] decltype(dora_row_sq_dense<half>) dora_row_sq_dense<half>;
template [[host_name("dora_row_sq_bfloat16")]] [[kernel]] decltype(dora_row_sq_dense<bfloat>) dora_row_sq_dense<bfloat>;
template [[host_name("dora_row_sq_q2_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 2>) dora_row_sq_quant<float, 2>;
template [[host_name("dora_row_sq_q3_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 3>) dora_row_sq_quant<float, 3>;
template [[host_name("dora_row_sq_q4_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 4>) dora_row_sq_quant<float, 4>;
template [[host_name("dora_row_sq_q5_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 5>) dora_row_sq_quant<float, 5>;
template [[host_name("dora_row_sq_q6_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 6>) dora_row_sq_quant<float, 6>;
template [[host_name("dora_row_sq_q8_float32")]] [[kernel]] decltype(dora_row_sq_quant<float, 8>) dora_row_sq_quant<float, 8>;
template [[host_name("dora_row_sq_q2_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 2>) dora_row_sq_quant<half, 2>;
template [[host_name("dora_row_sq_q3_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 3>) dora_row_sq_quant<half, 3>;
template [[host_name("dora_row_sq_q4_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 4>) dora_row_sq_quant<half, 4>;
template [[host_name("dora_row_sq_q5_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 5>) dora_row_sq_quant<half, 5>;
template [[host_name("dora_row_sq_q6_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 6>) dora_row_sq_quant<half, 6>;
template [[host_name("dora_row_sq_q8_float16")]] [[kernel]] decltype(dora_row_sq_quant<half, 8>) dora_row_sq_quant<half, 8>;
template [[host_name("dora_row_sq_q2_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 2>) dora_row_sq_quant<bfloat, 2>;
template [[host_name("dora_row_sq_q3_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 3>) dora_row_sq_quant<bfloat, 3>;
template [[host_name("dora_row_sq_q4_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 4>) dora_row_sq_quant<bfloat, 4>;
template [[host_name("dora_row_sq_q5_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 5>) dora_row_sq_quant<bfloat, 5>;
template [[host_name("dora_row_sq_q6_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 6>) dora_row_sq_quant<bfloat, 6>;
template [[host_name("dora_row_sq_q8_bfloat16")]] [[kernel]] decltype(dora_row_sq_quant<bfloat, 8>) dora_row_sq_quant<bfloat, 8>;

// dora_gram (float32 A only) is not a template: its name is its own.
template [[host_name("dora_inv_norm_float32")]] [[kernel]] decltype(dora_inv_norm<float>) dora_inv_norm<float>;
template [[host_name("dora_inv_norm_float16")]] [[kernel]] decltype(dora_inv_norm<half>) dora_inv_norm<half>;
template [[host_name("dora_inv_norm_bfloat16")]] [[kernel]] decltype(dora_inv_norm<bfloat>) dora_inv_norm<bfloat>;
template [[host_name("dora_scale_float32_bias")]] [[kernel]] decltype(dora_scale<float, true>) dora_scale<float, true>;
template [[host_name("dora_scale_float32_nobias")]] [[kernel]] decltype(dora_scale<float, false>) dora_scale<float, false>;
template [[host_name("dora_scale_float16_bias")]] [[kernel]] decltype(dora_scale<half, true>) dora_scale<half, true>;
template [[host_name("dora_scale_float16_nobias")]] [[kernel]] decltype(dora_scale<half, false>) dora_scale<half, false>;
template [[host_name("dora_scale_bfloat16_bias")]] [[kernel]] decltype(dora_scale<bfloat, true>) dora_scale<bfloat, true>;
template [[host_name("dora_scale_bfloat16_nobias")]] [[kernel]] decltype(dora_scale<bfloat, false>) dora_scale<bfloat, false>;
template [[host_name("dora_scale_vjp_float32")]] [[kernel]] decltype(dora_scale_vjp<float>) dora_scale_vjp<float>;
template [[host_name("dora_scale_vjp_float16")]] [[kernel]] decltype(dora_scale_vjp<half>) dora_scale_vjp<half>;
template [[host_name("dora_scale_vjp_bfloat16")]] [[kernel]] decltype(dora_scale_vjp<bfloat>) dora_scale_vjp<bfloat>;
template [[host_name("dora_scale_colsum_float32")]] [[kernel]] decltype(dora_scale_colsum<float>) dora_scale_colsum<float>;
template [[host_name("dora_scale_colsum_float16")]] [[kernel]] decltype(dora_scale_colsum<half>) dora_scale_colsum<half>;
template [[host_name("dora_scale_colsum_bfloat16")]] [[kernel]] decltype(dora_scale_colsum<bfloat>) dora_scale_colsum<bfloat>;
