// Instantiations of metal/dora.h (names: csrc/ops/dora.cpp, metal_launch_dora_row_sq_norm).
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
