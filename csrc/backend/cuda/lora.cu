// CUDA kernels of the fused LoRA linear (maths in csrc/ops/lora.h). The big products
// are cuBLASLt matmuls captured into MLX's CUDA graph (the encoder's capture context);
// the rank-r term is a second matmul with beta = 1 into the same output, so there is
// no (N, out) temporary and no separate add pass. Small kernels narrow the rank-r
// operands (xa, g = dy B^T, A, B) to the compute dtype T, which cuBLASLt needs for
// matching input types; gradients of float32 LoRA parameters come out in float32.
// x, W, bias, x_d arrive in T (the op casts them on the GPU); A, B in T or float32.
#include <cublasLt.h>

#include <map>
#include <optional>
#include <mutex>
#include <tuple>

#include "backend/cuda/common.cuh"
#include "ops/lora.h"

namespace mlx_tuner {

namespace {

using cuda::check;

void check_lt(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(
        std::string("[lora_linear] ") + what + " failed: cublas status " +
        std::to_string(static_cast<int>(st)));
  }
}

cudaDataType_t cuda_type(mx::Dtype t) {
  if (t == mx::float32) return CUDA_R_32F;
  if (t == mx::float16) return CUDA_R_16F;
  if (t == mx::bfloat16) return CUDA_R_16BF;
  throw std::invalid_argument("[lora_linear] float32, float16 or bfloat16 expected");
}

cublasLtHandle_t lt_handle(int device) {
  static std::mutex mu;
  static std::map<int, cublasLtHandle_t> handles;
  std::lock_guard<std::mutex> lk(mu);
  auto& h = handles[device];
  if (h == nullptr) {
    check_lt(cublasLtCreate(&h), "cublasLtCreate");
  }
  return h;
}

constexpr size_t kWorkspace = 32u << 20; // cuBLASLt's recommendation for Hopper

// A device buffer of `shape` x `dtype` that lives until the encoder's graph has run.
mx::array scratch(mx::cu::CommandEncoder& enc, mx::Shape shape, mx::Dtype dtype) {
  size_t nbytes = mx::size_of(dtype);
  for (auto d : shape) nbytes *= d;
  mx::array a(cuda::malloc_device(std::max<size_t>(nbytes, 1), enc), std::move(shape), dtype);
  enc.add_temporary(a);
  return a;
}

// MLX orders the nodes of its CUDA graph by data flow: each node depends on the last
// writers of the buffers registered (set_input_array / set_output_array) just before
// it. Every node below registers what it reads and writes, scratch included.
void reads_writes(mx::cu::CommandEncoder& enc, std::initializer_list<const mx::array*> in,
                  std::initializer_list<const mx::array*> out) {
  for (auto* a : in) if (a) enc.set_input_array(*a);
  for (auto* a : out) enc.set_output_array(*a);
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C (+ bias[n] when given), captured on
// the encoder's stream. cuBLASLt is column-major: a row-major matrix is its transpose,
// so this computes C^T = op(B)^T op(A)^T with the operands swapped.
struct Gemm {
  bool ta, tb;
  int m, n, k;
  mx::Dtype a_type, b_type, c_type;
};

void gemm(
    mx::cu::CommandEncoder& enc, const Gemm& g, float alpha, const mx::array& a_arr,
    const mx::array& b_arr, float beta, mx::array& c_arr, const mx::array* bias_arr = nullptr) {
  const void* a = gpu_ptr<void>(a_arr);
  const void* b = gpu_ptr<void>(b_arr);
  void* c = gpu_ptr<void>(c_arr);
  const void* bias = bias_arr ? gpu_ptr<void>(*bias_arr) : nullptr;
  if (g.m == 0 || g.n == 0) {
    return;
  }
  int lda = g.ta ? g.m : g.k, ldb = g.tb ? g.k : g.n, ldc = g.n;
  cublasLtMatmulDesc_t desc;
  check_lt(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  cublasOperation_t op_b = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N; // first cuBLAS operand: B
  cublasOperation_t op_a = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof(op_b));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof(op_a));
  if (bias != nullptr) {
    auto epi = CUBLASLT_EPILOGUE_BIAS;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
    cublasLtMatmulDescSetAttribute(
        desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias));
  }
  // Column-major views: B_rm (k x n or n x k) -> (n x k) / (k x n), etc.
  cublasLtMatrixLayout_t lb, la, lc;
  check_lt(cublasLtMatrixLayoutCreate(
               &lb, cuda_type(g.b_type), g.tb ? g.k : g.n, g.tb ? g.n : g.k, ldb),
           "LayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(
               &la, cuda_type(g.a_type), g.ta ? g.m : g.k, g.ta ? g.k : g.m, lda),
           "LayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(&lc, cuda_type(g.c_type), g.n, g.m, ldc), "LayoutCreate");

