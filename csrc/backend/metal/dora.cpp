// Metal host code of the dora family (macOS only; kernels in metal/dora.h, launch geometry
// from metal_launch_dora_* in csrc/ops/dora.cpp, shared with the emulator tests):
// - DoRARowSqNorm: c_i = ||W_i||^2, a threadgroup per row.
// - DoRAInvNorm: G = Aᵀ A into a temporary (dora_gram), then 1 / n a column per thread.
// - DoRAScale: y = z * sv (+ bias).
// - DoRAScaleVJP: dz alone by the forward's kernel (no bias); else one pass over dy (and z)
//   writing dz and float32 partial column sums per row tile into temporaries, then the
//   column sums (dsv, dbias) added in order. Only the gradients asked for are written.
#include <algorithm>
#include <optional>

#include "backend/metal/common.h"
#include "common/checks.h"
#include "mlx/backend/metal/device.h"
#include "ops/dora.h"

namespace mlx_tuner {

void DoRARowSqNorm::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  int rows = in[0].shape(0);
  int k = quantized_ ? in[0].shape(1) * 32 / bits_ : in[0].shape(1);
  auto launch = metal_launch_dora_row_sq_norm(
      rows, dtype_str(quantized_ ? in[1].dtype() : in[0].dtype()), quantized_ ? bits_ : 0);
  auto& enc = metal::begin(stream(), launch);
  int slot = 0;
  for (auto& a : in) {
    enc.set_input_array(a, slot++);
  }
  enc.set_output_array(out, slot++);
  enc.set_bytes(k, slot++);
  if (quantized_) {
    enc.set_bytes(group_size_, slot++);
  }
  metal::dispatch(enc, launch);
}

// inputs: p (out, r) | pᵀ (r, out) in its dtype, b f32 (r, out), a f32 (in, r), c f32 (out,).
void DoRAInvNorm::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  if (bits_) { // compose_gpu builds the quantized form for CUDA (and the CPU) only
    throw std::logic_error("[dora_inv_norm_quant] no Metal kernel: MLX's quantized matmul makes P");
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  const auto& p = in[0];
  const auto& b = in[1];
  const auto& a = in[2];
  const auto& c = in[3];
  int rows = a.shape(0), r = a.shape(1), n_out = out.size();
  if (n_out == 0) {
    return;
  }
  auto s = stream();
  auto g = metal::temporary(s, {std::max(r, 1), std::max(r, 1)}, mx::float32); // Aᵀ A
  if (r > 0) {
    auto l = metal_launch_dora_gram(r);
    auto& enc = metal::begin(s, l);
    enc.set_input_array(a, 0);
    enc.set_output_array(g, 1);
    enc.set_bytes(rows, 2);
    enc.set_bytes(r, 3);
    metal::dispatch(enc, l);
  }
  {
    auto l = metal_launch_dora_inv_norm(n_out, dtype_str(p.dtype()));
    auto& enc = metal::begin(s, l);
    enc.set_input_array(p, 0);
    enc.set_input_array(b, 1);
    enc.set_input_array(g, 2); // unread when r == 0
    enc.set_input_array(c, 3);
    enc.set_output_array(out, 4);
    enc.set_bytes(n_out, 5);
    enc.set_bytes(r, 6);
    enc.set_bytes(scale_, 7);
    enc.set_bytes(static_cast<int>(p_transposed_), 8);
    metal::dispatch(enc, l);
  }
}

