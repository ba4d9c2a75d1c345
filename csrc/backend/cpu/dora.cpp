// CPU kernels of DoRALinear / DoRALinearVJP (maths in ops/dora.h).
// W is walked in row panels of a few MiB, converted (or dequantized) to float32 one panel
// at a time: no out x in temporary. GEMMs go through the optimized BLAS (threaded
// itself); conversions and epilogues are split across cores with parallel_for.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "backend/cpu/encoder.h"
#include "backend/cpu/f32_tiles.h"
#include "common/blas.h"
#include "common/parallel.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/dora.h"

namespace mlx_tuner {

namespace {

// Our pool splits the work across panels / row blocks and calls a single-threaded BLAS
// (BlasSingleThread): OpenBLAS's own threads spin-wait and slowed these kernels ~4x on a
// loaded 2-core box.
// float32 scratch from MLX's allocator (so that mx.get_peak_memory() counts it), shared
// with the other CPU kernels.
using cpu::F32Whole;
using cpu::Scratch;

// C = alpha op(A) op(B) + beta C, also when k == 0 (then C = beta C).
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) c[(int64_t)i * ldc + j] = beta == 0 ? 0.f : beta * c[(int64_t)i * ldc + j];
    return;
  }
  sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void cvt_in(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// n elements of `a` from element `off` as float32 into dst.
void load(const mx::array& a, int64_t off, int64_t n, float* dst) {
  switch (a.dtype()) {
    case mx::float32: std::memcpy(dst, a.data<float>() + off, n * sizeof(float)); break;
    case mx::float16: cvt_in(a.data<mx::float16_t>() + off, dst, n); break;
    case mx::bfloat16: cvt_in(a.data<mx::bfloat16_t>() + off, dst, n); break;
    default: throw std::runtime_error("[dora_linear] unsupported dtype");
  }
}

// n float32 values into `a` from element `off`, scaled by col_scale[j] (j < n).
template <typename T>
void cvt_out(const float* src, const float* col_scale, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(col_scale ? src[j] * col_scale[j] : src[j]);
}
void store(const float* src, const float* col_scale, mx::array& a, int64_t off, int64_t n) {
  switch (a.dtype()) {
    case mx::float32: cvt_out(src, col_scale, a.data<float>() + off, n); break;
    case mx::float16: cvt_out(src, col_scale, a.data<mx::float16_t>() + off, n); break;
    case mx::bfloat16: cvt_out(src, col_scale, a.data<mx::bfloat16_t>() + off, n); break;
    default: throw std::runtime_error("[dora_linear] unsupported dtype");
  }
}


// One affine-quantized row (little-endian bit stream, mx.quantize's layout) to float32.
template <int BITS, typename S>
void dequant_row(const uint8_t* q, const S* sc, const S* bi, int in, int gs, float* dst) {
  for (int g = 0; g < in / gs; ++g) {
    float s = static_cast<float>(sc[g]), b = static_cast<float>(bi[g]);
    for (int j = g * gs; j < (g + 1) * gs; ++j) {
      int64_t bit = (int64_t)j * BITS;
      uint32_t v = q[bit >> 3];
      if ((bit & 7) + BITS > 8) v |= uint32_t(q[(bit >> 3) + 1]) << 8;
      dst[j] = s * float((v >> (bit & 7)) & ((1u << BITS) - 1)) + b;
    }
  }
}

// The frozen weight, read one row panel at a time.
struct Weight {
  const mx::array& w;
  const mx::array* scales;
  const mx::array* biases;
  int in, gs, bits;

  bool zero_copy() const {
    return scales == nullptr && w.dtype() == mx::float32;
  }

  template <typename S>
  void dequant(int row, float* dst) const {
    int64_t row_bytes = (int64_t)in * bits / 8;
    auto q = reinterpret_cast<const uint8_t*>(w.data<uint32_t>()) + row * row_bytes;
    auto s = scales->data<S>() + (int64_t)row * (in / gs);
    auto b = biases->data<S>() + (int64_t)row * (in / gs);
    switch (bits) {
      case 2: dequant_row<2>(q, s, b, in, gs, dst); break;
      case 3: dequant_row<3>(q, s, b, in, gs, dst); break;
      case 4: dequant_row<4>(q, s, b, in, gs, dst); break;
      case 5: dequant_row<5>(q, s, b, in, gs, dst); break;
      case 6: dequant_row<6>(q, s, b, in, gs, dst); break;
      default: dequant_row<8>(q, s, b, in, gs, dst); break;
    }
  }

  void row(int i, float* dst) const {
    if (scales == nullptr) return load(w, (int64_t)i * in, in, dst);
    switch (scales->dtype()) {
      case mx::float32: return dequant<float>(i, dst);
      case mx::float16: return dequant<mx::float16_t>(i, dst);
      default: return dequant<mx::bfloat16_t>(i, dst);
    }
  }

  // Rows [r0, r1) as float32 (leading dimension `in`), in `buf` unless zero_copy();
  // sq[i - r0] = ||W_i||^2 in float64 when sq is given.
  const float* panel(int r0, int r1, float* buf, double* sq) const {
    const float* p = zero_copy() ? w.data<float>() + (int64_t)r0 * in : buf;
    parallel_for(r1 - r0, 4, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        if (!zero_copy()) row(r0 + i, buf + i * in);
        if (sq) {
          double t = 0;
          for (int j = 0; j < in; ++j) t += double(p[i * in + j]) * p[i * in + j];
          sq[i] = t;
        }
      }
    });
    return p;
  }
};

