// CPU kernels of QLoRA (maths in ops/qlora.h). W is dequantized a panel at a time into
// a float32 buffer of about kPanelFloats (rows of W for the forward, columns for dx),
// in parallel over its rows, and each panel feeds one OpenBLAS sgemm (threaded by
// OpenBLAS itself); the LoRA term is accumulated into the same output block. Scratch
// buffers come from MLX's allocator so that MLX's peak-memory counter sees them.
#include <algorithm>
#include <cstring>
#include <optional>

#include "backend/cpu/f32_tiles.h"
#include "common/blas.h"
#include "common/parallel.h"
#include "common/quant_panel.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/qlora.h"

namespace mlx_tuner {

namespace {

// A dequantized panel holds about this many floats (4 MiB): a slice of W, never all.
constexpr int64_t kPanelFloats = int64_t(1) << 20;

// float32 scratch from MLX's allocator, and half-precision operands widened whole
// (f32_tiles.h).
using cpu::F32Whole;
using cpu::Scratch;

// out[i, j0 + j] = T(src[i, j] + bias[j0 + j]) for a rows x cols block.
template <typename T>
void store_block(
    const float* src, int64_t ld_src, T* out, int64_t ld_out, int64_t rows, int64_t cols,
    const T* bias) {
  parallel_for(rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
               [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* s = src + i * ld_src;
      T* o = out + i * ld_out;
      for (int64_t j = 0; j < cols; ++j) {
        float v = s[j] + (bias ? static_cast<float>(bias[j]) : 0.0f);
        o[j] = static_cast<T>(v);
      }
    }
  });
}

void store_any(const float* src, int64_t ld_src, mx::array& out, int64_t col0, int64_t ld_out,
               int64_t rows, int64_t cols, const mx::array* bias) {
  auto go = [&](auto* o, auto* b) {
    store_block(src, ld_src, o + col0, ld_out, rows, cols, b ? b + col0 : nullptr);
  };
  switch (out.dtype()) {
    case mx::float32:
      go(out.data<float>(), bias ? bias->data<float>() : nullptr);
      break;
    case mx::float16:
      go(out.data<mx::float16_t>(), bias ? bias->data<mx::float16_t>() : nullptr);
      break;
    default:
      go(out.data<mx::bfloat16_t>(), bias ? bias->data<mx::bfloat16_t>() : nullptr);
      break;
  }
}

// W's (n, k) quantized matrix for the panel dequantizer (common/quant_panel.h).
quant::QMatrix qmatrix(const mx::array& w, const mx::array& scales, const mx::array& biases,
                       const QLoRAParams& p) {
  return {reinterpret_cast<const uint8_t*>(w.data<uint32_t>()), scales.data<void>(),
          biases.data<void>(), scales.dtype(), w.shape(1) * 32 / p.bits, p.bits,
          p.group_size};
}

void forward(const std::vector<mx::array>& in, std::vector<mx::array>& out,
             const QLoRAParams& p) {
  const auto &x = in[0], &w = in[1], &scales = in[2], &biases = in[3];
  const float* a = in[4].data<float>();
  const float* b = in[5].data<float>();
  const int64_t n = w.shape(0), k = x.shape(-1), r = in[4].shape(1);
  const int64_t m = k == 0 ? 0 : x.size() / k;
  if (m == 0) {
    return;
  }
  F32Whole xw(x);
  std::optional<F32Whole> xdw;
  if (p.has_xd) xdw.emplace(in[6]);
  const float* xf = xw.get();
  const float* xdf = xdw ? xdw->get() : xf;
  const mx::array* bias = p.has_bias ? &in[p.has_xd ? 7 : 6] : nullptr;
  auto& y = out[0];
  float* xa = out[1].data<float>();
  if (r > 0) {
    sgemm(false, false, m, r, k, 1.0f, xdf, k, a, r, 0.0f, xa, r);
  }

  const bool direct = y.dtype() == mx::float32; // write straight into y
  const int64_t nb = std::min<int64_t>(n, std::max<int64_t>(16, kPanelFloats / k / 16 * 16));
  Scratch panel(nb * k);
  const quant::QMatrix qw = qmatrix(w, scales, biases, p);
  Scratch stage(direct ? 0 : m * nb);
  for (int64_t n0 = 0; n0 < n; n0 += nb) {
    const int64_t nw = std::min(nb, n - n0);
    quant::dequantize_panel(qw, n0, nw, 0, k, panel.get());
    float* c = direct ? y.data<float>() + n0 : stage.get();
    const int64_t ldc = direct ? n : nw;
    float beta = 0.0f;
    if (r > 0) {
      sgemm(false, false, m, nw, r, p.scale, xa, r, b + n0, n, 0.0f, c, ldc);
      beta = 1.0f;
    }
    sgemm(false, true, m, nw, k, 1.0f, xf, k, panel.get(), k, beta, c, ldc);
    if (!direct || bias) {
      store_any(c, ldc, y, n0, n, m, nw, bias);
    }
  }
}

void backward(const std::vector<mx::array>& in, std::vector<mx::array>& out,
              const QLoRAParams& p, const QLoRAGrads& g) {
  const auto &dy = in[0], &w = in[1], &scales = in[2], &biases = in[3];
  const float* a = in[4].data<float>();
  const float* b = in[5].data<float>();
  const auto& xd = in[6];
  const float* xa = in[7].data<float>();
  const int64_t n = w.shape(0), k = xd.shape(-1), r = in[4].shape(1);
  const int64_t m = k == 0 ? 0 : xd.size() / k;
  int o = 0;
  mx::array* dx = g.dx ? &out[o++] : nullptr;
  mx::array* dxd = g.dxd ? &out[o++] : nullptr;
  mx::array* da = g.da ? &out[o++] : nullptr;
  mx::array* db = g.db ? &out[o++] : nullptr;
  if (m == 0 || r == 0) { // sums over no rows (or a rank-0 adapter) are zero
    for (auto* z : {da, db}) {
      if (z) {
        std::memset(z->data<float>(), 0, z->nbytes());
      }
    }
    if (m == 0) {
      return;
    }
  }
  F32Whole dyw(dy);
  const float* dyf = dyw.get();
  Scratch gl(m * r); // g = s dy Bᵀ
  if (r > 0) {
    sgemm(false, true, m, r, n, p.scale, dyf, n, b, n, 0.0f, gl.get(), r);
    if (da) {
      F32Whole xdw(xd);
      sgemm(true, false, k, r, m, 1.0f, xdw.get(), k, gl.get(), r, 0.0f, da->data<float>(), r);
    }
    if (db) {
      sgemm(true, false, r, n, m, p.scale, xa, r, dyf, n, 0.0f, db->data<float>(), n);
    }
  }
  if (dxd) {
    const bool direct = dxd->dtype() == mx::float32;
    Scratch stage(direct ? 0 : m * k);
    float* c = direct ? dxd->data<float>() : stage.get();
    if (r > 0) {
      sgemm(false, true, m, k, r, 1.0f, gl.get(), r, a, r, 0.0f, c, k);
    } else {
      std::memset(c, 0, m * k * sizeof(float));
    }
    if (!direct) {
      store_any(c, k, *dxd, 0, k, m, k, nullptr);
    }
  }
  if (dx) {
    // Column panels of W (multiples of 128 columns: whole groups, whole bytes).
    const bool direct = dx->dtype() == mx::float32;
    const int64_t kb = std::min<int64_t>(k, std::max<int64_t>(128, kPanelFloats / n / 128 * 128));
    Scratch panel(n * kb);
    const quant::QMatrix qw = qmatrix(w, scales, biases, p);
    Scratch stage(direct ? 0 : m * kb);
    for (int64_t k0 = 0; k0 < k; k0 += kb) {
      const int64_t kw = std::min(kb, k - k0);
      quant::dequantize_panel(qw, 0, n, k0, k0 + kw, panel.get());
      float* c = direct ? dx->data<float>() + k0 : stage.get();
      const int64_t ldc = direct ? k : kw;
      float beta = 0.0f;
      if (!p.has_xd && r > 0) {
        sgemm(false, true, m, kw, r, 1.0f, gl.get(), r, a + k0 * r, r, 0.0f, c, ldc);
        beta = 1.0f;
      }
      sgemm(false, false, m, kw, n, 1.0f, dyf, n, panel.get(), kw, beta, c, ldc);
      if (!direct) {
        store_any(c, ldc, *dx, k0, k, m, kw, nullptr);
      }
    }
  }
}

template <typename F>
void dispatch(mx::Stream s, const std::vector<mx::array>& inputs,
              std::vector<mx::array>& outputs, F&& f) {
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
  }
  auto& enc = mx::cpu::get_command_encoder(s);
  std::vector<mx::array> in, out;
  for (auto& a : inputs) {
    enc.set_input_array(a);
    in.push_back(mx::array::unsafe_weak_copy(a));
  }
  for (auto& a : outputs) {
    enc.set_output_array(a);
    out.push_back(mx::array::unsafe_weak_copy(a));
  }
  enc.dispatch([in = std::move(in), out = std::move(out), f = std::forward<F>(f)]() mutable {
    f(in, out);
  });
}

} // namespace

void QLoRA::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs, [p = p_](auto& in, auto& out) { forward(in, out, p); });
}

void QLoRAVJP::eval_cpu(const std::vector<mx::array>& inputs,
                        std::vector<mx::array>& outputs) {
  dispatch(stream(), inputs, outputs,
           [p = p_, g = g_](auto& in, auto& out) { backward(in, out, p, g); });
}

} // namespace mlx_tuner
