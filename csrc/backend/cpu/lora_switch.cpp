// CPU kernels of the fused LoRA switch layer (maths in csrc/ops/lora_switch.h). The
// (token, slot) pairs are grouped by expert with a counting sort; per expert, the pairs'
// rows are gathered (widened to float32) into one contiguous block and every product is
// one BLAS GEMM on that block, so the work runs at GEMM speed whatever the routing.
// Experts run concurrently, largest first, each on one of our threads with a
// single-threaded BLAS; when one expert holds more than a thread's share of the rows they
// run one after another instead, each GEMM on all of the BLAS's threads.
// A quantized W_e is dequantized a panel of rows at a time into the task's float32 buffer
// (common/quant_panel.h): y takes one GEMM per row panel, dx = dy W_e one accumulating
// GEMM per row panel, so no copy of a whole W_e, let alone of W, is ever made.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/encoder.h"
#include "backend/cpu/f32_tiles.h"
#include "common/blas.h"
#include "common/parallel.h"
#include "common/quant_panel.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/lora_switch.h"

namespace mlx_tuner {

namespace {

using cpu::F32Out;
using cpu::Scratch;

// sgemm that also accepts empty inner dimensions (r = 0, in = 0): C = beta C.
void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {
    for (int64_t i = 0; i < int64_t(m) * n; ++i) c[i] = beta == 0.0f ? 0.0f : beta * c[i];
    return;
  }
  sgemm(ta, tb, m, n, k, alpha, a, std::max(lda, 1), b, std::max(ldb, 1), beta, c,
        std::max(ldc, 1));
}

// The pairs grouped by expert: expert e owns order[offsets[e] .. offsets[e + 1]); pairs
// whose index is outside [0, experts) are listed in `invalid`.
struct Groups {
  std::vector<int> offsets, order, invalid;
  int max_count = 0;
};

Groups group_by_expert(const int32_t* rhs, int pairs, int experts) {
  Groups g;
  g.offsets.assign(experts + 1, 0);
  for (int p = 0; p < pairs; ++p) {
    int e = rhs[p];
    if (e >= 0 && e < experts) {
      ++g.offsets[e + 1];
    } else {
      g.invalid.push_back(p);
    }
  }
  for (int e = 0; e < experts; ++e) {
    g.max_count = std::max(g.max_count, g.offsets[e + 1]);
    g.offsets[e + 1] += g.offsets[e];
  }
  g.order.resize(g.offsets[experts]);
  std::vector<int> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int p = 0; p < pairs; ++p) {
    int e = rhs[p];
    if (e >= 0 && e < experts) g.order[next[e]++] = p;
  }
  return g;
}

// The experts with pairs, largest first, and whether to run them concurrently: only when
// no expert holds more than a thread's share of the pairs (else threads would idle).
struct Plan {
  std::vector<int> experts;
  bool parallel = false;
  int slots = 1; // scratch sets: one per concurrent task
};

Plan plan_experts(const Groups& g) {
  Plan p;
  int count = static_cast<int>(g.offsets.size()) - 1;
  for (int e = 0; e < count; ++e) {
    if (g.offsets[e + 1] > g.offsets[e]) p.experts.push_back(e);
  }
  auto size = [&](int e) { return g.offsets[e + 1] - g.offsets[e]; };
  std::stable_sort(p.experts.begin(), p.experts.end(),
                   [&](int a, int b) { return size(a) > size(b); });
  int threads = std::min<int>(num_threads(), p.experts.size());
  p.parallel = threads > 1 && int64_t(g.max_count) * threads <= int64_t(g.order.size());
  p.slots = p.parallel ? threads : 1;
  return p;
}

// Calls fn(e, slot) once per planned expert; concurrent calls get distinct slots.
template <typename F>
void for_experts(const Plan& p, F&& fn) {
  if (!p.parallel) {
    for (int e : p.experts) fn(e, 0);
    return;
  }
  BlasSingleThread single;
  std::atomic<size_t> next{0};
  parallel_for(p.slots, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (size_t i; (i = next.fetch_add(1)) < p.experts.size();) fn(p.experts[i], int(t));
    }
  });
}