Weight weight_of(const DoRAConfig& cfg, const DoRAInputs& idx, const std::vector<mx::array>& in) {
  int k = in[idx.x].shape(1);
  if (cfg.quantized) return {in[idx.w], &in[idx.scales], &in[idx.biases], k, cfg.group_size, cfg.bits};
  return {in[idx.w], nullptr, nullptr, k, 0, 0};
}

// Rows per panel: ~1 MiB of float32 (one per running task), at least 16.
int panel_rows(int in, int out) {
  int pr = std::max(16, (1 << 18) / std::max(in, 1));
  return std::max(1, std::min(pr, out));
}

void forward(const DoRAConfig& cfg, const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  DoRAInputs idx(cfg);
  const mx::array& x = in[idx.x];
  int N = x.shape(0), K = x.shape(1), r = in[idx.a].shape(1), O = in[idx.m].size();
  float s = cfg.scale;
  const float* A = in[idx.a].data<float>();
  const float* B = in[idx.b].data<float>();
  const float* m = in[idx.m].data<float>();
  const float* c = cfg.has_c ? in[idx.c].data<float>() : nullptr;
  float* xa = outs[1].data<float>();
  float* n = outs[2].data<float>();
  mx::array& y = outs[0];

  F32Whole xw(x);
  std::optional<F32Whole> xdw;
  if (cfg.has_xd) xdw.emplace(in[idx.xd]);
  const float* xf = xw.get();
  const float* xdf = xdw ? xdw->get() : xf;
  gemm(false, false, N, r, K, 1.f, xdf, K, A, r, 0.f, xa, r);
  std::vector<float> G(r * r);
  gemm(true, false, r, r, K, 1.f, A, r, A, r, 0.f, G.data(), r);

  Weight W = weight_of(cfg, idx, in);
  // Enough panels for every thread; each task owns its buffers.
  int pr = std::max(1, std::min(panel_rows(K, O), std::max(16, (O + num_threads() - 1) / num_threads())));
  int panels = (O + pr - 1) / pr;
  parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    Scratch wbuf(W.zero_copy() ? 0 : (size_t)pr * K), tmp((size_t)N * pr);
    std::vector<float> P((size_t)pr * r), rs(pr);
    std::vector<double> sq(pr);
    for (int64_t p = p0; p < p1; ++p) {
      int r0 = p * pr, nr = std::min(O, r0 + pr) - r0;
      const float* Wp = W.panel(r0, r0 + nr, wbuf.get(), c ? nullptr : sq.data());
      gemm(false, false, nr, r, K, 1.f, Wp, K, A, r, 0.f, P.data(), r);
      for (int i = 0; i < nr; ++i) { // n_i^2 = c_i + 2s b.P_i + s^2 b^T G b, in float64
        int o = r0 + i;
        double cross = 0, quad = 0;
        for (int k = 0; k < r; ++k) {
          double bk = B[(int64_t)k * O + o], gb = 0;
          cross += bk * P[(int64_t)i * r + k];
          for (int l = 0; l < r; ++l) gb += double(G[k * r + l]) * B[(int64_t)l * O + o];
          quad += bk * gb;
        }
        double t = (c ? double(c[o]) : sq[i]) + 2.0 * s * cross + double(s) * s * quad;
        n[o] = float(std::sqrt(std::max(t, 0.0)));
        rs[i] = m[o] / n[o];
      }
      gemm(false, true, N, nr, K, 1.f, xf, K, Wp, K, 0.f, tmp.get(), nr);
      gemm(false, false, N, nr, r, s, xa, r, B + r0, O, 1.f, tmp.get(), nr);
      for (int64_t row = 0; row < N; ++row)
        store(tmp.get() + row * nr, rs.data(), y, row * O + r0, nr);
    }
  });
}

