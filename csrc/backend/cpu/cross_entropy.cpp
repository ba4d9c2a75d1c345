// CPU kernels of linear_cross_entropy (maths: csrc/ops/cross_entropy.h).
// The vocabulary is walked in blocks of kVB rows of W (converted or dequantized to float32
// once per block); for each block, token chunks run in parallel, each computing its logit
// tile h_chunk · W_blockᵀ with the optimized BLAS and the row-wise softmax work on it.
// At most an (N, kVB) tile is stored, never the (N, V) logits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/blas.h"
#include "common/parallel.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/types/half_types.h"
#include "ops/cross_entropy.h"

namespace mlx_tuner {

namespace {

constexpr int kVB = 512; // vocabulary rows per block
constexpr int kNB = 256; // most tokens per task
constexpr int kLanes = 8; // independent accumulators, so reductions vectorize

// exp(x) for x <= 0 to ~1e-7 relative, with no branch, compare or float-to-int conversion
// (each of which may trap, and so stops GCC from vectorizing the loops that call it):
// x = n·ln2 + f, n rounded by the 1.5·2^23 trick and read from the float's bits, e^f by its
// Taylor polynomial, 2^n built in the exponent field; n < -126 (and x = -inf) give 0.
inline float exp_neg(float x) {
  const float big = x * 1.44269504088896341f + 12582912.0f;
  const float r = big - 12582912.0f;
  uint32_t ib;
  std::memcpy(&ib, &big, sizeof(ib));
  const int32_t n = static_cast<int32_t>(ib - 0x4B400000u);
  const float f = (x - r * 0.693359375f) + r * 2.12194440e-4f; // x − r·ln2 in two parts
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 +
                  f * (1.0f / 120 + f * (1.0f / 720 + f * (1.0f / 5040)))))));
  const uint32_t sbits = static_cast<uint32_t>(n + 127) << 23;
  float scale, y;
  std::memcpy(&scale, &sbits, sizeof(scale));
  y = p * scale;
  uint32_t ybits;
  std::memcpy(&ybits, &y, sizeof(ybits));
  ybits &= 0u - static_cast<uint32_t>(n >= -126);
  std::memcpy(&y, &ybits, sizeof(y));
  return y;
}

// Max of a row through integer keys ordered like the floats (a float compare may trap,
// which keeps GCC from vectorizing; integer max does not).
inline int32_t order_key(int32_t b) {
  return b ^ ((b >> 31) & 0x7FFFFFFF); // its own inverse
}

float row_max(const float* x, int n) {
  int32_t acc[kLanes];
  std::fill(acc, acc + kLanes, std::numeric_limits<int32_t>::min());
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      int32_t b;
      std::memcpy(&b, x + i + l, sizeof(b));
      b = order_key(b);
      acc[l] = b > acc[l] ? b : acc[l];
    }
  }
  for (; i < n; ++i) {
    int32_t b;
    std::memcpy(&b, x + i, sizeof(b));
    acc[0] = std::max(acc[0], order_key(b));
  }
  int32_t k = order_key(*std::max_element(acc, acc + kLanes));
  float m;
  std::memcpy(&m, &k, sizeof(m));
  return m;
}

float row_sum_exp(const float* x, int n, float m) {
  float acc[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[l] += exp_neg(x[i + l] - m);
    }
  }
  for (; i < n; ++i) {
    acc[0] += exp_neg(x[i] - m);
  }
  float s = 0;
  for (float a : acc) {
    s += a;
  }
  return s;
}

// Float32 scratch counted by MLX's allocator (so peak-memory numbers see it).
mx::array scratch(size_t n) {
  mx::array a({static_cast<int>(std::max<size_t>(n, 1))}, mx::float32, nullptr, {});
  a.set_data(mx::allocator::malloc(std::max<size_t>(n, 1) * sizeof(float)));
  return a;
}

template <typename T>
void to_float(const T* src, float* dst, int64_t n) {
  parallel_for(n, 1 << 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      dst[i] = static_cast<float>(src[i]);
    }
  });
}

template <typename T>
void from_float(const float* src, T* dst, int64_t n) {
  parallel_for(n, 1 << 16, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      dst[i] = static_cast<T>(src[i]);
    }
  });
}

// Rows [v0, v0 + vb) of the head as float32: a pointer into W when it is float32 already,
// else converted (or dequantized: LSB-first bit stream per row, as mx.quantize packs it)
// into `buf`.
template <typename T>
struct Head {
  const void* w;
  const T* scales;
  const T* qbiases;
  int d;
  QuantSpec q;

