// cuBLASLt GEMMs for the kernel families (see gemm.cuh). cuBLASLt is column-major: a
// row-major matrix is its transpose, so C^T = op(B)^T op(A)^T is computed with the
// operands swapped.
#include <cublasLt.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "backend/cuda/gemm.cuh"

namespace mlx_tuner::cuda {

namespace {

void check_lt(cublasStatus_t st, const char* what) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("[mlx_tuner gemm] ") + what +
                             " failed: cublas status " + std::to_string(static_cast<int>(st)));
  }
}

cudaDataType_t cuda_type(mx::Dtype t) {
  if (t == mx::float32) return CUDA_R_32F;
  if (t == mx::float16) return CUDA_R_16F;
  if (t == mx::bfloat16) return CUDA_R_16BF;
  throw std::invalid_argument("[mlx_tuner gemm] float32, float16 or bfloat16 expected");
}

constexpr size_t kWorkspace = 32u << 20; // cuBLASLt's recommendation for Hopper

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
};

// The last three: the alignments (bytes, at most 256) of the A, B and C pointers.
using Key =
    std::tuple<int, bool, bool, int, int, int, int, int, int, int, int, int, bool, int, int, int>;

struct Plans {
  std::mutex mu;
  std::map<int, cublasLtHandle_t> handles;
  std::map<Key, Plan> plans;
  std::map<const mx::cu::CommandEncoder*, mx::array*> workspaces; // never freed
};

Plans& plans() {
  static Plans* p = new Plans; // never destroyed: cuBLAS may be gone at exit
  return *p;
}

int code(mx::Dtype t) {
  return t == mx::float32 ? 0 : t == mx::float16 ? 1 : 2;
}

// The largest power of two (at most 256, cuBLASLt's default assumption) dividing `p`.
int alignment(const void* p) {
  auto v = reinterpret_cast<uintptr_t>(p);
  int a = 1;
  while (a < 256 && (v & uintptr_t(a)) == 0) a *= 2;
  return a;
}

// Builds the plan of `g` (with strides resolved) for `handle`. Caller holds the mutex.
// `align` holds the alignments of A, B and C: a view that starts a few bytes into
// its buffer must get an algorithm that does not assume more (else cuBLASLt refuses it).
Plan make_plan(cublasLtHandle_t handle, const Gemm& g, int lda, int ldb, int ldc, bool bias,
               const std::array<uint32_t, 3>& align) {
  Plan p;
  check_lt(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate");
  cublasOperation_t op_b = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N; // first cuBLAS operand: B
  cublasOperation_t op_a = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_b, sizeof(op_b));
  cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_a, sizeof(op_a));
  if (bias) {
    auto epi = CUBLASLT_EPILOGUE_BIAS;
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
  }
  check_lt(cublasLtMatrixLayoutCreate(&p.lb, cuda_type(g.b_type), g.tb ? g.k : g.n,
                                      g.tb ? g.n : g.k, ldb), "LayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(&p.la, cuda_type(g.a_type), g.ta ? g.m : g.k,
                                      g.ta ? g.k : g.m, lda), "LayoutCreate");
  check_lt(cublasLtMatrixLayoutCreate(&p.lc, cuda_type(g.c_type), g.n, g.m, ldc), "LayoutCreate");
  cublasLtMatmulPreference_t pref;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "PreferenceCreate");
  size_t ws = kWorkspace;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  // cuBLASLt's A is our B (operands swapped, see the top of the file).
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[1]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[0]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]}};
  for (auto& [attr, bytes] : aligns) {
    cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof(bytes));
  }
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  auto st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.lb, p.la, p.lc, p.lc, pref, 1,
                                           &heur, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  check_lt(st, "AlgoGetHeuristic");
  if (found == 0) {
    throw std::runtime_error("[mlx_tuner gemm] cuBLASLt found no algorithm for a GEMM");
  }
  p.algo = heur.algo;
  p.workspace = heur.workspaceSize;
  return p;
}

thread_local int batch_depth = 0;

// The encoder's cuBLASLt workspace, made on first use (never inside a capture).
const mx::array& workspace(Plans& ps, mx::cu::CommandEncoder& enc) {
  auto& ws = ps.workspaces[&enc];
  if (ws == nullptr) {
    ws = new mx::array(malloc_device(kWorkspace, enc), {int(kWorkspace)}, mx::uint8);
  }
  return *ws;
}

} // namespace