// Columns whose y = rs * u lost u (m = 0, or rs under the dtype's normal range).
bool recompute_column(float rs, mx::Dtype dt) {
  float lo = dt == mx::float16 ? 1.0f / 256 : 1e-30f;
  return !(std::isfinite(rs) && std::fabs(rs) >= lo);
}

void backward(const DoRAConfig& cfg, const DoRAWant& want, const std::vector<mx::array>& in,
              std::vector<mx::array>& outs) {
  DoRAInputs idx(cfg);
  const mx::array& x = in[idx.x];
  const mx::array& nn = in[idx.count];
  const mx::array& xa_ = in[idx.count + 1];
  const mx::array& y = in[idx.count + 2];
  const mx::array& dy = in[idx.count + 3];
  int N = x.shape(0), K = x.shape(1), r = in[idx.a].shape(1), O = in[idx.m].size();
  float s = cfg.scale;
  const float* A = in[idx.a].data<float>();
  const float* B = in[idx.b].data<float>();
  const float* m = in[idx.m].data<float>();
  const float* n = nn.data<float>();
  const float* xa = xa_.data<float>();
  mx::array* out[kNumGrads] = {};
  for (int g = 0, k = 0; g < kNumGrads; ++g) if (want[g]) out[g] = &outs[k++];

  std::vector<float> rs(O);
  for (int i = 0; i < O; ++i) rs[i] = m[i] / n[i];
  // g = dy * rs (N x O, float32); S_i = sum_rows dy_i y_i, in per-chunk partials.
  Scratch g((size_t)N * O);
  int chunks = std::max(1, std::min<int>(N, 4 * num_threads()));
  std::vector<double> S(want[kGradM] ? (size_t)chunks * O : 0);
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> yrow(O);
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t row = ch * N / chunks; row < (ch + 1) * N / chunks; ++row) {
        float* gr = g.get() + row * O;
        load(dy, row * O, O, gr);
        if (want[kGradM]) {
          load(y, row * O, O, yrow.data());
          for (int i = 0; i < O; ++i) S[ch * O + i] += double(gr[i]) * yrow[i];
        }
        for (int i = 0; i < O; ++i) gr[i] *= rs[i];
      }
    }
  });
  Weight W = weight_of(cfg, idx, in);
  if (want[kGradM]) { // dm_i = sum dy u / n_i = S_i / m_i, or u recomputed from W_i
    float* dm = out[kGradM]->data<float>();
    std::optional<F32Whole> xw; // widened on the first column that needs it
    for (int i = 0; i < O; ++i) {
      if (!recompute_column(rs[i], y.dtype())) {
        double t = 0;
        for (int ch = 0; ch < chunks; ++ch) t += S[(size_t)ch * O + i];
        dm[i] = N ? float(t / m[i]) : 0.f;
        continue;
      }
      if (!xw) xw.emplace(x);
      const float* xf = xw->get();
      std::vector<float> wrow(K), yrow(1);
      W.row(i, wrow.data());
      double t = 0;
      for (int row = 0; row < N; ++row) {
        double u = 0;
        for (int j = 0; j < K; ++j) u += double(xf[(int64_t)row * K + j]) * wrow[j];
        for (int k = 0; k < r; ++k) u += double(s) * xa[(int64_t)row * r + k] * B[(int64_t)k * O + i];
        load(dy, (int64_t)row * O + i, 1, yrow.data());
        t += yrow[0] * u;
      }
      dm[i] = float(t / n[i]);
    }
  }
  std::vector<float> gB((size_t)N * r);
  gemm(false, true, N, r, O, 1.f, g.get(), O, B, O, 0.f, gB.data(), r);
  if (want[kGradB]) gemm(true, false, r, O, N, s, xa, r, g.get(), O, 0.f, out[kGradB]->data<float>(), O);
  if (want[kGradA]) {
    F32Whole xdw(cfg.has_xd ? in[idx.xd] : x);
    gemm(true, false, K, r, N, s, xdw.get(), K, gB.data(), r, 0.f, out[kGradA]->data<float>(), r);
  }
  auto finish = [&](mx::array& dst, Scratch& f) {
    if (dst.dtype() == mx::float32) return;
    parallel_for(N, 16, [&](int64_t a, int64_t b) {
      store(f.get() + a * K, nullptr, dst, a * K, (b - a) * K);
    });
  };
  if (want[kGradX]) {
    Scratch own;
    mx::array& dst = *out[kGradX];
    if (dst.dtype() != mx::float32) own.resize((size_t)N * K);
    float* dx = dst.dtype() == mx::float32 ? dst.data<float>() : own.get();
    int pr = panel_rows(K, O);
    // Row blocks of dx in parallel; each walks W's panels itself (a panel is converted
    // once per block: cheap next to the block's GEMM when blocks have >= 64 rows).
    int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), N / 64));
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
      Scratch wbuf(W.zero_copy() ? 0 : (size_t)pr * K);
      for (int64_t bl = b0; bl < b1; ++bl) {
        int64_t a = bl * N / blocks, nb = (bl + 1) * N / blocks - a;
        float* dxb = dx + a * K;
        const float* gb = g.get() + a * O;
        gemm(false, true, nb, K, cfg.has_xd ? 0 : r, s, gB.data() + a * r, r, A, r, 0.f, dxb, K);
        for (int r0 = 0; r0 < O; r0 += pr) { // dx += g[:, panel] W_panel
          int nr = std::min(O, r0 + pr) - r0;
          const float* Wp = W.panel(r0, r0 + nr, wbuf.get(), nullptr);
          gemm(false, false, nb, K, nr, 1.f, gb + r0, O, Wp, K, 1.f, dxb, K);
        }
      }
    });
    finish(dst, own);
  }
  if (want[kGradXd]) {
    Scratch own;
    mx::array& dst = *out[kGradXd];
    if (dst.dtype() != mx::float32) own.resize((size_t)N * K);
    float* dxd = dst.dtype() == mx::float32 ? dst.data<float>() : own.get();
    gemm(false, true, N, K, r, s, gB.data(), r, A, r, 0.f, dxd, K);
    finish(dst, own);
  }
}

