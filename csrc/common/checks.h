// Shared pieces of the ops' argument errors: "[op] <argument> must ... but got ...".
#pragma once

#include <sstream>
#include <string>

#include <stdexcept>

#include "mlx/array.h"
#include "mlx/utils.h"

namespace mlx_tuner {

// A shape as Python prints the tuple: (), (4,), (2, 3). Errors read like the Python ones.
inline std::string shape_str(const mlx::core::Shape& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    o << s[i] << (s.size() == 1 ? "," : (i + 1 < s.size() ? ", " : ""));
  }
  o << ")";
  return o.str();
}

// The argument checks of one op, each error "[op] <argument> must ... but got ...":
//   constexpr ArgCheck check{"[lora_linear]"};  check.shape("bias", *bias, {out});
struct ArgCheck {
  const char* op;

  [[noreturn]] void fail(const std::string& msg) const {
    throw std::invalid_argument(std::string(op) + " " + msg);
  }
  // float32, float16 or bfloat16 (the dtypes every kernel takes)
  void floating(const char* name, const mlx::core::array& a) const {
    auto t = a.dtype();
    if (t != mlx::core::float32 && t != mlx::core::float16 && t != mlx::core::bfloat16) {
      std::ostringstream o;
      o << name << " must be float32, float16 or bfloat16 but got " << t << ".";
      fail(o.str());
    }
  }
  void shape(const char* name, const mlx::core::array& a, const mlx::core::Shape& want) const {
    if (a.shape() != want) {
      fail(std::string(name) + " must have shape " + shape_str(want) + " but got " +
           shape_str(a.shape()) + ".");
    }
  }
  void ndim(const char* name, const mlx::core::array& a, int n) const {
    if (static_cast<int>(a.ndim()) != n) {
      fail(std::string(name) + " must have " + std::to_string(n) +
           " dimensions but got shape " + shape_str(a.shape()) + ".");
    }
  }
};

} // namespace mlx_tuner
