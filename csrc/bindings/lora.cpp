// Python bindings of the lora family: the fused op (mlx_tuner.ops.lora_linear calls it)
// and the Metal launch geometry, so the emulator tests use the host's very numbers.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "ops/lora.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_lora(nb::module_& m) {
  m.def(
      "lora_linear",
      &mlx_tuner::lora_linear,
      "x"_a,
      "weight"_a,
      "lora_a"_a,
      "lora_b"_a,
      "scale"_a,
      "bias"_a = nb::none(),
      "x_dropped"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "y = x W^T + bias + scale (x_dropped A) B, fused (see mlx_tuner.ops.lora_linear).");
}

} // namespace mlx_tuner::bindings
