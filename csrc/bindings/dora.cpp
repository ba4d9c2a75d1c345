// Python bindings of the dora family: mlx_tuner._ext.dora_linear.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "ops/dora.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_dora(nb::module_& m) {
  m.def(
      "dora_linear",
      &mlx_tuner::dora_linear,
      "x"_a,
      "weight"_a,
      "lora_a"_a,
      "lora_b"_a,
      "magnitude"_a,
      "scale"_a,
      "bias"_a = nb::none(),
      nb::kw_only(),
      "x_dropped"_a = nb::none(),
      "scales"_a = nb::none(),
      "biases"_a = nb::none(),
      "group_size"_a = 64,
      "bits"_a = 4,
      "weight_sq_norm"_a = nb::none(),
      "stream"_a = nb::none(),
      "DoRA linear via the low-rank norm identity (see mlx_tuner.ops.dora_linear).");
}

} // namespace mlx_tuner::bindings
