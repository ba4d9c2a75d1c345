// Standalone check and timing of csrc/backend/cuda/lora_gemm.cuh on an sm_90 GPU, against a
// naive float32 reference and cuBLAS's bf16 GEMM in the same run (a probe, not a test):
//   tools/lora_gemm_probe.sh   (builds with nvcc and runs; M N K from the command line)
// With proj (7th argument), the rank term's p = x M is made by the GEMM (kProj): p is
// checked against x M rounded to bf16, and y against the reference built on that p.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/cuda/lora_gemm.cuh"

using namespace mlx_tuner::lora_gemm;

#define CK(x)                                                                  \
  do {                                                                         \
    auto e = (x);                                                              \
    if (e != 0) {                                                              \
      std::printf("error %d at %s:%d: %s\n", int(e), __FILE__, __LINE__, #x); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

__global__ void fill(__nv_bfloat16* p, long n, int cols, int valid, uint32_t seed, float amp) {
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    float v = (float(h & 0xFFFF) / 65535.0f - 0.5f) * amp;
    p[i] = __float2bfloat16((i % cols) < valid ? v : 0.0f);
  }
}

// p_ref (m, kRankCols): columns q < 16 = x M^T[.., q] rounded to bf16, M (16, k); the rest 0.
__global__ void reference_p(const __nv_bfloat16* x, const __nv_bfloat16* pk, __nv_bfloat16* xa, int m,
                            int k) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= m) return;
  for (int q = 0; q < kRankCols; ++q) {
    float s = 0.0f;
    for (int c = 0; q < kProjRows && c < k; ++c) {
      s += __bfloat162float(x[(long)i * k + c]) * __bfloat162float(pk[(long)q * k + c]);
    }
    xa[(long)i * kRankCols + q] = __float2bfloat16(s);
  }
}

// y_ref[i][j] = sum_k x[i][k] w[j][k] + sum_q xa[i][q] bp[j][q] (+ bias), float32.
// mn: w is (k, n) (N-major), else (n, k).
__global__ void reference(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* xa,
                          const __nv_bfloat16* bp, const __nv_bfloat16* bias, float* y, int m,
                          int n, int k, int rank, int mn) {
  int i = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= m || j >= n) return;
  float s = 0.0f;
  for (int q = 0; q < k; ++q) {
    float wv = __bfloat162float(mn ? w[(long)q * n + j] : w[(long)j * k + q]);
    s += __bfloat162float(x[(long)i * k + q]) * wv;
  }
  if (rank) {
    for (int q = 0; q < kRankCols; ++q) {
      s += __bfloat162float(xa[(long)i * kRankCols + q]) * __bfloat162float(bp[(long)j * kRankCols + q]);
    }
  }
  if (bias) s += __bfloat162float(bias[j]);
  y[(long)i * n + j] = s;
}

using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                              CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                              CUtensorMapFloatOOBfill);

