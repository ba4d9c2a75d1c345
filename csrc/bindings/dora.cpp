// Python bindings of the dora family: mlx_tuner._ext.dora_linear.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "bindings/common.h"
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
      "compose"_a = false,
      "DoRA linear via the low-rank norm identity (see mlx_tuner.ops.dora_linear).");
  m.def(
      "dora_weight_sq_norm",
      &mlx_tuner::dora_weight_sq_norm,
      "weight"_a,
      "scales"_a = nb::none(),
      "biases"_a = nb::none(),
      nb::kw_only(),
      "group_size"_a = 64,
      "bits"_a = 4,
      "stream"_a = nb::none(),
      "||W_i||^2 in float32, W dense or affine-quantized, without a float32 copy of W.");
  m.def(
      "_dora_scale",
      &mlx_tuner::dora_scale,
      "z"_a,
      "sv"_a,
      "bias"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Tests only: y = z * sv (+ bias) as the DoRAScale node of dora_linear's GPU path.");
  m.def(
      "_dora_inv_norm",
      &mlx_tuner::dora_inv_norm,
      "p"_a,
      "b"_a,
      "a"_a,
      "c"_a,
      "scale"_a,
      "p_transposed"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Tests only: 1 / n (the DoRA row norms from the low-rank identity) as one node.");
  m.def(
      "_dora_inv_norm_quant",
      &mlx_tuner::dora_inv_norm_quant,
      "wq"_a,
      "scales"_a,
      "biases"_a,
      "b"_a,
      "a"_a,
      "c"_a,
      "scale"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Tests only: 1 / n with P = W A made from the affine-quantized W in the same node.");
  m.def(
      "metal_launch_dora_row_sq_norm",
      [](int rows, const std::string& dtype, int bits) {
        return launch_tuple(mlx_tuner::metal_launch_dora_row_sq_norm(rows, dtype, bits));
      },
      "rows"_a,
      "dtype"_a,
      "bits"_a = 0,
      "(kernel name, threadgroups, threads) of the Metal DoRARowSqNorm dispatch.");
  // The Metal dispatches of DoRAInvNorm / DoRAScale / DoRAScaleVJP, for the emulator tests.
  m.def(
      "metal_launch_dora_gram",
      [](int r) { return launch_tuple(mlx_tuner::metal_launch_dora_gram(r)); },
      "r"_a,
      "(kernel name, threadgroups, threads) of the Metal G = A^T A dispatch (DoRAInvNorm).");
  m.def(
      "metal_launch_dora_inv_norm",
      [](int out, const std::string& dtype) {
        return launch_tuple(mlx_tuner::metal_launch_dora_inv_norm(out, dtype));
      },
      "out"_a,
      "dtype"_a,
      "(kernel name, threadgroups, threads) of the Metal 1 / n dispatch (DoRAInvNorm).");
  m.def(
      "metal_launch_dora_scale",
      [](int rows, int cols, const std::string& dtype, bool has_bias) {
        return launch_tuple(mlx_tuner::metal_launch_dora_scale(rows, cols, dtype, has_bias));
      },
      "rows"_a,
      "cols"_a,
      "dtype"_a,
      "has_bias"_a,
      "(kernel name, threadgroups, threads) of the Metal DoRAScale dispatch.");
  m.def(
      "metal_launch_dora_scale_vjp",
      [](int rows, int cols, const std::string& dtype) {
        return launch_tuple(mlx_tuner::metal_launch_dora_scale_vjp(rows, cols, dtype));
      },
      "rows"_a,
      "cols"_a,
      "dtype"_a,
      "(kernel name, threadgroups, threads) of the Metal DoRAScaleVJP tile pass.");
  m.def(
      "metal_launch_dora_scale_colsum",
      [](int cols, const std::string& dtype) {
        return launch_tuple(mlx_tuner::metal_launch_dora_scale_colsum(cols, dtype));
      },
      "cols"_a,
      "dtype"_a,
      "(kernel name, threadgroups, threads) of the Metal DoRAScaleVJP column sums.");
}

} // namespace mlx_tuner::bindings