  const float* block(int v0, int vb, float* buf) const {
    if (!q.quantized) {
      if constexpr (std::is_same_v<T, float>) {
        return static_cast<const float*>(w) + int64_t(v0) * d;
      }
      to_float(static_cast<const T*>(w) + int64_t(v0) * d, buf, int64_t(vb) * d);
      return buf;
    }
    const int row_bytes = d * q.bits / 8;
    const int groups = d / q.group_size;
    const uint32_t mask = (1u << q.bits) - 1;
    parallel_for(vb, 16, [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) {
        int64_t v = v0 + r;
        auto row = static_cast<const uint8_t*>(w) + v * row_bytes;
        float* out = buf + r * d;
        for (int g = 0; g < groups; ++g) {
          float sc = static_cast<float>(scales[v * groups + g]);
          float bi = static_cast<float>(qbiases[v * groups + g]);
          for (int j = g * q.group_size; j < (g + 1) * q.group_size; ++j) {
            int bit = j * q.bits;
            int byte = bit >> 3, sh = bit & 7;
            uint32_t x = row[byte];
            if (sh + q.bits > 8) {
              x |= uint32_t(row[byte + 1]) << 8;
            }
            out[j] = sc * float((x >> sh) & mask) + bi;
          }
        }
      }
    });
    return buf;
  }
};

// Our threads split the tokens and each calls a single-threaded BLAS (BlasSingleThread):
// OpenBLAS's own threads, woken for every small GEMM, ran up to 100x slower on a loaded
// machine.

// tile[nb, vb] = h[n0 : n0 + nb] · W_blockᵀ + b[v0 : v0 + vb]
template <typename T>
void logits_tile(const float* h, const float* wb, const T* bias, int64_t n0, int nb, int v0,
                 int vb, int d, float* tile) {
  if (d == 0) {
    std::fill(tile, tile + int64_t(nb) * vb, 0.0f);
  } else {
    sgemm(false, true, nb, vb, d, 1.0f, h + n0 * d, d, wb, d, 0.0f, tile, vb);
  }
  if (bias) {
    for (int r = 0; r < nb; ++r) {
      float* row = tile + int64_t(r) * vb;
      for (int c = 0; c < vb; ++c) {
        row[c] += static_cast<float>(bias[v0 + c]);
      }
    }
  }
}

struct Dims {
  int N, d, V;
  // Tokens per task: one task per thread (taller single-threaded GEMMs ran faster than
  // more, shorter ones), at least 32 rows, at most kNB.
  int rows() const {
    int per = (N + num_threads() - 1) / num_threads();
    return std::max(1, std::min(kNB, std::max(32, per)));
  }
};

// Calls fn(n0, nb, tile) for token chunks in parallel; each chunk owns its rows of the
// (N, vb) tile buffer.
template <typename F>
void for_chunks(const Dims& D, int vb, float* tiles, F&& fn) {
  const int rows = D.rows();
  const int64_t chunks = (D.N + rows - 1) / rows;
  parallel_for(chunks, 1, [&](int64_t a, int64_t b) {
    for (int64_t c = a; c < b; ++c) {
      const int64_t n0 = c * rows;
      const int nb = static_cast<int>(std::min<int64_t>(rows, D.N - n0));
      fn(n0, nb, tiles + n0 * vb);
    }
  });
}

template <typename T>
const float* as_float(const T* x, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    to_float(x, buf, n);
    return buf;
  }
}

template <typename T>
void forward(const T* h_in, Head<T> head, const int32_t* y, const T* bias, Dims D,
             float* h32buf, float* wbuf, float* tiles, float* m, float* s, float* t,
             float* loss, float* lse) {
  const int N = D.N, d = D.d, V = D.V;
  BlasSingleThread single;
  const float* h = as_float(h_in, h32buf, int64_t(N) * d);
  std::fill(m, m + N, -std::numeric_limits<float>::infinity());
  std::fill(s, s + N, 0.0f);
  std::fill(t, t + N, 0.0f);
  for (int v0 = 0; v0 < V; v0 += kVB) {
    const int vb = std::min(kVB, V - v0);
    const float* wb = head.block(v0, vb, wbuf);
    for_chunks(D, vb, tiles, [&](int64_t n0, int nb, float* tile) {
      logits_tile(h, wb, bias, n0, nb, v0, vb, d, tile);
      for (int r = 0; r < nb; ++r) {
        const float* row = tile + int64_t(r) * vb;
        const int64_t n = n0 + r;
        float mb = row_max(row, vb);
        if (mb > m[n]) {
          s[n] = s[n] * std::exp(m[n] - mb) + row_sum_exp(row, vb, mb);
          m[n] = mb;
        } else {
          s[n] += row_sum_exp(row, vb, m[n]);
        }
        if (y[n] >= v0 && y[n] < v0 + vb) {
          t[n] = row[y[n] - v0];
        }
      }
    });
  }
  for (int n = 0; n < N; ++n) {
    lse[n] = m[n] + std::log(s[n]);
    loss[n] = (y[n] >= 0 && y[n] < V) ? lse[n] - t[n] : 0.0f;
  }
}