  auto handle = lt_handle(enc.device().cuda_device());
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  size_t ws = kWorkspace;
  cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  check_lt(cublasLtMatmulAlgoGetHeuristic(handle, desc, lb, la, lc, lc, pref, 1, &heur, &found),
           "AlgoGetHeuristic");
  if (found == 0) {
    throw std::runtime_error("[lora_linear] cuBLASLt found no algorithm for a GEMM");
  }
  std::optional<mx::array> ws_arr;
  void* workspace = nullptr;
  if (heur.workspaceSize > 0) {
    ws_arr = scratch(enc, {int(heur.workspaceSize)}, mx::uint8);
    workspace = gpu_ptr<void>(*ws_arr);
  }
  reads_writes(enc, {&a_arr, &b_arr, bias_arr, beta != 0.0f ? &c_arr : nullptr},
               {&c_arr});
  {
    auto capture = enc.capture_context();
    check_lt(cublasLtMatmul(handle, desc, &alpha, b, lb, a, la, &beta, c, lc, c, lc,
                            &heur.algo, workspace, heur.workspaceSize, enc.stream()),
             "cublasLtMatmul");
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
}

template <typename In, typename Out>
__global__ void convert_kernel(const In* src, Out* dst, long long n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i < n; i += (long long)gridDim.x * blockDim.x) {
    dst[i] = static_cast<Out>(static_cast<float>(src[i]));
  }
}

template <typename T>
void convert_typed(mx::cu::CommandEncoder& enc, const mx::array& src, mx::array& dst) {
  long long n = src.size();
  if (n == 0) return;
  reads_writes(enc, {&src}, {&dst});
  dim3 grid(unsigned(std::min<long long>((n + 255) / 256, 4096))), block(256);
  T* out = gpu_ptr<T>(dst);
  if (src.dtype() == mx::float32) {
    cuda::launch(enc, reinterpret_cast<const void*>(&convert_kernel<float, T>), grid, block,
                 0, gpu_ptr<float>(src), out, n);
  } else if (src.dtype() == mx::float16) {
    cuda::launch(enc, reinterpret_cast<const void*>(&convert_kernel<__half, T>), grid, block,
                 0, gpu_ptr<__half>(src), out, n);
  } else {
    cuda::launch(enc, reinterpret_cast<const void*>(&convert_kernel<__nv_bfloat16, T>), grid,
                 block, 0, gpu_ptr<__nv_bfloat16>(src), out, n);
  }
}

// `src` in dtype `to`: src itself, or a converted copy in scratch.
mx::array as_dtype(mx::cu::CommandEncoder& enc, const mx::array& src, mx::Dtype to) {
  if (src.dtype() == to) return src;
  auto dst = scratch(enc, src.shape(), to);
  if (to == mx::float32) convert_typed<float>(enc, src, dst);
  else if (to == mx::float16) convert_typed<__half>(enc, src, dst);
  else convert_typed<__nv_bfloat16>(enc, src, dst);
  return dst;
}

void alloc(mx::array& a, mx::cu::CommandEncoder& enc) {
  cuda::alloc_output(a, enc);
}

} // namespace

