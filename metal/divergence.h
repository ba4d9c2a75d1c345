// KL / JS divergence Metal kernels (templates; metal/divergence.metal instantiates them).
#pragma once

// Shared with the host (csrc/ops/divergence.cpp computes the launch from these).
namespace divergence_metal {
constexpr int kReads = 4; // consecutive elements per thread per sweep
constexpr int kSimd = 32; // simdgroup width
constexpr int kMaxThreads = 1024; // threads per threadgroup (one row per threadgroup)
} // namespace divergence_metal

#ifdef __METAL_VERSION__
#endif
