// Python bindings of the cross_entropy family (mlx_tuner._ext.linear_cross_entropy).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/variant.h>

#include "bindings/common.h"
#include "ops/cross_entropy.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_cross_entropy(nb::module_& m) {
  m.def(
      "linear_cross_entropy",
      &mlx_tuner::linear_cross_entropy,
      "h"_a,
      "weight"_a,
      "targets"_a,
      "bias"_a = nb::none(),
      "scales"_a = nb::none(),
      "biases"_a = nb::none(),
      "group_size"_a = 64,
      "bits"_a = 4,
      "mode"_a = "affine",
      "grad_in_forward"_a = false,
      "stream"_a = nb::none(),
      "Per-token cross-entropy (float32, shape targets.shape) of h·weightᵀ (+ bias) "
      "against targets, computed blockwise without storing the logits. Targets outside "
      "[0, V) are ignored (loss 0, no gradient). grad_in_forward (a speed hint, honored "
      "by the CUDA kernels only) also computes dh's direction in the forward.");
  m.def(
      "metal_launch_linear_cross_entropy",
      [](const std::string& kernel, int rows, const std::string& dtype) {
        return launch_tuple(mlx_tuner::metal_launch_linear_cross_entropy(kernel, rows, dtype));
      },
      "kernel"_a,
      "rows"_a,
      "dtype"_a,
      "(name, threadgroups, threads) of a Metal kernel of linear_cross_entropy.");
}

} // namespace mlx_tuner::bindings
