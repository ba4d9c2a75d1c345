// float32 views of float32/float16/bfloat16 matrices for the BLAS-backed CPU kernels
// (reusable by every family: lora, qlora, dora). The optimized BLAS only multiplies
// float32 (scipy-openblas32 ships no sbgemm), so half-precision operands are widened
// into float32 row tiles once and the GEMMs run on those; results are narrowed back
// with round-to-nearest-even.
#pragma once

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>

#include "backend/cpu/encoder.h" // advise_huge_pages
#include "common/parallel.h"
#include "mlx/allocator.h"
#include "mlx/array.h"

namespace mlx_tuner::cpu {

namespace mx = mlx::core;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(uint16_t h) {
  return bits_to_float(uint32_t(h) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN. A select, not a branch, so that the
// narrowing loops vectorise.
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Branch-light IEEE half -> float: place exponent and mantissa, rescale the bias by
// 2^112 (which also normalises subnormals), then patch inf/NaN.
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float f = bits_to_float(em << 13) * 0x1p112f;
  uint32_t u = float_to_bits(f);
  if (em >= 0x7c00u) {
    u = (em << 13) | 0x7f800000u;
  }
  return bits_to_float(sign | u);
}

inline uint16_t float_to_fp16(float f) {
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {
    return uint16_t(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u));
  }
  if (x >= 0x477ff000u) {
    return uint16_t(sign | 0x7c00u); // rounds past 65504: inf
  }
  if (x < 0x38800000u) { // half subnormal or zero: let float addition round
    float t = bits_to_float(x) + 0.5f;
    return uint16_t(sign | (float_to_bits(t) - 0x3f000000u));
  }
  x += 0xc8000fffu + ((x >> 13) & 1u); // rebias exponent, round to nearest even
  return uint16_t(sign | (x >> 13));
}

// dst[i] = float(src[i]) for n contiguous elements of `dtype`.
inline void widen(const void* src, mx::Dtype dtype, float* dst, int64_t n) {
  if (dtype == mx::float32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == mx::bfloat16) {
    auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else if (dtype == mx::float16) {
    auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
  } else {
    throw std::invalid_argument("[mlx_tuner] float32, float16 or bfloat16 expected");
  }
}

// dst[i] = dtype(src[i]) for n contiguous elements, rounding to nearest even.
inline void narrow(const float* src, void* dst, mx::Dtype dtype, int64_t n) {
  if (dtype == mx::float32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if (dtype == mx::bfloat16) {
    auto* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else if (dtype == mx::float16) {
    auto* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_fp16(src[i]);
  } else {
    throw std::invalid_argument("[mlx_tuner] float32, float16 or bfloat16 expected");
  }
}

// parallel_for for the element-wise work between BLAS calls. OpenBLAS's workers spin
// for a while after each GEMM: on Linux, our own threads would then fight them for the
// cores (measured: 2x the CPU time of the conversions), so that work stays on one thread.
template <typename F>
inline void between_gemms_for(int64_t n, int64_t grain, F&& fn) {
#if defined(MLX_TUNER_SCIPY_OPENBLAS)
  (void)grain;
  if (n > 0) fn(int64_t(0), n);
#else
  parallel_for(n, grain, fn);
#endif
}

// widen/narrow of n elements, threaded where it pays (chunks of >= 16K elements).
inline void widen_par(const void* src, mx::Dtype dtype, float* dst, int64_t n) {
  size_t esz = mx::size_of(dtype);
  between_gemms_for(n, 1 << 14, [&](int64_t b, int64_t e) {
    widen(static_cast<const char*>(src) + b * esz, dtype, dst + b, e - b);
  });
}
inline void narrow_par(const float* src, void* dst, mx::Dtype dtype, int64_t n) {
  size_t esz = mx::size_of(dtype);
  between_gemms_for(n, 1 << 14, [&](int64_t b, int64_t e) {
    narrow(src + b, static_cast<char*>(dst) + b * esz, dtype, e - b);
  });
}

// float32 scratch from MLX's allocator: its buffer cache hands back recently freed
// memory (up to its cache limit), so a kernel called every step does not page-fault fresh
// pages in each time; above that, huge pages make the faults few.
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) {
    reset(n);
  }
  void reset(int64_t n) {
    data_.reset();
    if (n > 0) {
      data_.emplace(mx::allocator::malloc(n * sizeof(float)));
      advise_huge_pages(get(), n * sizeof(float));
    }
    size_ = n;
  }
  // Keeps the buffer when it already holds n floats.
  void resize(int64_t n) {
    if (n != size_) reset(n);
  }
  float* get() const {
    return data_ ? static_cast<float*>(data_->buffer().raw_ptr()) : nullptr;
  }
  int64_t size() const {
    return size_;
  }
  bool empty() const {
    return size_ == 0;
  }

 private:
  std::optional<mx::allocator::Data> data_;
  int64_t size_ = 0;
};

// Rows [r0, r0 + m) of a row-contiguous (rows, cols) matrix as float32: the array's own
// memory when it is float32, else widened into an owned scratch tile (reused across
// calls of `load` as long as it is large enough).
class F32Rows {
 public:
  F32Rows(const mx::array& a, int64_t cols)
      : data_(a.data<char>()), dtype_(a.dtype()), cols_(cols) {}

  const float* load(int64_t r0, int64_t m) {
    const char* src = data_ + r0 * cols_ * mx::size_of(dtype_);
    if (dtype_ == mx::float32) {
      return reinterpret_cast<const float*>(src);
    }
    if (r0 != last_r0_ || m != last_m_) { // the same tile twice is widened once
      reserve(m * cols_);
      widen_par(src, dtype_, buf_.get(), m * cols_);
      last_r0_ = r0;
      last_m_ = m;
    }
    return buf_.get();
  }

 private:
  void reserve(int64_t n) {
    if (n > buf_.size()) {
      buf_.reset(n);
    }
  }
  const char* data_;
  mx::Dtype dtype_;
  int64_t cols_;
  Scratch buf_;
  int64_t last_r0_ = -1;
  int64_t last_m_ = -1;
};

// A whole array as float32 (the array's memory when already float32).
class F32Whole {
 public:
  explicit F32Whole(const mx::array& a) {
    if (a.dtype() == mx::float32) {
      ptr_ = a.data<float>();
    } else {
      buf_.reset(a.size());
      // Whole operands are widened before the kernel's first GEMM: threads pay here.
      size_t esz = mx::size_of(a.dtype());
      const char* src = a.data<char>();
      float* dst = buf_.get();
      parallel_for(a.size(), 1 << 16, [&](int64_t b, int64_t e) {
        widen(src + b * esz, a.dtype(), dst + b, e - b);
      });
      ptr_ = buf_.get();
    }
  }
  const float* get() const {
    return ptr_;
  }

 private:
  const float* ptr_ = nullptr;
  Scratch buf_;
};

// A float32 accumulator for an output array: writes straight into a float32 output,
// else into scratch that `finish` narrows into the output's dtype.
class F32Out {
 public:
  F32Out(mx::array& out, bool zero) : out_(out) {
    if (out.dtype() == mx::float32) {
      ptr_ = out.data<float>();
    } else {
      buf_.reset(out.size());
      ptr_ = buf_.get();
    }
    if (zero && out.size() > 0) {
      std::memset(ptr_, 0, out.size() * sizeof(float));
    }
  }
  float* get() {
    return ptr_;
  }
  void finish() {
    if (!buf_.empty()) {
      narrow_par(ptr_, out_.data<void>(), out_.dtype(), out_.size());
    }
  }

 private:
  mx::array& out_;
  float* ptr_ = nullptr;
  Scratch buf_;
};

} // namespace mlx_tuner::cpu