// Matrix `idx` of a contiguous (count, rows, cols) array as float32: the array's memory
// when it is float32, else widened into `buf`.
const float* matrix_f32(const mx::array& a, int64_t idx, int64_t size, Scratch& buf) {
  const char* src = a.data<char>() + idx * size * a.itemsize();
  if (a.dtype() == mx::float32) {
    return reinterpret_cast<const float*>(src);
  }
  if (buf.size() < size) buf.reset(size);
  cpu::widen_par(src, a.dtype(), buf.get(), size);
  return buf.get();
}

// dst block i (block floats) = float32 of src block blocks[i] (a contiguous array).
void gather_blocks(const mx::array& src, const int* pairs, const int32_t* block_of, int n,
                   int64_t block, float* dst) {
  const char* base = src.data<char>();
  size_t esz = src.itemsize();
  cpu::between_gemms_for(n, 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t b = block_of ? block_of[pairs[i]] : pairs[i];
      cpu::widen(base + b * block * esz, src.dtype(), dst + i * block, block);
    }
  });
}

// A dequantized panel holds about this many floats (1 MiB): each concurrent task has one.
constexpr int64_t kPanelFloats = int64_t(1) << 18;

// Rows of W_e per dequantized panel.
int panel_rows(int out, int in) {
  return int(std::clamp<int64_t>(kPanelFloats / std::max(in, 1), 1, std::max(out, 1)));
}

// Expert e's quantized matrix; scales and biases follow W among the primitive's inputs.
quant::QMatrix expert_qmatrix(const mx::array& w, const mx::array& scales,
                              const mx::array& biases, const SwitchQuant& q, int e, int in) {
  int64_t out = w.shape(1), groups = in / q.group_size;
  int64_t soff = int64_t(e) * out * groups * scales.itemsize();
  return {reinterpret_cast<const uint8_t*>(w.data<uint32_t>()) +
              int64_t(e) * out * quant::row_bytes(in, q.bits),
          scales.data<char>() + soff, biases.data<char>() + soff, scales.dtype(), in, q.bits,
          q.group_size};
}

} // namespace

