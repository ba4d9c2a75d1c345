// CPU kernels of the fused LoRA linear (maths in csrc/ops/lora.h). Every product runs
// through the optimized BLAS (float32, threaded); half-precision activations are
// widened in row tiles of ~16 MiB, the base weight once per call. The rank-r
// term goes into the base GEMM's output buffer as a beta = 1 GEMM: no (N, out)
// temporary, no separate add pass.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/encoder.h"
#include "backend/cpu/f32_tiles.h"
#include "common/blas.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/lora.h"

namespace mlx_tuner {

namespace {

using cpu::F32Out;
using cpu::F32Rows;
using cpu::F32Whole;

// sgemm that also accepts empty inner dimensions (r = 0, in = 0): C = beta C.
void gemm(
    bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
    const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {
    for (int i = 0; i < m; ++i) {
      float* row = c + int64_t(i) * ldc;
      for (int j = 0; j < n; ++j) row[j] = beta == 0.0f ? 0.0f : beta * row[j];
    }
    return;
  }
  sgemm(ta, tb, m, n, k, alpha, a, std::max(lda, 1), b, std::max(ldb, 1), beta, c,
        std::max(ldc, 1));
}

// Rows per tile: all of them when nothing needs widening, else ~4M floats (16 MiB) per
// operand and at least 256 rows. Large tiles mean few BLAS calls: every call is a
// fork/join of the BLAS threads, costly on a busy machine (measured with perf).
int64_t tile_rows(int64_t n, int64_t widest, bool all_f32) {
  // The tests set MLX_TUNER_LORA_TILE_ROWS to run many tiles on small shapes.
  if (const char* env = std::getenv("MLX_TUNER_LORA_TILE_ROWS")) {
    if (int64_t v = std::atoll(env); v > 0) {
      return v;
    }
  }
  if (all_f32) {
    return std::max<int64_t>(n, 1);
  }
  return std::max<int64_t>((int64_t(1) << 22) / std::max<int64_t>(widest, 1), 256);
}

// Rows of W per widened tile: a half-precision W is widened into float32 tiles of at most
// 8 MB. MLX's CPU allocator keeps at most 32 MB of freed memory for reuse, so a whole
// widened W above that came fresh from the OS at every call and was faulted in (with the
// x and y tiles, 8 MB tiles stay within it). A float32 W is used in place, whole.
int64_t w_tile_rows(const mx::array& w, int out, int in) {
  if (const char* env = std::getenv("MLX_TUNER_LORA_W_TILE_ROWS")) { // tests: many tiles
    if (int64_t v = std::atoll(env); v > 0) {
      return v;
    }
  }
  if (w.dtype() == mx::float32) {
    return std::max(out, 1);
  }
  return std::max<int64_t>(64, (int64_t(1) << 21) / std::max(in, 1));
}

} // namespace

void LoRALinear::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  auto& y = outputs[0];
  auto& xa = outputs[1];
  int xd_idx = has_bias_ ? 5 : 4;
  enc.dispatch([x = inputs[0], w = inputs[1], a = inputs[2], b = inputs[3],
                bias = has_bias_ ? std::optional(inputs[4]) : std::nullopt,
                xd = has_xd_ ? std::optional(inputs[xd_idx]) : std::nullopt, y, xa,
                s = scale_]() mutable {
    int64_t n = x.shape(0);
    int in = w.shape(1), out = w.shape(0), r = a.shape(1);
    if (n == 0) {
      return;
    }
    F32Whole a32(a), b32(b);
    F32Rows wt(w, in);
    const int64_t wr = w_tile_rows(w, out, in);
    std::optional<F32Whole> bias32;
    if (bias) bias32.emplace(*bias);
    bool all_f32 = x.dtype() == mx::float32 && y.dtype() == mx::float32 &&
        (!xd || xd->dtype() == mx::float32);
    int64_t mb = tile_rows(n, std::max(in, out), all_f32);
    F32Rows xt(x, in);
    std::optional<F32Rows> xdt;
    if (xd) xdt.emplace(*xd, in);
    cpu::Scratch ytile(y.dtype() == mx::float32 ? 0 : std::min(mb, n) * out);
    float* xa_p = xa.data<float>();
    for (int64_t r0 = 0; r0 < n; r0 += mb) {
      int m = static_cast<int>(std::min(mb, n - r0));
      const float* xp = xt.load(r0, m);
      const float* xdp = xdt ? xdt->load(r0, m) : xp;
      float* xa_t = xa_p + r0 * r;
      float* yt = ytile.empty() ? y.data<float>() + r0 * out : ytile.get();
      // xa = x_d A (saved for the backward)
      gemm(false, false, m, r, in, 1.0f, xdp, in, a32.get(), r, 0.0f, xa_t, r);
      float beta = 0.0f;
      if (bias32) {
        const float* bp = bias32->get();
        cpu::between_gemms_for(m, 64, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) std::memcpy(yt + i * out, bp, out * 4);
        });
        beta = 1.0f;
      }
      // y = x W^T (+ bias), by tiles of W's rows (y's columns), then y += (s xa) B into
      // the same buffer
      for (int64_t j0 = 0; j0 < out; j0 += wr) {
        int jm = static_cast<int>(std::min<int64_t>(wr, out - j0));
        gemm(false, true, m, jm, in, 1.0f, xp, in, wt.load(j0, jm), in, beta, yt + j0, out);
      }
      gemm(false, false, m, out, r, s, xa_t, r, b32.get(), out, 1.0f, yt, out);
      if (!ytile.empty()) {
        cpu::narrow_par(yt, static_cast<char*>(y.data<void>()) + r0 * out * y.itemsize(),
                        y.dtype(), int64_t(m) * out);
      }
    }
  });
}