void LoRALinear::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& a = inputs[2];
  const auto& b = inputs[3];
  const mx::array* bias = has_bias_ ? &inputs[4] : nullptr;
  const auto& xd = has_xd_ ? inputs[has_bias_ ? 5 : 4] : x;
  auto& y = outputs[0];
  auto& xa = outputs[1];
  alloc(y, enc);
  alloc(xa, enc);
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  if (n == 0) return;
  auto T = x.dtype();
  auto a_t = as_dtype(enc, a, T);
  auto b_t = as_dtype(enc, b, T);
  // xa = x_d A in float32 (saved), and its T copy for the rank-r GEMM
  gemm(enc, {false, false, n, r, in, T, T, mx::float32}, 1.0f, xd, a_t, 0.0f, xa);
  auto xa_t = as_dtype(enc, xa, T);
  // y = x W^T (+ bias), then y += s xa B into the same buffer
  gemm(enc, {false, true, n, out, in, T, T, T}, 1.0f, x, w, 0.0f, y, bias);
  gemm(enc, {false, false, n, out, r, T, T, T}, scale_, xa_t, b_t, 1.0f, y);
}

void LoRALinearVJP::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& enc = mx::cu::get_command_encoder(stream());
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& a = inputs[2];
  const auto& b = inputs[3];
  const auto& xa = inputs[4];
  const auto& dy = inputs[5];
  const auto& xd = has_xd_ ? inputs[6] : x;
  for (auto& o : outputs) alloc(o, enc);
  size_t k = 0;
  auto take = [&](bool on) -> mx::array* { return on ? &outputs[k++] : nullptr; };
  mx::array* dx = take(grads_.x);
  if (grads_.weight || grads_.bias) {
    throw std::logic_error("[lora_linear] dW and dbias are plain MLX ops on the GPU");
  }
  mx::array* da = take(grads_.lora_a);
  mx::array* db = take(grads_.lora_b);
  mx::array* dxd = take(grads_.x_dropped);
  int n = x.shape(0), in = w.shape(1), out = w.shape(0), r = a.shape(1);
  auto T = x.dtype();
  if (n == 0) { // empty batch: the parameter gradients are zeros
    for (auto* o : {da, db}) {
      if (o) check(cudaMemsetAsync(gpu_ptr<void>(*o), 0, o->nbytes(), enc.stream()), "memset");
    }
    return;
  }
  bool lora_into_dx = dx && !has_xd_;
  bool need_g = da || dxd || lora_into_dx;
  std::optional<mx::array> g_t, a_t;
  if (need_g) { // g = dy B^T (float32 accumulate, T for the next products)
    auto b_t = as_dtype(enc, b, T);
    auto g = scratch(enc, {n, r}, mx::float32);
    gemm(enc, {false, true, n, r, out, T, T, mx::float32}, 1.0f, dy, b_t, 0.0f, g);
    g_t = as_dtype(enc, g, T);
  }
  if (lora_into_dx || dxd) {
    a_t = as_dtype(enc, a, T);
  }
  if (dx) { // dx = dy W (+ s g A^T, accumulated into the same buffer)
    gemm(enc, {false, false, n, in, out, T, T, T}, 1.0f, dy, w, 0.0f, *dx);
    if (lora_into_dx) {
      gemm(enc, {false, true, n, in, r, T, T, T}, scale_, *g_t, *a_t, 1.0f, *dx);
    }
  }
  if (dxd) {
    gemm(enc, {false, true, n, in, r, T, T, T}, scale_, *g_t, *a_t, 0.0f, *dxd);
  }
  if (da) { // dA = s x_d^T g, in A's dtype (float32 for mlx-lm's LoRA parameters)
    gemm(enc, {true, false, in, r, n, T, T, da->dtype()}, scale_, xd, *g_t, 0.0f, *da);
  }
  if (db) { // dB = s xa^T dy
    auto xa_t = as_dtype(enc, xa, T);
    gemm(enc, {true, false, r, out, n, T, T, db->dtype()}, scale_, xa_t, dy, 0.0f, *db);
  }
}

} // namespace mlx_tuner
