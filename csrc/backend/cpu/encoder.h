// The CPU encoder of a primitive's stream, ready for its task: every output allocated and
// every input and output registered, so that MLX runs the task after the inputs' producers
// and keeps the arrays alive until it has run.
#pragma once

#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlx_tuner::cpu {

inline mlx::core::cpu::CommandEncoder& prepare(
    const mlx::core::Stream& s,
    const std::vector<mlx::core::array>& inputs,
    std::vector<mlx::core::array>& outputs) {
  for (auto& o : outputs) o.set_data(mlx::core::allocator::malloc(o.nbytes()));
  auto& enc = mlx::core::cpu::get_command_encoder(s);
  for (const auto& in : inputs) enc.set_input_array(in);
  for (auto& o : outputs) enc.set_output_array(o);
  return enc;
}

} // namespace mlx_tuner::cpu
