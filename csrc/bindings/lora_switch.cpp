// Python bindings of the lora_switch family: the fused op
// (mlx_tuner.ops.lora_switch_linear calls it).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "ops/lora_switch.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_lora_switch(nb::module_& m) {
  m.def(
      "lora_switch_linear",
      &mlx_tuner::lora_switch_linear,
      "x"_a,
      "weight"_a,
      "lora_a"_a,
      "lora_b"_a,
      "indices"_a,
      "scale"_a,
      "bias"_a = nb::none(),
      "x_dropped"_a = nb::none(),
      nb::kw_only(),
      "scales"_a = nb::none(),
      "biases"_a = nb::none(),
      "group_size"_a = 64,
      "bits"_a = 4,
      "stream"_a = nb::none(),
      "gather_mm(x, W^T, indices) + bias[indices] + scale gather_mm(gather_mm(x_dropped, "
      "A^T), B^T), fused; W may be affine-quantized (scales, biases, group_size, bits: "
      "gather_qmm's base). See mlx_tuner.ops.lora_switch_linear.");
}

} // namespace mlx_tuner::bindings
