// Shared pieces of the ops' argument errors: "[op] <argument> must ... but got ...".
#pragma once

#include <string>

#include <stdexcept>

#include "common/quant.h"
#include "mlx/array.h"
#include "mlx/utils.h"

namespace mlx_tuner {

// Error text is built from std::string and std::to_string only, never iostreams: in the
// CUDA build on the H200 image, formatting a number through an ostream inside this
// library crashed (SIGSEGV in basic_ostream::_M_insert<long>), so a bad argument killed
// the process instead of raising.

// A shape as Python prints the tuple: (), (4,), (2, 3). Errors read like the Python ones.
inline std::string shape_str(const mlx::core::Shape& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    o += std::to_string(s[i]) + (s.size() == 1 ? "," : (i + 1 < s.size() ? ", " : ""));
  }
  return o + ")";
}

// A dtype's name as MLX prints it ("float32", "bfloat16", ...).
inline std::string dtype_str(mlx::core::Dtype t) {
  using V = mlx::core::Dtype::Val;
  switch (t.val()) {
    case V::bool_: return "bool";
    case V::uint8: return "uint8";
    case V::uint16: return "uint16";
    case V::uint32: return "uint32";
    case V::uint64: return "uint64";
    case V::int8: return "int8";
    case V::int16: return "int16";
    case V::int32: return "int32";
    case V::int64: return "int64";
    case V::float16: return "float16";
    case V::float32: return "float32";
    case V::float64: return "float64";
    case V::bfloat16: return "bfloat16";
    case V::complex64: return "complex64";
  }
  return "unknown";
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
      fail(std::string(name) + " must be float32, float16 or bfloat16 but got " + dtype_str(t) +
           ".");
    }
  }
  void dtype(const char* name, const mlx::core::array& a, mlx::core::Dtype want) const {
    if (a.dtype() != want) {
      fail(std::string(name) + " must be " + dtype_str(want) + " but got " + dtype_str(a.dtype()) +
           ".");
    }
  }
  void shape(const char* name, const mlx::core::array& a, const mlx::core::Shape& want) const {
    if (a.shape() != want) {
      fail(std::string(name) + " must have shape " + shape_str(want) + " but got " +
           shape_str(a.shape()) + ".");
    }
  }
  // bits and group_size of mx.quantize's affine mode, the ones the kernels decode
  void affine(int bits, int group_size) const {
    if (!quant::valid_bits(bits)) {
      fail("bits must be one of 2, 3, 4, 5, 6, 8 but got " + std::to_string(bits) + ".");
    }
    if (!quant::valid_group_size(group_size)) {
      fail("group_size must be 32, 64 or 128 but got " + std::to_string(group_size) + ".");
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