CUtensorMap tmap(EncodeFn enc, const void* p, int rows, int cols, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  cuuint32_t box[2] = {cuuint32_t(kBK), cuuint32_t(box_rows)};
  cuuint32_t es[2] = {1, 1};
  CK(enc(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(p), dims, strides, box, es,
         CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
  return m;
}

int main(int argc, char** argv) {
  int M = argc > 1 ? atoi(argv[1]) : 4096, N = argc > 2 ? atoi(argv[2]) : 4096;
  int K = argc > 3 ? atoi(argv[3]) : 4096, reps = argc > 4 ? atoi(argv[4]) : 50;
  int bias_on = argc > 5 ? atoi(argv[5]) : 0, mn = argc > 6 ? atoi(argv[6]) : 0;
  int proj = argc > 7 ? atoi(argv[7]) : 0, rr = 13; // kProj: M's rows past rr are zero
  EncodeFn enc = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&enc), cudaEnableDefault, &q));
  __nv_bfloat16 *x, *w, *xa, *bp, *y, *y2, *pk, *pout, *bias = nullptr;
  float* yr;
  CK(cudaMalloc(&x, 2l * M * K));
  CK(cudaMalloc(&w, 2l * N * K));
  CK(cudaMalloc(&xa, 2l * M * kRankCols));
  CK(cudaMalloc(&bp, 2l * N * kRankCols));
  CK(cudaMalloc(&y, 2l * M * N));
  CK(cudaMalloc(&y2, 2l * M * N));
  CK(cudaMalloc(&yr, 4l * M * N));
  CK(cudaMalloc(&pk, 2l * kProjRows * K));
  CK(cudaMalloc(&pout, 2l * M * rr));
  fill<<<1024, 256>>>(x, (long)M * K, K, K, 1, 2.0f);
  fill<<<1024, 256>>>(w, (long)N * K, K, K, 2, 2.0f / sqrtf(K));
  fill<<<1024, 256>>>(xa, (long)M * kRankCols, kRankCols, 16, 3, 2.0f);
  fill<<<1024, 256>>>(bp, (long)N * kRankCols, kRankCols, 16, 4, 0.5f);
  fill<<<1024, 256>>>(pk, (long)kProjRows * K, K, K, 6, 2.0f / sqrtf(K));
  CK(cudaMemset(pk + (long)rr * K, 0, 2l * (kProjRows - rr) * K));
  if (proj) { // the reference's xa: x M^T, as the GEMM rounds it
    reference_p<<<(M + 127) / 128, 128>>>(x, pk, xa, M, K);
    CK(cudaDeviceSynchronize());
  }
  if (bias_on) {
    CK(cudaMalloc(&bias, 2l * N));
    fill<<<64, 256>>>(bias, N, N, N, 5, 1.0f);
  }
  CUtensorMap tx = tmap(enc, x, M, K, kBM);
  CUtensorMap tw = mn ? tmap(enc, w, K, N, 64) : tmap(enc, w, N, K, kBN);
  CUtensorMap txa = tmap(enc, xa, M, kRankCols, kBM), tbp = tmap(enc, bp, N, kRankCols, kBN);
  CUtensorMap tpk = tmap(enc, pk, kProjRows, K, kProjRows);
  CUtensorMap ty = tmap(enc, y, M, N, kEpiBox);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  constexpr int s0 = Layout<false>::kSmemBytes, s1 = Layout<true>::kSmemBytes;
  CK(cudaFuncSetAttribute(lora_gemm_kernel<false, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, s0));
  CK(cudaFuncSetAttribute(lora_gemm_kernel<true, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, s0));
  CK(cudaFuncSetAttribute(lora_gemm_kernel<false, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, s1));
  CK(cudaFuncSetAttribute(lora_gemm_kernel<true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, s1));
  int tiles = ((M + kBM - 1) / kBM) * ((N + kBN - 1) / kBN);
  int rounds = (tiles + sms - 1) / sms; // as lora_gemm.cu sizes the grid
  dim3 grid((tiles + rounds - 1) / rounds);
  // rank 2: the rank term with p made by the GEMM (kProj), written into pout.
  auto run = [&](int rank) {
    Params p{M, N, K, bias, rank > 0, rank == 2 ? pout : nullptr, rr};
    if (rank == 2) {
      if (mn) lora_gemm_kernel<true, true><<<grid, kThreads, s1>>>(tx, tw, tpk, tbp, ty, p);
      else lora_gemm_kernel<false, true><<<grid, kThreads, s1>>>(tx, tw, tpk, tbp, ty, p);
    } else if (mn) {
      lora_gemm_kernel<true, false><<<grid, kThreads, s0>>>(tx, tw, txa, tbp, ty, p);
    } else {
      lora_gemm_kernel<false, false><<<grid, kThreads, s0>>>(tx, tw, txa, tbp, ty, p);
    }
  };
  // Correctness, with and without the rank tile.
  for (int rank = 0; rank < (proj ? 3 : 2); ++rank) {
    run(rank);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    reference<<<dim3((N + 127) / 128, M), 128>>>(x, w, xa, bp, bias, yr, M, N, K, rank > 0, mn);
    CK(cudaDeviceSynchronize());
    std::vector<__nv_bfloat16> hy((size_t)M * N);
    std::vector<float> hr((size_t)M * N);
    CK(cudaMemcpy(hy.data(), y, 2l * M * N, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hr.data(), yr, 4l * M * N, cudaMemcpyDeviceToHost));
    double worst = 0, scale = 0;
    long bad = 0, at = -1;
    for (size_t i = 0; i < hy.size(); ++i) {
      double d = std::fabs(double(__bfloat162float(hy[i])) - hr[i]);
      double tol = 1e-2 + 8e-3 * std::fabs(hr[i]);
      scale = std::max(scale, double(std::fabs(hr[i])));
      if (d > worst) worst = d, at = long(i);
      if (!(d <= tol)) ++bad;
    }
    std::printf("check%s M %d N %d K %d rank %d bias %d: max |err| %.4g at (%ld, %ld) (|ref| up to %.3g), %ld outside tolerance\n",
                mn ? " (N-major W)" : "", M, N, K, rank, bias_on, worst, at / N, at % N, scale, bad);
    if (rank == 2) { // the p the GEMM wrote, against x M^T rounded to bf16
      std::vector<__nv_bfloat16> hp((size_t)M * rr), hx((size_t)M * kRankCols);
      CK(cudaMemcpy(hp.data(), pout, 2l * M * rr, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hx.data(), xa, 2l * M * kRankCols, cudaMemcpyDeviceToHost));
      double pw = 0;
      long pbad = 0;
      for (long i = 0; i < M; ++i) {
        for (int q = 0; q < rr; ++q) {
          double a = __bfloat162float(hp[i * rr + q]), b = __bfloat162float(hx[i * kRankCols + q]);
          double d = std::fabs(a - b);
          pw = std::max(pw, d);
          if (!(d <= 1e-2 + 8e-3 * std::fabs(b))) ++pbad;
        }
      }
      std::printf("check p (M x %d written by the GEMM): max |err| %.4g, %ld outside tolerance\n", rr, pw, pbad);
    }
  }
  // Timing: ours (with and without the rank tile) against cuBLAS's x W^T, alternated.
  cublasHandle_t h;
  CK(cublasCreate(&h));
  float one = 1.0f, zero = 0.0f;
  auto cublas = [&] {
    // Column-major: y^T (N x M) = W (N x K as K-major) ^T-op ... i.e. y^T = W x^T.
    CK(cublasGemmEx(h, mn ? CUBLAS_OP_N : CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, CUDA_R_16BF,
                    mn ? N : K, x, CUDA_R_16BF, K, &zero, y2, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT));
  };
  // cuBLASLt's first heuristic choice, as MLX's matmul makes it (32 MiB of workspace).
  cublasLtHandle_t lt;
  CK(cublasLtCreate(&lt));
  cublasLtMatmulDesc_t desc;
  CK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = mn ? CUBLAS_OP_N : CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtMatrixLayout_t la, lb, lc;
  CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, mn ? N : K, mn ? K : N, mn ? N : K));
  CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K));
  CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, M, N));
  size_t ws_bytes = 32u << 20;
  void* ws;
  CK(cudaMalloc(&ws, ws_bytes));
  cublasLtMatmulPreference_t pref;
  CK(cublasLtMatmulPreferenceCreate(&pref));
  CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof(ws_bytes)));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  CK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &heur, &found));
  auto cublaslt = [&] {
    CK(cublasLtMatmul(lt, desc, &one, w, la, x, lb, &zero, y2, lc, y2, lc, found ? &heur.algo : nullptr,
                      ws, ws_bytes, 0));
  };
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> t_ours, t_ours0, t_cublas, t_lt;
  auto time = [&](auto&& f, std::vector<float>& out) {
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    out.push_back(ms * 1000.0f);
  };
  std::vector<float> t_proj;
  for (int i = 0; i < 5; ++i) run(1), cublas();
  for (int i = 0; i < reps; ++i) {
    if (proj) time([&] { run(2); }, t_proj);
    time([&] { run(1); }, t_ours);
    time([&] { cublas(); }, t_cublas);
    time([&] { run(0); }, t_ours0);
    time([&] { cublaslt(); }, t_lt);
  }
  auto med = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  double flops = 2.0 * M * N * K;
  std::printf("cuBLASLt's first heuristic choice (as MLX's matmul asks): %.1f us\n", med(t_lt));
  if (proj) std::printf("ours with p made inside (kProj): %.1f us\n", med(t_proj));
  std::printf("time (median of %d, us): ours+rank %.1f  ours %.1f  cublas %.1f  | ours+rank / cublas %.3f  "
              "(TFLOP/s: ours %.0f, cublas %.0f)\n",
              reps, med(t_ours), med(t_ours0), med(t_cublas), med(t_ours) / med(t_cublas),
              flops / med(t_ours0) / 1e6, flops / med(t_cublas) / 1e6);
  return 0;
}
