// Python bindings of the lora family: the fused op (mlx_tuner.ops.lora_linear calls it)
// and the Metal launch geometry, so the emulator tests use the host's very numbers.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "bindings/common.h"
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
  m.def(
      "metal_launch_lora_xa",
      [](int n, int r, const std::string& t, const std::string& u) {
        return launch_tuple(metal_launch_lora_xa(n, r, t, u));
      },
      "n"_a, "r"_a, "dtype"_a, "lora_dtype"_a,
      "(kernel, threadgroups, threads) of the Metal kernel xa = x_d A.");
  m.def(
      "metal_launch_lora_linear",
      [](int n, int out, const std::string& t, const std::string& u, bool has_bias) {
        return launch_tuple(metal_launch_lora_linear(n, out, t, u, has_bias));
      },
      "n"_a, "out"_a, "dtype"_a, "lora_dtype"_a, "has_bias"_a,
      "(kernel, threadgroups, threads) of the fused Metal forward GEMM.");
  m.def(
      "metal_launch_lora_g",
      [](int n, const std::string& t, const std::string& u) {
        return launch_tuple(metal_launch_lora_g(n, t, u));
      },
      "n"_a, "dtype"_a, "lora_dtype"_a,
      "(kernel, threadgroups, threads) of the Metal kernel g = dy B^T.");
  m.def(
      "metal_launch_lora_dx",
      [](int n, int in, const std::string& t, const std::string& u, bool base,
          bool lora) {
        return launch_tuple(metal_launch_lora_dx(n, in, t, u, base, lora));
      },
      "n"_a, "in_dims"_a, "dtype"_a, "lora_dtype"_a, "base"_a, "lora"_a,
      "(kernel, threadgroups, threads) of the Metal GEMM dx = [dy W] + [s g A^T].");
  m.def(
      "metal_launch_lora_da",
      [](int in, int r, const std::string& t, const std::string& u) {
        return launch_tuple(metal_launch_lora_da(in, r, t, u));
      },
      "in_dims"_a, "r"_a, "dtype"_a, "lora_dtype"_a,
      "(kernel, threadgroups, threads) of the Metal kernel dA = s x_d^T g.");
  m.def(
      "metal_launch_lora_db",
      [](int r, int out, const std::string& t, const std::string& u) {
        return launch_tuple(metal_launch_lora_db(r, out, t, u));
      },
      "r"_a, "out"_a, "dtype"_a, "lora_dtype"_a,
      "(kernel, threadgroups, threads) of the Metal kernel dB = s xa^T dy.");
}

} // namespace mlx_tuner::bindings
