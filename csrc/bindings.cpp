// The nanobind module mlx_tuner._ext: build facts, and one init per kernel family
// (csrc/bindings/<family>.cpp), each compiled only when that family exists.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstddef>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace nb = nanobind;

#define MLX_TUNER_FAMILY(name)   \
  namespace mlx_tuner::bindings { \
  void init_##name(nb::module_&); \
  }
#ifdef MLX_TUNER_HAS_DIVERGENCE
MLX_TUNER_FAMILY(divergence)
#endif
#ifdef MLX_TUNER_HAS_LORA
MLX_TUNER_FAMILY(lora)
#endif
#ifdef MLX_TUNER_HAS_QLORA
MLX_TUNER_FAMILY(qlora)
#endif
#ifdef MLX_TUNER_HAS_DORA
MLX_TUNER_FAMILY(dora)
#endif
#ifdef MLX_TUNER_HAS_CROSS_ENTROPY
MLX_TUNER_FAMILY(cross_entropy)
#endif
#ifdef MLX_TUNER_HAS_LORA_SWITCH
MLX_TUNER_FAMILY(lora_switch)
#endif

#ifdef MLX_TUNER_CUDA
namespace mlx_tuner::cuda {
std::pair<size_t, size_t> extra_memory();
void reset_extra_peak();
size_t cached_memory();
void clear_cache();
size_t set_cache_limit(size_t bytes);
std::pair<size_t, size_t> pool_usage(bool reset_high);
std::vector<std::tuple<std::string, double, long long>> host_times(bool reset);
} // namespace mlx_tuner::cuda
#endif

NB_MODULE(_ext, m) {
  m.doc() = "mlx-tuner fused kernels (MLX custom primitives)";
  // Checked against the installed mlx at import: MLX's C++ ABI is not stable.
  m.attr("built_mlx_version") = MLX_TUNER_BUILT_MLX_VERSION;
  // "metal", "cuda" or "cpu" (no GPU kernels).
  m.attr("gpu_backend") = MLX_TUNER_GPU_BACKEND;
  // family -> "cpu,gpu": which backends have a compiled kernel in this build.
  m.attr("kernel_files") = MLX_TUNER_KERNEL_FILES;
  // Families whose CUDA kernel was left out of this build (CMake MLX_TUNER_CUDA_DISABLED).
  m.attr("cuda_left_out") = MLX_TUNER_CUDA_LEFT_OUT;
#ifdef MLX_TUNER_CUDA
  // Device memory our CUDA kernels allocate outside MLX's allocator (its counters miss it).
  m.def("cuda_extra_memory", &mlx_tuner::cuda::extra_memory,
        "(live bytes, peak bytes) allocated by mlx-tuner's CUDA kernels");
  m.def("reset_cuda_extra_peak", &mlx_tuner::cuda::reset_extra_peak);
  m.def("cuda_cached_memory", &mlx_tuner::cuda::cached_memory,
        "bytes of freed buffers mlx-tuner's CUDA kernels keep for reuse");
  m.def("clear_cuda_cache", &mlx_tuner::cuda::clear_cache);
  m.def("set_cuda_cache_limit", &mlx_tuner::cuda::set_cache_limit, nb::arg("bytes"),
        "caps the freed buffers kept for reuse; returns the previous cap");
  m.def("cuda_host_times", &mlx_tuner::cuda::host_times, nb::arg("reset") = false,
        "[(name, microseconds, calls)] of host time in the CUDA primitives' eval_gpu and "
        "GEMM calls, collected when MLX_TUNER_CUDA_HOST_TIMES=1 (a diagnostic)");
  m.def("cuda_pool_usage", &mlx_tuner::cuda::pool_usage, nb::arg("reset_peak") = false,
        "(bytes in use, peak bytes in use) of the device's default CUDA memory pool, which "
        "holds MLX's device buffers and mlx-tuner's alike");
#endif
  nb::module_ families = m; // families add their functions to the module itself
#ifdef MLX_TUNER_HAS_DIVERGENCE
  mlx_tuner::bindings::init_divergence(families);
#endif
#ifdef MLX_TUNER_HAS_LORA
  mlx_tuner::bindings::init_lora(families);
#endif
#ifdef MLX_TUNER_HAS_QLORA
  mlx_tuner::bindings::init_qlora(families);
#endif
#ifdef MLX_TUNER_HAS_DORA
  mlx_tuner::bindings::init_dora(families);
#endif
#ifdef MLX_TUNER_HAS_CROSS_ENTROPY
  mlx_tuner::bindings::init_cross_entropy(families);
#endif
#ifdef MLX_TUNER_HAS_LORA_SWITCH
  mlx_tuner::bindings::init_lora_switch(families);
#endif
}
