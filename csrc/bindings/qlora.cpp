// Python bindings of the qlora family: the op, and the Metal launch geometry (so the
// emulator tests dispatch exactly what the Metal host code dispatches).
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "bindings/common.h"
#include "ops/qlora.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_qlora(nb::module_& m) {
  m.def(
      "qlora_linear",
      &mlx_tuner::qlora_linear,
      "x"_a,
      "weight"_a,
      "scales"_a,
      "biases"_a,
      "lora_a"_a,
      "lora_b"_a,
      "scale"_a,
      "bias"_a = nb::none(),
      "x_dropped"_a = nb::none(),
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "stream"_a = nb::none(),
      "y = x dequant(Wq)^T + bias + scale (x_d A) B, never dequantizing all of W.");
  m.def(
      "metal_launch_qlora_gemm",
      [](bool fwd, int rows, int n_out, int bits, const std::string& dtype) {
        return launch_tuple(qlora_gemm_launch(fwd, rows, n_out, bits, dtype));
      },
      "fwd"_a, "m"_a, "n_out"_a, "bits"_a, "dtype"_a,
      "(kernel, threadgroups, threads) of qlora_gemm for out (m, n_out).");
  m.def(
      "metal_launch_qlora_skinny",
      [](int ni, int nq, const std::string& p_dtype, const std::string& o_dtype) {
        return launch_tuple(qlora_skinny_launch(ni, nq, p_dtype, o_dtype));
      },
      "ni"_a, "nq"_a, "p_dtype"_a, "o_dtype"_a,
      "(kernel, threadgroups, threads) of qlora_skinny for out (ni, nq).");
}

} // namespace mlx_tuner::bindings