struct Grads {
  float* dh32; // (N, d) float32 accumulator, or nullptr
  float* dw32; // (vb, d) float32 block of dW, or nullptr
  float* db32; // (V,) float32, or nullptr
};

template <typename T>
void backward(const T* h_in, Head<T> head, const int32_t* y, const T* bias,
              const float* lse, const float* g, Dims D, float* h32buf, float* wbuf,
              float* tiles, Grads G, T* dw_out) {
  const int N = D.N, d = D.d, V = D.V;
  BlasSingleThread single;
  const float* h = as_float(h_in, h32buf, int64_t(N) * d);
  if (G.dh32) {
    std::fill(G.dh32, G.dh32 + int64_t(N) * d, 0.0f);
  }
  for (int v0 = 0; v0 < V; v0 += kVB) {
    const int vb = std::min(kVB, V - v0);
    const float* wb = head.block(v0, vb, wbuf);
    // Per token chunk: the tile becomes G = g (softmax − onehot), then dh += G · W_block.
    for_chunks(D, vb, tiles, [&](int64_t n0, int nb, float* tile) {
      logits_tile(h, wb, bias, n0, nb, v0, vb, d, tile);
      for (int r = 0; r < nb; ++r) {
        float* row = tile + int64_t(r) * vb;
        const int64_t n = n0 + r;
        const float gn = g[n];
        if (gn == 0.0f || y[n] < 0 || y[n] >= V) { // masked or ignored token
          std::fill(row, row + vb, 0.0f);
          continue;
        }
        const float l = lse[n];
        for (int c = 0; c < vb; ++c) {
          row[c] = gn * exp_neg(row[c] - l);
        }
        if (y[n] >= v0 && y[n] < v0 + vb) {
          row[y[n] - v0] -= gn;
        }
      }
      if (G.dh32) {
        sgemm(false, false, nb, d, vb, 1.0f, tile, vb, wb, d, 1.0f, G.dh32 + n0 * d, d);
      }
    });
    // dW_block = Gᵀ · h and db_block = Σ_n G over all N tokens, split by vocabulary rows.
    if (G.dw32 || G.db32) {
      float* dwb = std::is_same_v<T, float> && G.dw32
          ? reinterpret_cast<float*>(dw_out) + int64_t(v0) * d
          : G.dw32;
      parallel_for(vb, 32, [&](int64_t a, int64_t b) {
        const int cols = static_cast<int>(b - a);
        if (dwb) {
          sgemm(true, false, cols, d, N, 1.0f, tiles + a, vb, h, d, 0.0f, dwb + a * d, d);
        }
        if (G.db32) {
          for (int64_t c = a; c < b; ++c) {
            G.db32[v0 + c] = 0.0f;
          }
          for (int n = 0; n < N; ++n) {
            const float* row = tiles + int64_t(n) * vb;
            for (int64_t c = a; c < b; ++c) {
              G.db32[v0 + c] += row[c];
            }
          }
        }
      });
      if constexpr (!std::is_same_v<T, float>) {
        if (dwb) {
          from_float(dwb, dw_out + int64_t(v0) * d, int64_t(vb) * d);
        }
      }
    }
  }
}