void LoRASwitchLinear::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  auto& y = outputs[0];
  auto& xa = outputs[1];
  int xd_idx = has_bias_ ? 7 : 6;
  int q_idx = 6 + has_bias_ + has_xd_;
  using Opt = std::optional<mx::array>;
  enc.dispatch([x = inputs[0], w = inputs[1], a = inputs[2], b = inputs[3], lhs = inputs[4],
                rhs = inputs[5], bias = has_bias_ ? Opt(inputs[6]) : std::nullopt,
                xd = has_xd_ ? Opt(inputs[xd_idx]) : std::nullopt,
                qs = quant_.bits ? Opt(inputs[q_idx]) : std::nullopt,
                qb = quant_.bits ? Opt(inputs[q_idx + 1]) : std::nullopt, y, xa, s = scale_,
                q = quant_]() mutable {
    int pairs = lhs.shape(0), mm = x.shape(1);
    int experts = w.shape(0), out = w.shape(1), in = x.shape(2), r = a.shape(1);
    const int32_t* lhs_p = lhs.data<int32_t>();
    Groups gr = group_by_expert(rhs.data<int32_t>(), pairs, experts);
    Plan plan = plan_experts(gr);
    int64_t rows = int64_t(gr.max_count) * mm;
    struct Bufs {
      Scratch xg, xdg, yg, xag, wbuf, abuf, bbuf, biasbuf;
    };
    int nb = panel_rows(out, in);
    std::vector<Bufs> bufs(plan.slots);
    for (auto& bf : bufs) {
      if (q.bits) bf.wbuf.reset(int64_t(nb) * in);
      bf.xg.reset(rows * in);
      if (xd) bf.xdg.reset(rows * in);
      bf.yg.reset(rows * out);
      bf.xag.reset(rows * r);
    }
    float* xa_p = xa.data<float>();
    char* y_p = y.data<char>();
    size_t ysz = y.itemsize();
    for_experts(plan, [&](int e, int slot) {
      Bufs& bf = bufs[slot];
      int n = gr.offsets[e + 1] - gr.offsets[e];
      const int* ps = gr.order.data() + gr.offsets[e];
      int m = n * mm;
      float *xg = bf.xg.get(), *xdg = bf.xdg.get(), *yg = bf.yg.get(), *xag = bf.xag.get();
      gather_blocks(x, ps, lhs_p, n, int64_t(mm) * in, xg);
      if (xd) gather_blocks(*xd, ps, lhs_p, n, int64_t(mm) * in, xdg);
      const float* ae = matrix_f32(a, e, int64_t(r) * in, bf.abuf);
      const float* be = matrix_f32(b, e, int64_t(out) * r, bf.bbuf);
      // xa = x_d A_e^T (saved for the backward)
      gemm(false, true, m, r, in, 1.0f, xd ? xdg : xg, in, ae, in, 0.0f, xag, r);
      float beta = 0.0f;
      if (bias) {
        const float* bias_e = matrix_f32(*bias, e, out, bf.biasbuf);
        for (int i = 0; i < m; ++i) std::memcpy(yg + int64_t(i) * out, bias_e, out * 4);
        beta = 1.0f;
      }
      // y = x W_e^T (+ bias_e), then y += s xa B_e^T into the same block
      if (q.bits) {
        auto qw = expert_qmatrix(w, *qs, *qb, q, e, in);
        for (int n0 = 0; n0 < out; n0 += nb) {
          int nw = std::min(nb, out - n0);
          quant::dequantize_panel(qw, n0, nw, 0, in, bf.wbuf.get());
          gemm(false, true, m, nw, in, 1.0f, xg, in, bf.wbuf.get(), in, beta, yg + n0, out);
        }
      } else {
        const float* we = matrix_f32(w, e, int64_t(out) * in, bf.wbuf);
        gemm(false, true, m, out, in, 1.0f, xg, in, we, in, beta, yg, out);
      }
      gemm(false, true, m, out, r, s, xag, r, be, r, 1.0f, yg, out);
      // every pair is one expert's: its rows of y and xa have a single writer
      cpu::between_gemms_for(n, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          int64_t p = ps[i];
          std::memcpy(xa_p + p * mm * r, xag + i * mm * r, int64_t(mm) * r * 4);
          cpu::narrow(yg + i * mm * out, y_p + p * mm * out * ysz, y.dtype(),
                      int64_t(mm) * out);
        }
      });
    });
    // An expert index out of range: NaN outputs, never memory outside the weights.
    std::vector<float> nan_row(int64_t(mm) * out, std::numeric_limits<float>::quiet_NaN());
    for (int p : gr.invalid) {
      std::memset(xa_p + int64_t(p) * mm * r, 0, int64_t(mm) * r * 4);
      cpu::narrow(nan_row.data(), y_p + int64_t(p) * mm * out * ysz, y.dtype(),
                  int64_t(mm) * out);
    }
  });
}

