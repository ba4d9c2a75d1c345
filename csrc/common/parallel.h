// A small fixed thread pool for the CPU kernels. MLX runs each CPU primitive on one
// thread; our kernels split rows (or tiles) across cores themselves.
#pragma once

#include <cstdint>
#include <functional>

namespace mlx_tuner {

// Number of worker threads (MLX_TUNER_NUM_THREADS, else the hardware concurrency).
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), each at least `grain` long
// where n allows, in parallel; returns when all chunks are done. Nested calls run inline.
void parallel_for(
    int64_t n,
    int64_t grain,
    const std::function<void(int64_t, int64_t)>& fn);

} // namespace mlx_tuner
