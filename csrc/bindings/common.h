// Helpers shared by the binding files.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>

#include "common/metal_launch.h"

namespace mlx_tuner::bindings {

// (kernel name, threadgroups, threads) of a Metal dispatch: what the emulator tests run,
// the very numbers the Metal host code uses.
inline nanobind::tuple launch_tuple(const MetalLaunch& l) {
  return nanobind::make_tuple(l.kernel, l.threadgroups, l.threads);
}

} // namespace mlx_tuner::bindings
