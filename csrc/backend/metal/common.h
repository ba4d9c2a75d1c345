// Helpers shared by the Metal host code of every family (macOS only).
#pragma once

#include <string>

#include "common/metal_launch.h"
#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

namespace mlx_tuner::metal {

namespace mx = mlx::core;

// The pipeline for one instantiation in mlx_tuner.metallib, which is installed next to
// the extension and located at run time relative to it.
MTL::ComputePipelineState* kernel(mx::metal::Device& d, const std::string& name);

// Binds `launch.kernel` on the stream's encoder; the caller binds buffers, then calls
// dispatch(enc, launch).
mx::metal::CommandEncoder& begin(mx::Stream s, const MetalLaunch& launch);

inline void dispatch(mx::metal::CommandEncoder& enc, const MetalLaunch& launch) {
  enc.dispatch_threadgroups(
      MTL::Size(launch.threadgroups[0], launch.threadgroups[1], launch.threadgroups[2]),
      MTL::Size(launch.threads[0], launch.threads[1], launch.threads[2]));
}

// A scratch array of one eval_gpu call, kept alive until the stream's command buffer
// completes.
inline mx::array temporary(mx::Stream s, const mx::Shape& shape, mx::Dtype dtype) {
  mx::array a(shape, dtype, nullptr, {});
  a.set_data(mx::allocator::malloc(a.nbytes()));
  mx::metal::get_command_encoder(s).add_temporary(a);
  return a;
}

} // namespace mlx_tuner::metal
