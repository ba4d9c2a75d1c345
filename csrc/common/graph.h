// Graph-building helpers shared by the ops.
#pragma once

#include "mlx/ops.h"

namespace mlx_tuner {

// mx::contiguous without a graph node for an array already evaluated row-contiguous (the
// frozen weights, the LoRA parameters): every node costs host time at every call, which
// on a GPU adds up to a share of a small layer's time.
inline mlx::core::array contiguous_rows(const mlx::core::array& a, mlx::core::StreamOrDevice s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mlx::core::contiguous(a, false, s);
}

} // namespace mlx_tuner
