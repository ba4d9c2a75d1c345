// MLX's steel GEMM (simdgroup_matrix tiles, BlockLoader, BlockMMA) through the emulator:
// what the LoRA GEMM kernels build on.
#include "mlx/backend/metal/kernels/utils.h"
#include "mlx/backend/metal/kernels/steel/gemm/gemm.h"

using namespace mlx::steel;

template <typename T, int BM, int BN, int BK, int WM, int WN, bool MN_aligned, bool K_aligned>
[[kernel]] void steel_gemm(
    const device T* A [[buffer(0)]],
    const device T* B [[buffer(1)]],
    device T* D [[buffer(2)]],
    const constant GEMMParams* params [[buffer(3)]],
    uint simd_lane_id [[thread_index_in_simdgroup]],
    uint simd_group_id [[simdgroup_index_in_threadgroup]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint3 lid [[thread_position_in_threadgroup]]) {
  using gemm = GEMMKernel<T, T, BM, BN, BK, WM, WN, false, false, MN_aligned, K_aligned>;
  threadgroup T As[gemm::tgp_mem_size_a];
  threadgroup T Bs[gemm::tgp_mem_size_b];
  gemm::run(A, B, D, params, As, Bs, simd_lane_id, simd_group_id, tid, lid);
}

instantiate_kernel("steel_gemm_float32_unaligned", steel_gemm, float, 32, 32, 16, 2, 2, false, false)
instantiate_kernel("steel_gemm_float16_aligned", steel_gemm, half, 32, 32, 16, 2, 2, true, true)