GemmBatch::GemmBatch(mx::cu::CommandEncoder& enc) {
  if (batch_depth == 0) {
    auto& ps = plans();
    {
      std::lock_guard<std::mutex> lk(ps.mu);
      workspace(ps, enc); // before the capture starts
    }
    capture_.emplace(enc);
  }
  ++batch_depth;
}

GemmBatch::~GemmBatch() {
  capture_.reset(); // ends the capture: one node in MLX's graph
  --batch_depth;
}

bool GemmBatch::active() {
  return batch_depth > 0;
}

bool in_gemm_batch() {
  return GemmBatch::active();
}

mx::array scratch(mx::cu::CommandEncoder& enc, mx::Shape shape, mx::Dtype dtype) {
  size_t nbytes = mx::size_of(dtype);
  for (auto d : shape) nbytes *= d;
  mx::array a(malloc_device(std::max<size_t>(nbytes, 1), enc), std::move(shape), dtype);
  enc.add_temporary(a);
  return a;
}

void reads_writes(mx::cu::CommandEncoder& enc, std::initializer_list<const mx::array*> in,
                  std::initializer_list<const mx::array*> out) {
  for (auto* a : in) if (a) enc.set_input_array(*a);
  for (auto* a : out) if (a) enc.set_output_array(*a);
}

void gemm(mx::cu::CommandEncoder& enc, const Gemm& g, float alpha, const mx::array& a_arr,
          const mx::array& b_arr, float beta, mx::array& c_arr, const mx::array* bias_arr) {
  if (g.m == 0 || g.n == 0) {
    return;
  }
  HostTimer timer("gemm");
  int lda = g.lda ? g.lda : (g.ta ? g.m : g.k);
  int ldb = g.ldb ? g.ldb : (g.tb ? g.k : g.n);
  int ldc = g.ldc ? g.ldc : g.n;
  auto esz = [](const mx::array& x) { return mx::size_of(x.dtype()); };
  const char* a = gpu_ptr<char>(a_arr) + g.a_off * esz(a_arr);
  const char* b = gpu_ptr<char>(b_arr) + g.b_off * esz(b_arr);
  char* c = gpu_ptr<char>(c_arr) + g.c_off * esz(c_arr);
  const void* bias = bias_arr ? gpu_ptr<void>(*bias_arr) : nullptr;
  int device = enc.device().cuda_device();
  auto& ps = plans();
  std::lock_guard<std::mutex> lk(ps.mu);
  // Inside a GemmBatch the stream is capturing (thread-local mode): a first GEMM of a
  // shape may create the handle or query the heuristic, which that mode could refuse.
  struct Relaxed {
    bool on = GemmBatch::active();
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    Relaxed() { if (on) cudaThreadExchangeStreamCaptureMode(&mode); }
    ~Relaxed() { if (on) cudaThreadExchangeStreamCaptureMode(&mode); }
  };
  std::optional<Relaxed> relaxed(std::in_place);
  auto& handle = ps.handles[device];
  if (handle == nullptr) {
    check_lt(cublasLtCreate(&handle), "cublasLtCreate");
  }
  std::array<uint32_t, 3> align{uint32_t(alignment(a)), uint32_t(alignment(b)),
                                uint32_t(alignment(c))};
  Key key{device, g.ta, g.tb, g.m, g.n, g.k, code(g.a_type), code(g.b_type), code(g.c_type),
          lda, ldb, ldc, bias != nullptr, align[0], align[1], align[2]};
  auto it = ps.plans.find(key);
  if (it == ps.plans.end()) {
    it = ps.plans.emplace(key, make_plan(handle, g, lda, ldb, ldc, bias != nullptr, align)).first;
  }
  relaxed.reset();
  const Plan& p = it->second;
  if (bias != nullptr) {
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                   sizeof(bias));
  }
  // One workspace per encoder (stream), kept for the process: a scratch per call would
  // stay allocated until the graph has run, which for blockwise ops (many GEMMs per
  // graph) adds up to gigabytes. Registering it as written orders our GEMMs one after
  // another on it.
  const mx::array* ws_arr = nullptr;
  void* ws_ptr = nullptr;
  if (p.workspace > 0) {
    ws_arr = &workspace(ps, enc);
    ws_ptr = gpu_ptr<void>(*ws_arr);
  }
  reads_writes(enc, {&a_arr, &b_arr, bias_arr, beta != 0.0f ? &c_arr : nullptr},
               {&c_arr, ws_arr});
  // Its own capture, unless a GemmBatch is capturing already.
  std::optional<mx::cu::CommandEncoder::CaptureContext> capture;
  if (!GemmBatch::active()) {
    capture.emplace(enc);
  }
  check_lt(cublasLtMatmul(handle, p.desc, &alpha, b, p.lb, a, p.la, &beta, c, p.lc, c, p.lc,
                          &p.algo, ws_ptr, p.workspace, enc.stream()),
           "cublasLtMatmul");
}