void LoRASwitchLinearVJP::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  using Opt = std::optional<mx::array>;
  auto& enc = cpu::prepare(stream(), inputs, outputs);
  auto g = grads_.copies(outputs);
  int q_idx = 8 + has_xd_;
  enc.dispatch([x = inputs[0], w = inputs[1], a = inputs[2], b = inputs[3], lhs = inputs[4],
                rhs = inputs[5], xa = inputs[6], dy = inputs[7],
                xd = has_xd_ ? Opt(inputs[8]) : std::nullopt,
                qs = quant_.bits ? Opt(inputs[q_idx]) : std::nullopt,
                qb = quant_.bits ? Opt(inputs[q_idx + 1]) : std::nullopt, dx = g.x,
                dw = g.weight, da = g.lora_a, db = g.lora_b, dbias = g.bias,
                dxd = g.x_dropped, s = scale_, q = quant_]() mutable {
    int pairs = lhs.shape(0), mm = x.shape(1);
    int experts = w.shape(0), out = w.shape(1), in = x.shape(2), r = a.shape(1);
    const int32_t* lhs_p = lhs.data<int32_t>();
    Groups gr = group_by_expert(rhs.data<int32_t>(), pairs, experts);
    // LoRA part of the input gradient: into dx, or into dx_d when dropout was applied.
    bool lora_into_dx = dx && !xd;
    bool need_g = da || dxd || lora_into_dx;
    // Accumulators (zeroed: experts without pairs get zero gradients).
    std::optional<F32Out> dx_acc, dw_acc, da_acc, db_acc, dbias_acc, dxd_acc;
    if (dx) dx_acc.emplace(*dx, true);
    if (dw) dw_acc.emplace(*dw, true);
    if (da) da_acc.emplace(*da, true);
    if (db) db_acc.emplace(*db, true);
    if (dbias) dbias_acc.emplace(*dbias, true);
    if (dxd) dxd_acc.emplace(*dxd, true);
    Plan plan = plan_experts(gr);
    int64_t rows = int64_t(gr.max_count) * mm, block = int64_t(mm) * in;
    struct Bufs {
      Scratch dyg, xg, xdg, xag, g, tmp, wbuf, abuf, bbuf;
    };
    int nb = panel_rows(out, in);
    std::vector<Bufs> bufs(plan.slots);
    for (auto& bf : bufs) {
      if (dx && q.bits) bf.wbuf.reset(int64_t(nb) * in);
      bf.dyg.reset(rows * out);
      if (dw || (da && !xd)) bf.xg.reset(rows * in);
      if (da && xd) bf.xdg.reset(rows * in);
      if (db) bf.xag.reset(rows * r);
      if (need_g) bf.g.reset(rows * r);
      if (dx || dxd) bf.tmp.reset(rows * in);
    }
    const float* xa_p = xa.data<float>();

    // The input gradients of pair p go to block lhs[p], which other pairs (other experts)
    // may share. Concurrent experts then write each pair's block apart, and the blocks are
    // summed in pair order afterwards; else they are added straight in.
    bool shared = false;
    if (plan.parallel && (dx || dxd)) {
      std::vector<char> seen(x.shape(0), 0);
      for (int p : gr.order) {
        if (seen[lhs_p[p]]++) {
          shared = true;
          break;
        }
      }
    }
    Scratch dx_pairs(shared && dx ? int64_t(pairs) * block : 0),
        dxd_pairs(shared && dxd ? int64_t(pairs) * block : 0);
    auto put = [&](float* acc, Scratch& per_pair, const float* t, const int* ps, int n) {
      if (!per_pair.empty()) {
        cpu::between_gemms_for(n, 4, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            std::memcpy(per_pair.get() + int64_t(ps[i]) * block, t + i * block, block * 4);
          }
        });
        return;
      }
      // pairs in order (an expert may list a block twice), columns split across threads
      cpu::between_gemms_for(block, 1024, [&](int64_t j0, int64_t j1) {
        for (int i = 0; i < n; ++i) {
          float* d = acc + int64_t(lhs_p[ps[i]]) * block;
          const float* src = t + int64_t(i) * block;
          for (int64_t j = j0; j < j1; ++j) d[j] += src[j];
        }
      });
    };
    auto reduce = [&](float* acc, Scratch& per_pair) {
      if (per_pair.empty()) return;
      parallel_for(block, 1024, [&](int64_t j0, int64_t j1) {
        for (int p = 0; p < pairs; ++p) {
          int e = rhs.data<int32_t>()[p];
          if (e < 0 || e >= experts) continue;
          float* d = acc + int64_t(lhs_p[p]) * block;
          const float* t = per_pair.get() + int64_t(p) * block;
          for (int64_t j = j0; j < j1; ++j) d[j] += t[j];
        }
      });
    };

    for_experts(plan, [&](int e, int slot) {
      Bufs& bf = bufs[slot];
      int n = gr.offsets[e + 1] - gr.offsets[e];
      const int* ps = gr.order.data() + gr.offsets[e];
      int m = n * mm;
      float *dyg = bf.dyg.get(), *xg = bf.xg.get(), *xdg = bf.xdg.get(), *xag = bf.xag.get(),
            *g = bf.g.get(), *tmp = bf.tmp.get();
      gather_blocks(dy, ps, nullptr, n, int64_t(mm) * out, dyg);
      if (xg) gather_blocks(x, ps, lhs_p, n, block, xg);
      if (xdg) gather_blocks(*xd, ps, lhs_p, n, block, xdg);
      if (xag) {
        for (int i = 0; i < n; ++i) {
          std::memcpy(xag + int64_t(i) * mm * r, xa_p + int64_t(ps[i]) * mm * r,
                      int64_t(mm) * r * 4);
        }
      }
      const float* ae =
          (lora_into_dx || dxd) ? matrix_f32(a, e, int64_t(r) * in, bf.abuf) : nullptr;
      if (need_g) { // g = dy B_e
        const float* be = matrix_f32(b, e, int64_t(out) * r, bf.bbuf);
        gemm(false, false, m, r, out, 1.0f, dyg, out, be, r, 0.0f, g, r);
      }
      if (dx && q.bits) { // tmp = [s g A_e] + sum over row panels of dy[:, panel] W_e[panel]
        float beta = 0.0f;
        if (lora_into_dx) {
          gemm(false, false, m, in, r, s, g, r, ae, in, 0.0f, tmp, in);
          beta = 1.0f;
        } else if (out == 0) {
          gemm(false, false, m, in, 0, 1.0f, dyg, 1, nullptr, in, 0.0f, tmp, in);
        }
        auto qw = expert_qmatrix(w, *qs, *qb, q, e, in);
        for (int n0 = 0; n0 < out; n0 += nb) {
          int nw = std::min(nb, out - n0);
          quant::dequantize_panel(qw, n0, nw, 0, in, bf.wbuf.get());
          gemm(false, false, m, in, nw, 1.0f, dyg + n0, out, bf.wbuf.get(), in, beta, tmp, in);
          beta = 1.0f;
        }
        put(dx_acc->get(), dx_pairs, tmp, ps, n);
      } else if (dx) {
        const float* we = matrix_f32(w, e, int64_t(out) * in, bf.wbuf);
        gemm(false, false, m, in, out, 1.0f, dyg, out, we, in, 0.0f, tmp, in);
        if (lora_into_dx) {
          gemm(false, false, m, in, r, s, g, r, ae, in, 1.0f, tmp, in);
        }
        put(dx_acc->get(), dx_pairs, tmp, ps, n);
      }
      if (dxd) {
        gemm(false, false, m, in, r, s, g, r, ae, in, 0.0f, tmp, in);
        put(dxd_acc->get(), dxd_pairs, tmp, ps, n);
      }
      if (da) { // dA_e = s g^T x_d
        gemm(true, false, r, in, m, s, g, r, xd ? xdg : xg, in, 0.0f,
             da_acc->get() + int64_t(e) * r * in, in);
      }
      if (db) { // dB_e = s dy^T xa
        gemm(true, false, out, r, m, s, dyg, out, xag, r, 0.0f,
             db_acc->get() + int64_t(e) * out * r, r);
      }
      if (dw) { // dW_e = dy^T x
        gemm(true, false, out, in, m, 1.0f, dyg, out, xg, in, 0.0f,
             dw_acc->get() + int64_t(e) * out * in, in);
      }
      if (dbias) {
        float* acc = dbias_acc->get() + int64_t(e) * out;
        for (int i = 0; i < m; ++i) {
          const float* row = dyg + int64_t(i) * out;
          for (int j = 0; j < out; ++j) acc[j] += row[j];
        }
      }
    });
    if (dx) reduce(dx_acc->get(), dx_pairs);
    if (dxd) reduce(dxd_acc->get(), dxd_pairs);
    for (auto* acc : {&dx_acc, &dw_acc, &da_acc, &db_acc, &dbias_acc, &dxd_acc}) {
      if (*acc) (*acc)->finish();
    }
  });
}

} // namespace mlx_tuner