void LoRALinearVJP::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  auto g = grads_.copies(outputs);
  enc.dispatch([x = inputs[0], w = inputs[1], a = inputs[2], b = inputs[3], xa = inputs[4],
                dy = inputs[5], xd = has_xd_ ? std::optional(inputs[6]) : std::nullopt,
                dx = g.x, dw = g.weight, da = g.lora_a, db = g.lora_b, dbias = g.bias,
                dxd = g.x_dropped, s = scale_]() mutable {
    int64_t n = x.shape(0);
    int in = w.shape(1), out = w.shape(0), r = a.shape(1);
    // LoRA part of the input gradient: into dx, or into dx_d when dropout was applied.
    bool lora_into_dx = dx && !xd;
    bool need_g = da || dxd || lora_into_dx;
    if (n == 0) { // empty batch: the parameter gradients are zeros
      for (auto* o : {&dw, &da, &db, &dbias}) {
        if (*o) std::memset((*o)->data<void>(), 0, (*o)->nbytes());
      }
      return;
    }
    std::optional<F32Whole> a32, b32;
    F32Rows wt(w, in);
    const int64_t wr = w_tile_rows(w, out, in);
    if (lora_into_dx || dxd) a32.emplace(a);
    if (need_g) b32.emplace(b);
    // Accumulators over row tiles (zeroed: the tiles add into them).
    std::optional<F32Out> dw_acc, da_acc, db_acc, dbias_acc;
    if (dw) dw_acc.emplace(*dw, true);
    if (da) da_acc.emplace(*da, true);
    if (db) db_acc.emplace(*db, true);
    if (dbias) dbias_acc.emplace(*dbias, true);

    bool all_f32 = x.dtype() == mx::float32 && dy.dtype() == mx::float32 &&
        (!xd || xd->dtype() == mx::float32) && (!dx || dx->dtype() == mx::float32) &&
        (!dxd || dxd->dtype() == mx::float32);
    int64_t mb = tile_rows(n, std::max(in, out), all_f32);
    F32Rows dyt(dy, out), xt(x, in);
    std::optional<F32Rows> xdt;
    if (xd) xdt.emplace(*xd, in);
    int64_t mt = std::min(mb, std::max<int64_t>(n, 1));
    cpu::Scratch g(need_g ? mt * r : 0);
    cpu::Scratch in_tile((dx || dxd) ? mt * in : 0);
    const float* xa_p = xa.data<float>();

    auto input_grad = [&](mx::array& dst_, bool base, bool lora, int64_t r0, int m,
                          const float* dyp) {
      mx::array* dst = &dst_;
      bool direct = dst->dtype() == mx::float32;
      float* t = direct ? dst->data<float>() + r0 * in : in_tile.get();
      float beta = 0.0f;
      if (base) { // dy W, summed over tiles of W's rows (out == 0: one empty product, zeros)
        for (int64_t j0 = 0; j0 == 0 || j0 < out; j0 += wr) {
          int jm = static_cast<int>(std::min<int64_t>(wr, out - j0));
          gemm(false, false, m, in, jm, 1.0f, dyp + j0, out, wt.load(j0, jm), in,
               j0 == 0 ? 0.0f : 1.0f, t, in);
        }
        beta = 1.0f;
      }
      if (lora) {
        gemm(false, true, m, in, r, s, g.get(), r, a32->get(), r, beta, t, in);
      }
      if (!direct) {
        cpu::narrow_par(t, static_cast<char*>(dst->data<void>()) + r0 * in * dst->itemsize(),
                        dst->dtype(), int64_t(m) * in);
      }
    };

    for (int64_t r0 = 0; r0 < n; r0 += mb) {
      int m = static_cast<int>(std::min(mb, n - r0));
      const float* dyp = dyt.load(r0, m);
      if (need_g) { // g = dy B^T
        gemm(false, true, m, r, out, 1.0f, dyp, out, b32->get(), out, 0.0f, g.get(), r);
      }
      if (dx) input_grad(*dx, true, lora_into_dx, r0, m, dyp);
      if (dxd) input_grad(*dxd, false, true, r0, m, dyp);
      if (da) { // dA += s x_d^T g
        const float* xdp = xdt ? xdt->load(r0, m) : xt.load(r0, m);
        gemm(true, false, in, r, m, s, xdp, in, g.get(), r, 1.0f, da_acc->get(), r);
      }
      if (db) { // dB += s xa^T dy
        gemm(true, false, r, out, m, s, xa_p + r0 * r, r, dyp, out, 1.0f, db_acc->get(), out);
      }
      if (dw) { // dW += dy^T x
        gemm(true, false, out, in, m, 1.0f, dyp, out, xt.load(r0, m), in, 1.0f,
             dw_acc->get(), in);
      }
      if (dbias) {
        float* acc = dbias_acc->get();
        cpu::between_gemms_for(out, 256, [&](int64_t j0, int64_t j1) {
          for (int i = 0; i < m; ++i) {
            const float* row = dyp + int64_t(i) * out;
            for (int64_t j = j0; j < j1; ++j) acc[j] += row[j];
          }
        });
      }
    }
    for (auto* acc : {&dw_acc, &da_acc, &db_acc, &dbias_acc}) {
      if (*acc) (*acc)->finish();
    }
  });
}

} // namespace mlx_tuner