template <typename F>
void dispatch(mx::Stream st, const std::vector<mx::array>& in, std::vector<mx::array>& outs, F&& f) {
  auto& enc = cpu::prepare(st, in, outs);
  enc.dispatch([in, outs, f]() mutable { f(in, outs); });
}

// DoRAScale / DoRAScaleVJP: plain loops (they check the maths; the GPU is their user).
template <typename T>
void scale_forward(const std::vector<mx::array>& in, mx::array& y) {
  int64_t cols = y.ndim() == 2 ? y.shape(1) : 0;
  int64_t rows = cols ? y.size() / cols : 0;
  const T* z = in[0].data<T>();
  const float* sv = in[1].data<float>();
  const T* b = in.size() > 2 ? in[2].data<T>() : nullptr;
  T* yp = y.data<T>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float v = static_cast<float>(z[i * cols + j]) * sv[j];
      yp[i * cols + j] = static_cast<T>(b ? v + static_cast<float>(b[j]) : v);
    }
  }
}

template <typename T>
void scale_backward(DoRAScaleWant want, const std::vector<mx::array>& in,
                    std::vector<mx::array>& out) {
  const mx::array& dy_arr = in[0];
  int64_t cols = in[1].shape(0);
  int64_t rows = cols ? dy_arr.size() / cols : 0;
  const T* dy = dy_arr.data<T>();
  const float* sv = in[1].data<float>();
  const T* z = want.sv ? in[2].data<T>() : nullptr;
  int k = 0;
  T* dz = want.z ? out[k++].data<T>() : nullptr;
  float* dsv = want.sv ? out[k++].data<float>() : nullptr;
  mx::array* dbias = want.bias ? &out[k++] : nullptr;
  std::vector<float> sb(want.bias ? cols : 0, 0.f);
  if (dsv) std::fill(dsv, dsv + cols, 0.f);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      float g = static_cast<float>(dy[i * cols + j]);
      if (dz) dz[i * cols + j] = static_cast<T>(g * sv[j]);
      if (dsv) dsv[j] += g * static_cast<float>(z[i * cols + j]);
      if (dbias) sb[j] += g;
    }
  }
  if (dbias) {
    T* db = dbias->data<T>();
    for (int64_t j = 0; j < cols; ++j) db[j] = static_cast<T>(sb[j]);
  }
}

