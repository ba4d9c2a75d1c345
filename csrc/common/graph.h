// Graph-building helpers shared by the ops.
#pragma once

#include <cstring>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_tuner {

// Whether `a` will be row-contiguous once evaluated, known while the graph is built: an
// evaluated array's own layout, or, through the Copy nodes that mx.vjp / mx.grad wrap
// their primals in (Copy's eval shares its input's buffer, strides and all), the layout of
// their evaluated source.
inline bool row_contiguous_when_evaluated(const mlx::core::array& a) {
  const mlx::core::array* p = &a;
  while (!p->is_available() && p->has_primitive() && p->inputs().size() == 1 &&
         std::strcmp(p->primitive().name(), "Copy") == 0) {
    p = &p->inputs()[0];
  }
  return p->is_available() && p->flags().row_contiguous;
}

// mx::contiguous without a graph node for an array that is or will be row-contiguous (the
// frozen weights, the LoRA parameters, a training step's primals): every node costs host
// time at every call, which on a GPU adds up to a share of a small layer's time.
inline mlx::core::array contiguous_rows(const mlx::core::array& a, mlx::core::StreamOrDevice s) {
  if (row_contiguous_when_evaluated(a)) {
    return a;
  }
  return mlx::core::contiguous(a, false, s);
}

} // namespace mlx_tuner