namespace {

// out = in * sv (+ bias): the forward, and dz alone.
void scale_cols(mx::Stream s, const mx::array& in, const mx::array& sv, const mx::array* bias,
                mx::array& out) {
  int cols = in.ndim() == 2 ? in.shape(1) : 0;
  int rows = cols ? static_cast<int>(in.size() / cols) : 0;
  if (rows == 0 || cols == 0) {
    return;
  }
  auto l = metal_launch_dora_scale(rows, cols, dtype_str(in.dtype()), bias != nullptr);
  auto& enc = metal::begin(s, l);
  enc.set_input_array(in, 0);
  enc.set_input_array(sv, 1);
  enc.set_input_array(bias ? *bias : in, 2); // unread without bias
  enc.set_output_array(out, 3);
  enc.set_bytes(rows, 4);
  enc.set_bytes(cols, 5);
  metal::dispatch(enc, l);
}

// Slot i: the output o when it is wanted, else `unused` (an input of o's type, unwritten).
void bind_output(mx::metal::CommandEncoder& enc, mx::array* o, const mx::array& unused, int i) {
  if (o) {
    enc.set_output_array(*o, i);
  } else {
    enc.set_input_array(unused, i);
  }
}

} // namespace

// inputs: z (N, out) in T, sv f32 (out,), [bias (out,) in T].
void DoRAScale::eval_gpu(const std::vector<mx::array>& in, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  scale_cols(stream(), in[0], in[1], has_bias_ ? &in[2] : nullptr, out);
}

// inputs: dy (N, out) in T, sv f32 (out,), [z (N, out) when dsv is wanted].
// outputs (the wanted ones, in this order): dz in T, dsv f32 (out,), dbias (out,) in T.
void DoRAScaleVJP::eval_gpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  for (auto& o : outs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  int k = 0;
  mx::array* dz = want_.z ? &outs[k++] : nullptr;
  mx::array* dsv = want_.sv ? &outs[k++] : nullptr;
  mx::array* dbias = want_.bias ? &outs[k++] : nullptr;
  const auto& dy = in[0];
  const auto& sv = in[1];
  const auto& z = want_.sv ? in[2] : dy; // z is unread without dsv
  auto s = stream();
  if (!dsv && !dbias) { // dz alone: the forward's kernel
    scale_cols(s, dy, sv, nullptr, *dz);
    return;
  }
  int cols = sv.shape(0);
  int rows = cols ? static_cast<int>(dy.size() / cols) : 0;
  if (cols == 0) { // every output is empty
    return;
  }
  auto t = dtype_str(dy.dtype());
  auto tiles = metal_launch_dora_scale_vjp(rows, cols, t);
  int row_tiles = static_cast<int>(tiles.threadgroups[1]);
  // The partial rows of the wanted sums (row_tiles x cols, float32; one row, unread, for
  // an empty batch).
  auto partial = [&]() {
    return metal::temporary(s, {std::max(row_tiles, 1), cols}, mx::float32);
  };
  std::optional<mx::array> part_sv, part_b;
  if (dsv) {
    part_sv = partial();
  }
  if (dbias) {
    part_b = partial();
  }
  int want_dz = dz != nullptr, want_sv = dsv != nullptr, want_bias = dbias != nullptr;
  if (row_tiles > 0) {
    auto& enc = metal::begin(s, tiles);
    enc.set_input_array(dy, 0);
    enc.set_input_array(sv, 1);
    enc.set_input_array(z, 2);
    bind_output(enc, dz, dy, 3);
    bind_output(enc, part_sv ? &*part_sv : nullptr, sv, 4);
    bind_output(enc, part_b ? &*part_b : nullptr, sv, 5);
    enc.set_bytes(rows, 6);
    enc.set_bytes(cols, 7);
    enc.set_bytes(want_dz, 8);
    enc.set_bytes(want_sv, 9);
    enc.set_bytes(want_bias, 10);
    metal::dispatch(enc, tiles);
  }
  {
    auto l = metal_launch_dora_scale_colsum(cols, t);
    auto& enc = metal::begin(s, l);
    enc.set_input_array(part_sv ? *part_sv : sv, 0);
    enc.set_input_array(part_b ? *part_b : sv, 1);
    bind_output(enc, dsv, sv, 2);
    bind_output(enc, dbias, dy, 3);
    enc.set_bytes(row_tiles, 4);
    enc.set_bytes(cols, 5);
    enc.set_bytes(want_sv, 6);
    enc.set_bytes(want_bias, 7);
    metal::dispatch(enc, l);
  }
}

} // namespace mlx_tuner
