// Shared pieces of the ops' argument errors: "[op] <argument> must ... but got ...".
#pragma once

#include <sstream>
#include <string>

#include "mlx/array.h"

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

} // namespace mlx_tuner