namespace {

// Converts src0[0:n0] into dst0 and src1[0:n1] into dst1 (n1 may be 0): one launch.
template <typename In, typename Out>
__global__ void convert_kernel(const In* src0, Out* dst0, long long n0, const In* src1,
                               Out* dst1, long long n1) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (; i < n0 + n1; i += (long long)gridDim.x * blockDim.x) {
    if (i < n0) dst0[i] = static_cast<Out>(static_cast<float>(src0[i]));
    else dst1[i - n0] = static_cast<Out>(static_cast<float>(src1[i - n0]));
  }
}

template <typename In, typename Out>
void convert_as(mx::cu::CommandEncoder& enc, const mx::array& s0, mx::array& d0,
                const mx::array* s1, mx::array* d1) {
  long long n0 = s0.size(), n1 = s1 ? s1->size() : 0;
  if (n0 + n1 == 0) return;
  reads_writes(enc, {&s0, s1}, {&d0, d1});
  dim3 grid(unsigned(std::min<long long>((n0 + n1 + 255) / 256, 4096))), block(256);
  launch(enc, reinterpret_cast<const void*>(&convert_kernel<In, Out>), grid, block, 0,
         gpu_ptr<In>(s0), gpu_ptr<Out>(d0), n0, s1 ? gpu_ptr<In>(*s1) : nullptr,
         d1 ? gpu_ptr<Out>(*d1) : nullptr, n1);
}

template <typename Out>
void convert_typed(mx::cu::CommandEncoder& enc, const mx::array& s0, mx::array& d0,
                   const mx::array* s1 = nullptr, mx::array* d1 = nullptr) {
  if (s0.dtype() == mx::float32) convert_as<float, Out>(enc, s0, d0, s1, d1);
  else if (s0.dtype() == mx::float16) convert_as<__half, Out>(enc, s0, d0, s1, d1);
  else convert_as<__nv_bfloat16, Out>(enc, s0, d0, s1, d1);
}

void convert(mx::cu::CommandEncoder& enc, const mx::array& s0, mx::array& d0,
             const mx::array* s1 = nullptr, mx::array* d1 = nullptr) {
  if (d0.dtype() == mx::float32) convert_typed<float>(enc, s0, d0, s1, d1);
  else if (d0.dtype() == mx::float16) convert_typed<__half>(enc, s0, d0, s1, d1);
  else convert_typed<__nv_bfloat16>(enc, s0, d0, s1, d1);
}

} // namespace

mx::array as_dtype(mx::cu::CommandEncoder& enc, const mx::array& src, mx::Dtype to) {
  if (src.dtype() == to) return src;
  auto dst = scratch(enc, src.shape(), to);
  convert(enc, src, dst);
  return dst;
}

mx::array aligned16_copy(mx::cu::CommandEncoder& enc, const mx::array& src) {
  if (src.size() == 0 || aligned16(gpu_ptr<void>(src))) return src;
  auto dst = scratch(enc, src.shape(), src.dtype()); // the allocator's blocks are aligned
  convert(enc, src, dst);
  return dst;
}

std::pair<mx::array, mx::array> as_dtype(mx::cu::CommandEncoder& enc, const mx::array& a,
                                         const mx::array& b, mx::Dtype to) {
  if (a.dtype() == to || b.dtype() == to || a.dtype() != b.dtype()) {
    return {as_dtype(enc, a, to), as_dtype(enc, b, to)};
  }
  auto da = scratch(enc, a.shape(), to);
  auto db = scratch(enc, b.shape(), to);
  convert(enc, a, da, &b, &db);
  return {da, db};
}

} // namespace mlx_tuner::cuda
