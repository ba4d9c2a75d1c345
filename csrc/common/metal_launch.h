// How a Metal kernel is dispatched: which instantiation, how many threadgroups, how many
// threads in each. Plain C++ so that the Metal host code (macOS) and the Metal emulator
// in the test suite (Linux, through the bindings) compute it with the same function.
#pragma once

#include <array>
#include <cstddef>
#include <string>

namespace mlx_tuner {

struct MetalLaunch {
  std::string kernel; // the [[host_name]] of the instantiation
  std::array<size_t, 3> threadgroups; // threadgroups per grid (dispatch_threadgroups)
  std::array<size_t, 3> threads; // threads per threadgroup
};

} // namespace mlx_tuner
