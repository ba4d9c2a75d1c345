// Python bindings of the divergence family: the ops and their Metal launch geometry.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>

#include "bindings/common.h"
#include "ops/divergence.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace mlx_tuner::bindings {

void init_divergence(nb::module_& m) {
  m.def(
      "kl_div",
      &mlx_tuner::kl_div,
      "logits_q"_a,
      "logits_p"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "KL(softmax(p) || softmax(q)) per row (fused primitive).");
  m.def(
      "js_div",
      &mlx_tuner::js_div,
      "logits_q"_a,
      "logits_p"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Jensen-Shannon divergence of softmax(q) and softmax(p) per row (fused primitive).");
  for (auto kind : {Divergence::KL, Divergence::JS}) {
    std::string op = divergence_op_name(kind);
    m.def(
        ("metal_launch_" + op + "_forward").c_str(),
        [kind](size_t rows, int V, const std::string& dtype) {
          return launch_tuple(metal_launch_divergence_forward(kind, rows, V, dtype));
        },
        "rows"_a,
        "V"_a,
        "dtype"_a,
        "(kernel name, threadgroups, threads) of the Metal forward.");
    m.def(
        ("metal_launch_" + op + "_backward").c_str(),
        [kind](size_t rows, int V, const std::string& dtype, bool grad_q, bool grad_p) {
          return launch_tuple(
              metal_launch_divergence_backward(kind, rows, V, dtype, grad_q, grad_p));
        },
        "rows"_a,
        "V"_a,
        "dtype"_a,
        "grad_q"_a,
        "grad_p"_a,
        "(kernel name, threadgroups, threads) of the Metal backward.");
  }
}

} // namespace mlx_tuner::bindings
