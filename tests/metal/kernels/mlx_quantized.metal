// MLX's affine-quantized matrix-vector kernel through the emulator: what the QLoRA
// kernels build on.
#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/steel/gemm/gemm.h"
#include "mlx/backend/metal/kernels/quantized.h"

instantiate_kernel("affine_qmv_fast_float32_gs_64_b_4", affine_qmv_fast, float, 64, 4, false)
