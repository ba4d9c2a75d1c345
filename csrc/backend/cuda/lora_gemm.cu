// Host side of the LoRA GEMM (lora_gemm.cuh): the TMA descriptors and the launch.
#include <cuda.h>

#include <cstdlib>
#include <stdexcept>

#include "backend/cuda/gemm.cuh"
#include "backend/cuda/lora_gemm.cuh"
#include "backend/cuda/lowrank.cuh"

namespace mlx_tuner::cuda {

// The rank tile is multiplied as one 16-wide k step (the other 48 columns of xa_pad and
// b_pad are never read): the ranks lowrank_fits admits must fit in it.
static_assert(kLowRankMax <= 16, "lora_gemm multiplies one 16-wide k step of the rank tile");
static_assert(lora_gemm::kRankCols == kLowRankPad, "the rank tile's operands as lowrank packs them");
static_assert(lora_gemm::kProjRows == kLowRankMax, "M (16, K) as lowrank_pack packs a project operand");

namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (no -lcuda).
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion");
    if (q != cudaDriverEntryPointSuccess || !f) {
      throw std::runtime_error("[lora_gemm] cuTensorMapEncodeTiled is not available");
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A row-major bf16 (rows, cols) matrix read or written in boxes of 64 columns x box_rows,
// with the 128-byte swizzle the kernel's shared-memory layouts assume.
CUtensorMap tensor_map(const mx::array& a, int rows, int cols, int box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  cuuint32_t box[2] = {cuuint32_t(lora_gemm::kBK), cuuint32_t(box_rows)};
  cuuint32_t elem[2] = {1, 1};
  CUresult r = encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, gpu_ptr<void>(a), dims,
                              strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("[lora_gemm] cuTensorMapEncodeTiled failed: " + std::to_string(int(r)));
  }
  return m;
}

} // namespace

bool lora_gemm_fits(mx::cu::CommandEncoder& enc, mx::Dtype t, int in, int out,
                    std::initializer_list<const mx::array*> operands) {
  static bool on = [] {
    const char* v = std::getenv("MLX_TUNER_LORA_GEMM");
    return !(v && v[0] == '0');
  }();
  static bool hopper = [&] {
    int major = 0, minor = 0, dev = enc.device().cuda_device();
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    return major == 9 && minor == 0;
  }();
  if (!on || !hopper || t != mx::bfloat16 || in % 8 != 0 || out % 8 != 0) return false;
  for (auto* a : operands) {
    if (!aligned16(gpu_ptr<void>(*a))) return false; // TMA reads 16-byte aligned addresses only
  }
  return true;
}

bool rank_in_gemm() {
  static bool on = [] {
    const char* v = std::getenv("MLX_TUNER_RANK_IN_GEMM");
    return !(v && v[0] == '0');
  }();
  return on;
}

void lora_gemm(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& w,
               const LoRAGemmRank& rank, const mx::array& b_pad, const mx::array* bias,
               mx::array& y, bool w_kn, const mx::array* col_scale) {
  using namespace lora_gemm;
  // Here in = K and out = N of the product: W is (out, in), or (in, out) with w_kn.
  int n = x.size() / x.shape(-1), in = x.shape(-1), out = y.shape(-1);
  bool proj = rank.p_out != nullptr;
  CUtensorMap tx = tensor_map(x, n, in, kBM);
  CUtensorMap tw = w_kn ? tensor_map(w, in, out, 64) : tensor_map(w, out, in, kBN);
  CUtensorMap tr = proj ? tensor_map(rank.operand, kProjRows, in, kProjRows)
                        : tensor_map(rank.operand, n, kRankCols, kBM);
  CUtensorMap tbp = tensor_map(b_pad, out, kRankCols, kBN);
  CUtensorMap ty = tensor_map(y, n, out, kEpiBox);
  Params p{n, out, in, bias ? gpu_ptr<__nv_bfloat16>(*bias) : nullptr, 1,
           proj ? gpu_ptr<__nv_bfloat16>(*rank.p_out) : nullptr, proj ? rank.p_out->shape(-1) : 0,
           col_scale ? gpu_ptr<float>(*col_scale) : nullptr};
  reads_writes(enc, {&x, &w, &rank.operand, &b_pad, bias, col_scale}, {&y, rank.p_out});
  // Persistent: as many CTAs as the rounds of tiles need, no more (512 tiles take 4 rounds on
  // 128 CTAs as on 132), so that the multiprocessors left over run the kernels beside it
  // (the next project, a reduce) instead of idling through the last round.
  int tiles = ((n + kBM - 1) / kBM) * ((out + kBN - 1) / kBN);
  int rounds = (tiles + sm_count(enc) - 1) / sm_count(enc);
  const void* kern;
  if (col_scale) { // DoRA's forward only
    if (w_kn) throw std::logic_error("[lora_gemm] a column scale with W as (K, N)");
    kern = proj ? reinterpret_cast<const void*>(&lora_gemm_kernel<false, true, true>)
                : reinterpret_cast<const void*>(&lora_gemm_kernel<false, false, true>);
  } else if (proj) {
    kern = w_kn ? reinterpret_cast<const void*>(&lora_gemm_kernel<true, true>)
                : reinterpret_cast<const void*>(&lora_gemm_kernel<false, true>);
  } else {
    kern = w_kn ? reinterpret_cast<const void*>(&lora_gemm_kernel<true, false>)
                : reinterpret_cast<const void*>(&lora_gemm_kernel<false, false>);
  }
  int smem = proj ? Layout<true>::kSmemBytes : Layout<false>::kSmemBytes;
  launch(enc, kern, dim3((tiles + rounds - 1) / rounds), dim3(kThreads), smem, tx, tw, tr, tbp, ty, p);
}

} // namespace mlx_tuner::cuda