void alloc(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

template <typename T>
Head<T> make_head(const std::vector<mx::array>& in, int first_extra, int d, QuantSpec q) {
  Head<T> head{in[1].data<void>(), nullptr, nullptr, d, q};
  if (q.quantized) {
    head.scales = in[first_extra].data<T>();
    head.qbiases = in[first_extra + 1].data<T>();
  }
  return head;
}

template <typename T>
void dispatch_forward(const LinearCrossEntropy& p, const std::vector<mx::array>& in,
                      std::vector<mx::array>& out, mx::Stream stream) {
  Dims D{in[0].shape(0), in[0].shape(1), in[1].shape(0)};
  const int extra = p.has_bias() ? 4 : 3;
  auto head = make_head<T>(in, extra, D.d, p.quant());
  const T* bias = p.has_bias() ? in[3].data<T>() : nullptr;
  const int vb = std::min(kVB, D.V);
  bool need_w = p.quant().quantized || !std::is_same_v<T, float>;
  auto h32 = scratch(std::is_same_v<T, float> ? 0 : size_t(D.N) * D.d);
  auto wbuf = scratch(need_w ? size_t(vb) * D.d : 0);
  auto tile = scratch(size_t(D.N) * vb);
  auto state = scratch(3 * size_t(D.N));
  auto& enc = mx::cpu::get_command_encoder(stream);
  enc.dispatch([=, h = in[0].data<T>(), y = in[2].data<int32_t>(),
                loss = out[0].data<float>(), lse = out[1].data<float>(),
                keep = std::vector<mx::array>{in.begin(), in.end()},
                bufs = std::vector<mx::array>{h32, wbuf, tile, state}]() mutable {
    float* st = bufs[3].data<float>();
    forward<T>(h, head, y, bias, D, bufs[0].data<float>(), bufs[1].data<float>(),
               bufs[2].data<float>(), st, st + D.N, st + 2 * D.N, loss, lse);
  });
}

template <typename T>
void dispatch_backward(const LinearCrossEntropyVJP& p, const std::vector<mx::array>& in,
                       std::vector<mx::array>& out, mx::Stream stream) {
  Dims D{in[0].shape(0), in[0].shape(1), in[1].shape(0)};
  const int extra = p.has_bias() ? 6 : 5;
  auto head = make_head<T>(in, extra, D.d, p.quant());
  const T* bias = p.has_bias() ? in[5].data<T>() : nullptr;
  const int vb = std::min(kVB, D.V);
  constexpr bool f32 = std::is_same_v<T, float>;
  bool need_w = p.quant().quantized || !f32;
  int k = 0;
  mx::array* dh = p.need_dh() ? &out[k++] : nullptr;
  mx::array* dw = p.need_dw() ? &out[k++] : nullptr;
  mx::array* db = p.need_db() ? &out[k++] : nullptr;
  for (auto& o : out) {
    alloc(o);
  }
  auto h32 = scratch(f32 ? 0 : size_t(D.N) * D.d);
  auto wbuf = scratch(need_w ? size_t(vb) * D.d : 0);
  auto tile = scratch(size_t(D.N) * vb);
  auto dh32 = scratch(dh && !f32 ? size_t(D.N) * D.d : 0);
  auto dw32 = scratch(dw && !f32 ? size_t(vb) * D.d : 0);
  auto db32 = scratch(db ? size_t(D.V) : 0);
  auto& enc = mx::cpu::get_command_encoder(stream);
  enc.dispatch([=, h = in[0].data<T>(), y = in[2].data<int32_t>(),
                lse = in[3].data<float>(), g = in[4].data<float>(),
                dh_out = dh ? dh->data<T>() : nullptr, dw_out = dw ? dw->data<T>() : nullptr,
                db_out = db ? db->data<T>() : nullptr,
                keep = std::vector<mx::array>{in.begin(), in.end()},
                bufs = std::vector<mx::array>{h32, wbuf, tile, dh32, dw32, db32}]() mutable {
    Grads G{nullptr, nullptr, nullptr};
    if (dh_out) {
      G.dh32 = f32 ? reinterpret_cast<float*>(dh_out) : bufs[3].data<float>();
    }
    if (dw_out) {
      // For float32 the block accumulator is the output itself (see backward()).
      G.dw32 = f32 ? reinterpret_cast<float*>(dw_out) : bufs[4].data<float>();
    }
    if (db_out) {
      G.db32 = bufs[5].data<float>();
    }
    backward<T>(h, head, y, bias, lse, g, D, bufs[0].data<float>(), bufs[1].data<float>(),
                bufs[2].data<float>(), G, dw_out);
    if constexpr (!f32) {
      if (dh_out) {
        from_float(G.dh32, dh_out, int64_t(D.N) * D.d);
      }
    }
    if (db_out) {
      from_float(G.db32, db_out, D.V);
    }
  });
}

} // namespace

void LinearCrossEntropy::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& o : outputs) {
    alloc(o);
  }
  switch (inputs[0].dtype()) {
    case mx::float32:
      return dispatch_forward<float>(*this, inputs, outputs, stream());
    case mx::float16:
      return dispatch_forward<mx::float16_t>(*this, inputs, outputs, stream());
    case mx::bfloat16:
      return dispatch_forward<mx::bfloat16_t>(*this, inputs, outputs, stream());
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

void LinearCrossEntropyVJP::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  switch (inputs[0].dtype()) {
    case mx::float32:
      return dispatch_backward<float>(*this, inputs, outputs, stream());
    case mx::float16:
      return dispatch_backward<mx::float16_t>(*this, inputs, outputs, stream());
    case mx::bfloat16:
      return dispatch_backward<mx::bfloat16_t>(*this, inputs, outputs, stream());
    default:
      throw std::invalid_argument("[linear_cross_entropy] unsupported dtype.");
  }
}

} // namespace mlx_tuner
