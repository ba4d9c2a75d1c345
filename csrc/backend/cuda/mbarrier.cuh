// Hopper's shared-memory barriers (mbarrier) with transaction counts, and the bulk copy
// (TMA without a tensor map) that completes on one: shared by lora_gemm and the JS forward.
// Compiled for compute capability 9.0 and later only (the callers' bodies are too).
#pragma once

#include <cstdint>

namespace mlx_tuner::cuda {

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* b, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void mbar_expect(uint64_t* b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)),
               "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nW%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra W%=;\n}" ::"r"(smem_u32(b)), "r"(parity) : "memory");
}
// The same wait with a suspend-time hint (ns): between checks the warp sleeps
// (NANOSLEEP.SYNCS in SASS) instead of re-issuing at once. For the JS forward's waits of
// microseconds on the cluster's parts (~90 retries a warp a row without the hint, ~70 with
// it), so that a waiting CTA takes fewer issue slots from the SM's other CTAs.
__device__ __forceinline__ void mbar_wait_sleep(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nW%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1, %2;\n"
      "@!p bra W%=;\n}" ::"r"(smem_u32(b)), "r"(parity), "n"(1000000) : "memory");
}
// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to this CTA's
// shared memory, counted on barrier b's transactions.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* b) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_u32(dst)), "l"(src), "r"(bytes), "r"(smem_u32(b)) : "memory");
}
#endif

} // namespace mlx_tuner::cuda