template <typename F>
void by_dtype(mx::Dtype t, F&& f) {
  switch (t) {
    case mx::float32: return f.template operator()<float>();
    case mx::float16: return f.template operator()<mx::float16_t>();
    case mx::bfloat16: return f.template operator()<mx::bfloat16_t>();
    default: throw std::runtime_error("[dora_scale] unsupported dtype");
  }
}

} // namespace

void DoRAScale::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs = {out};
  dispatch(stream(), in, outs, [](auto& i, auto& o) {
    by_dtype(o[0].dtype(), [&]<typename T>() { scale_forward<T>(i, o[0]); });
  });
}

void DoRAScaleVJP::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  dispatch(stream(), in, outs, [want = want_](auto& i, auto& o) {
    by_dtype(i[0].dtype(), [&]<typename T>() { scale_backward<T>(want, i, o); });
  });
}

void DoRALinear::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  dispatch(stream(), in, outs, [cfg = cfg_](auto& i, auto& o) {
    BlasSingleThread one;
    forward(cfg, i, o);
  });
}

void DoRARowSqNorm::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs = {out};
  bool q = quantized_;
  int gs = group_size_, bits = bits_;
  dispatch(stream(), in, outs, [q, gs, bits](auto& i, auto& o) {
    int rows = i[0].shape(0);
    int k = q ? i[0].shape(1) * 32 / bits : i[0].shape(1);
    Weight W = q ? Weight{i[0], &i[1], &i[2], k, gs, bits} : Weight{i[0], nullptr, nullptr, k, 0, 0};
    float* c = o[0].template data<float>();
    int pr = panel_rows(k, rows);
    Scratch buf(W.zero_copy() ? 0 : (size_t)pr * k);
    std::vector<double> sq(pr);
    for (int r0 = 0; r0 < rows; r0 += pr) {
      int nr = std::min(rows, r0 + pr) - r0;
      W.panel(r0, r0 + nr, buf.get(), sq.data());
      for (int j = 0; j < nr; ++j) c[r0 + j] = float(sq[j]);
    }
  });
}

