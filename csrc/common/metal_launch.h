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

// Groups of `per` that cover n items (0 when n <= 0): a launch's threadgroup count.
inline size_t ceil_groups(long long n, long long per) {
  return n > 0 ? static_cast<size_t>((n + per - 1) / per) : 0;
}

} // namespace mlx_tuner
