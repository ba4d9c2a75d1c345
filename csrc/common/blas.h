// The optimized BLAS behind the CPU kernels: Accelerate on macOS, scipy-openblas32 on
// Linux (its symbols carry a scipy_ prefix). Row-major float32 GEMM only.
#pragma once

#if defined(MLX_TUNER_ACCELERATE)
#include <Accelerate/Accelerate.h>
#define MLX_TUNER_CBLAS(name) cblas_##name
#else
#include <cblas.h>
#define MLX_TUNER_CBLAS(name) scipy_cblas_##name
#endif

#if defined(MLX_TUNER_SCIPY_OPENBLAS)
extern "C" int scipy_openblas_get_num_threads(void);
extern "C" void scipy_openblas_set_num_threads(int);
#endif

namespace mlx_tuner {

// C[m, n] = alpha * op(A) op(B) + beta * C, row-major, leading dimensions explicit.
inline void sgemm(
    bool trans_a,
    bool trans_b,
    int m,
    int n,
    int k,
    float alpha,
    const float* a,
    int lda,
    const float* b,
    int ldb,
    float beta,
    float* c,
    int ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  MLX_TUNER_CBLAS(sgemm)
  (CblasRowMajor,
   trans_a ? CblasTrans : CblasNoTrans,
   trans_b ? CblasTrans : CblasNoTrans,
   m,
   n,
   k,
   alpha,
   a,
   lda,
   b,
   ldb,
   beta,
   c,
   ldc);
}

// While alive, BLAS calls run on the calling thread only (OpenBLAS; Accelerate is left
// alone), for kernels whose own threads each call BLAS. The old count comes back after.
struct BlasSingleThread {
#if defined(MLX_TUNER_SCIPY_OPENBLAS)
  int prev = scipy_openblas_get_num_threads();
  BlasSingleThread() {
    if (prev != 1) {
      scipy_openblas_set_num_threads(1);
    }
  }
  ~BlasSingleThread() {
    if (prev != 1) {
      scipy_openblas_set_num_threads(prev);
    }
  }
#endif
};

} // namespace mlx_tuner
