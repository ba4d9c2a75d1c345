// Helpers shared by the CUDA kernels of every family. Only symbols that libmlx exports
// may be used (it is built with hidden visibility): cu::get_command_encoder, the
// encoder's set_input_array / set_output_array / add_kernel_node*, Device::make_current.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>
#include <utility>

#include "mlx/array.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

namespace mlx_tuner::cuda {

namespace mx = mlx::core;

// Whether a device pointer may be read by 16-byte vectors (or by TMA).
inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Throws std::runtime_error("[what] <cuda error>") on failure.
void check(cudaError_t err, const char* what);

// The encoder's device's multiprocessor count (asked once a device).
int sm_count(mx::cu::CommandEncoder& enc);

// libmlx carries its own static CUDA runtime, which does not know the __global__
// functions registered by ours: hand MLX a driver-level CUfunction instead.
CUfunction kernel_handle(const void* kernel, int device);

// Device memory ordered on the encoder's stream (cu::malloc_async is not exported; MLX's
// allocator::malloc returns managed memory), reused from a cache of freed buffers. MLX's
// memory counters do not see it.
mx::allocator::Data malloc_device(size_t nbytes, mx::cu::CommandEncoder& enc);

// Bytes held by malloc_device now, and the most held since reset_extra_peak().
std::pair<size_t, size_t> extra_memory();
void reset_extra_peak();

// Freed malloc_device buffers kept for reuse (bytes), and giving them back to CUDA.
size_t cached_memory();
void clear_cache();
size_t set_cache_limit(size_t bytes); // returns the previous limit

// (in use now, most in use since the last reset) of the device's default memory pool,
// which MLX's device buffers and ours both come from: one counter for both.
std::pair<size_t, size_t> pool_usage(bool reset_high);

// Allocates `out` with malloc_device and registers it as the encoder's output.
// The output is also held until the encoder's work completes. MLX keeps a primitive's
// inputs and siblings alive that long, but not its primary output: one nobody reads (the
// value of a loss whose gradient alone is evaluated) could be freed while its graph was
// still being built, and the buffer cache hand the memory to a later node of that graph.
// MLX orders graph nodes by buffer identity (CudaBuffer*), and a cached buffer comes back
// under a new one, so the two nodes could run concurrently and the stale write land in
// the new output. (A hazard read off MLX's source, not one seen in a test.)
inline void alloc_output(mx::array& out, mx::cu::CommandEncoder& enc) {
  out.set_data(malloc_device(out.nbytes(), enc));
  enc.set_output_array(out);
  enc.add_temporary(out);
}

// Host time spent in our eval_gpu bodies and GEMM calls, per name, when
// MLX_TUNER_CUDA_HOST_TIMES=1 (a diagnostic that bench/probe_overhead.py prints): it tells
// the host work of our primitives from MLX's graph work around them. Inclusive times.
class HostTimer {
 public:
  explicit HostTimer(const char* name);
  ~HostTimer();
  HostTimer(const HostTimer&) = delete;
  HostTimer& operator=(const HostTimer&) = delete;

 private:
  const char* name_;
  long long t0_ns_;
};
// (name, total microseconds, calls) since the last reset.
std::vector<std::tuple<std::string, double, long long>> host_times(bool reset);

// Lets `kernel` (a __global__ function) on `device` take `smem` bytes of dynamic shared
// memory (above the default 48 KB) and, with big_cluster, clusters past the portable 8
// CTAs. Set once per kernel and size, not per launch: cudaFuncSetAttribute took ~6.6 us of
// host time a call (2026-12-01h, call 1), and lora_gemm launches twice per
// forward+backward. Same underlying function as kernel_handle's (one primary context a
// device), set through our runtime.
void allow_launch(const void* kernel, int device, unsigned smem, bool big_cluster);

// True while a GemmBatch (gemm.cuh) captures on this thread: no launches or buffers then.
bool in_gemm_batch();

// A cluster launch as a one-node child graph: MLX keys a direct kernel node "K" whatever
// its cluster shape, and updating its cached graph in place across a cluster-shape change
// keeps the old shape (wrong results in later calls of the same graph topology); a child
// graph's key carries the shape, as MLX does for the graphs it captures.
void add_cluster_node(
    mx::cu::CommandEncoder& enc,
    const void* kernel,
    dim3 grid,
    dim3 block,
    dim3 cluster,
    unsigned smem,
    void** params);

// Launches `kernel` (a __global__ function) as a node of MLX's CUDA graph, in thread
// block clusters of `cluster` CTAs (Hopper and later; (1, 1, 1) launches no cluster).
// The args must match the kernel's parameter types exactly: they are passed by address.
template <typename... Args>
void launch_cluster(
    mx::cu::CommandEncoder& enc,
    const void* kernel,
    dim3 grid,
    dim3 block,
    dim3 cluster,
    unsigned smem,
    Args&&... args) {
  if (in_gemm_batch()) {
    throw std::logic_error("[mlx_tuner] a kernel launched inside a GemmBatch");
  }
  if (grid.x % cluster.x != 0 || grid.y % cluster.y != 0 || grid.z % cluster.z != 0) {
    throw std::logic_error("[mlx_tuner] a grid that is not a whole number of clusters");
  }
  int device = enc.device().cuda_device();
  CUfunction fn = kernel_handle(kernel, device);
  allow_launch(kernel, device, smem, cluster.x * cluster.y * cluster.z > 8);
  if (cluster.x * cluster.y * cluster.z == 1) {
    enc.add_kernel_node_ex(fn, grid, block, cluster, smem, args...);
    return;
  }
  void* params[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  add_cluster_node(enc, kernel, grid, block, cluster, smem, params);
}

// launch_cluster without clusters.
template <typename... Args>
void launch(
    mx::cu::CommandEncoder& enc,
    const void* kernel,
    dim3 grid,
    dim3 block,
    unsigned smem,
    Args&&... args) {
  launch_cluster(enc, kernel, grid, block, dim3(1, 1, 1), smem, args...);
}

} // namespace mlx_tuner::cuda
