// Stand-in for <fmt/format.h>: MLX's CUDA headers (lru_cache.h) call fmt::format with
// "{}" placeholders on error paths only. The mlx-cuda wheel ships no fmt, and fmt's
// header-only mode does not compile under nvcc, so this substitutes each "{}" in turn.
#pragma once
#include <sstream>
#include <string>
#include <string_view>

namespace fmt {

inline void append_formatted(std::ostringstream& out, std::string_view pattern) {
  out << pattern;
}

template <typename First, typename... More>
void append_formatted(
    std::ostringstream& out,
    std::string_view pattern,
    const First& first,
    const More&... more) {
  auto at = pattern.find("{}");
  if (at == std::string_view::npos) {
    out << pattern;
    return;
  }
  out << pattern.substr(0, at) << first;
  append_formatted(out, pattern.substr(at + 2), more...);
}

template <typename... Args>
std::string format(std::string_view pattern, const Args&... args) {
  std::ostringstream out;
  append_formatted(out, pattern, args...);
  return out.str();
}

} // namespace fmt