void DoRALinearVJP::eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
  dispatch(stream(), in, outs, [cfg = cfg_, want = want_](auto& i, auto& o) {
    BlasSingleThread one;
    backward(cfg, want, i, o);
  });
}

// DoRAInvNorm: plain loops (the GPU is its user; this checks the maths), float64 sums.
// With bits_, P = W A from W's rows dequantized to float32 (T-rounded as the GPU's
// fragments are: dequant(W) is a T matrix in mlx-lm too).
void DoRAInvNorm::eval_cpu(const std::vector<mx::array>& in, mx::array& out) {
  std::vector<mx::array> outs = {out};
  float s = scale_;
  bool pt = p_transposed_;
  int bits = bits_, gs = group_size_;
  auto body = [s, pt, bits, gs](const std::vector<mx::array>& in, std::vector<mx::array>& outs) {
    const int base = bits ? 3 : 1; // b, a, c follow p (or wq, scales, biases)
    const float* b = in[base].data<float>();
    const float* a = in[base + 1].data<float>();
    const float* c = in[base + 2].data<float>();
    float* y = outs[0].data<float>();
    int64_t rows = in[base + 1].shape(0), r = in[base + 1].shape(1), n = in[base + 2].size();
    std::vector<double> g(r * r, 0.0);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t k = 0; k < r; ++k)
        for (int64_t l = 0; l < r; ++l) g[k * r + l] += double(a[j * r + k]) * a[j * r + l];
    std::vector<double> pq; // P (n, r) from the quantized W
    if (bits) {
      pq.assign(n * r, 0.0);
      Weight w{in[0], &in[1], &in[2], static_cast<int>(rows), gs, bits};
      std::vector<float> row(rows);
      for (int64_t i = 0; i < n; ++i) {
        w.row(static_cast<int>(i), row.data());
        for (int64_t j = 0; j < rows; ++j) {
          double v = in[1].dtype() == mx::float16
              ? double(static_cast<float>(static_cast<mx::float16_t>(row[j])))
              : double(static_cast<float>(static_cast<mx::bfloat16_t>(row[j])));
          for (int64_t k = 0; k < r; ++k) pq[i * r + k] += v * a[j * r + k];
        }
      }
    }
    const auto& pa = in[0];
    auto pv = [&](int64_t i, int64_t k) -> double {
      if (bits) return pq[i * r + k];
      int64_t idx = pt ? k * n + i : i * r + k;
      switch (pa.dtype()) {
        case mx::float16: return double(static_cast<float>(pa.data<mx::float16_t>()[idx]));
        case mx::bfloat16: return double(static_cast<float>(pa.data<mx::bfloat16_t>()[idx]));
        default: return double(pa.data<float>()[idx]);
      }
    };
    for (int64_t i = 0; i < n; ++i) {
      double cross = 0, quad = 0;
      for (int64_t k = 0; k < r; ++k) {
        cross += double(b[k * n + i]) * pv(i, k);
        double t = 0;
        for (int64_t l = 0; l < r; ++l) t += g[k * r + l] * b[l * n + i];
        quad += double(b[k * n + i]) * t;
      }
      double n2 = double(c[i]) + 2.0 * s * cross + double(s) * s * quad;
      y[i] = static_cast<float>(1.0 / std::sqrt(std::max(n2, 0.0)));
    }
  };
  dispatch(stream(), in, outs, body);
}

} // namespace mlx_tuner
