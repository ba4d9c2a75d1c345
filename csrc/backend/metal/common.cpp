#include "backend/metal/common.h"

#include <dlfcn.h>

#include <filesystem>
#include <stdexcept>

namespace mlx_tuner::metal {

namespace {

std::string metallib_path() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&metallib_path), &info) == 0 ||
      info.dli_fname == nullptr) {
    throw std::runtime_error("[mlx_tuner] cannot locate the extension's own file");
  }
  auto path = std::filesystem::path(info.dli_fname).parent_path() / "mlx_tuner.metallib";
  if (!std::filesystem::exists(path)) {
    throw std::runtime_error(
        "[mlx_tuner] mlx_tuner.metallib is missing next to the extension: " +
        path.string() + ". Reinstall mlx-tuner.");
  }
  return path.string();
}

} // namespace

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const std::string& name) {
  static const std::string path = metallib_path();
  auto* lib = d.get_library("mlx_tuner", path);
  return d.get_kernel(name, lib);
}

mx::metal::CommandEncoder& begin(mx::Stream s, const MetalLaunch& launch) {
  auto& d = mx::metal::device(s.device);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel(d, launch.kernel));
  return enc;
}

} // namespace mlx_tuner::metal
