// cuBLASLt GEMMs captured into MLX's CUDA graph, shared by the kernel families (lora,
// qlora, dora, cross_entropy), and the small helpers around them: scratch buffers that
// live until the graph has run, dtype conversion, data-flow registration.
#pragma once

#include <initializer_list>
#include <optional>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

// Row-major C[m, n] = alpha op(A) op(B) + beta C (+ bias[n]), on the encoder's stream.
// lda/ldb/ldc of 0 mean "packed" (the row length of the matrix as stored); a non-zero
// value lets a GEMM read or write a column block of a wider matrix (pointer offsets in
// elements: a_off, b_off, c_off).
struct Gemm {
  bool ta, tb;
  int m, n, k;
  mx::Dtype a_type, b_type, c_type;
  int lda = 0, ldb = 0, ldc = 0;
  size_t a_off = 0, b_off = 0, c_off = 0;
};

// Plans (descriptors, layouts, the heuristic's algorithm) are cached per shape, types
// and strides: the heuristic costs tens of microseconds of host time per call.
void gemm(mx::cu::CommandEncoder& enc, const Gemm& g, float alpha, const mx::array& a,
          const mx::array& b, float beta, mx::array& c, const mx::array* bias = nullptr);

// Several GEMMs captured as ONE node of MLX's graph: each capture costs tens of
// microseconds of host time (begin/end capture, a child graph added and keyed), which for
// the small rank-r products is more than their GPU time. Inside a batch only gemm() may
// run: no kernel launches and no new buffers (a capture would record the allocation);
// make scratch and conversions first. Register nothing special: what the GEMMs register
// orders the one node.
class GemmBatch {
 public:
  explicit GemmBatch(mx::cu::CommandEncoder& enc);
  ~GemmBatch();
  GemmBatch(const GemmBatch&) = delete;
  GemmBatch& operator=(const GemmBatch&) = delete;
  static bool active(); // on this thread

 private:
  std::optional<mx::cu::CommandEncoder::CaptureContext> capture_;
};

// A device buffer of `shape` x `dtype` that lives until the encoder's graph has run.
mx::array scratch(mx::cu::CommandEncoder& enc, mx::Shape shape, mx::Dtype dtype);

// MLX orders the nodes of its CUDA graph by data flow: each node depends on the last
// writers of the buffers registered (set_input_array / set_output_array) just before
// it. Every node registers what it reads and writes, scratch included.
void reads_writes(mx::cu::CommandEncoder& enc, std::initializer_list<const mx::array*> in,
                  std::initializer_list<const mx::array*> out);

// `src` in dtype `to`: src itself, or a converted copy in scratch.
mx::array as_dtype(mx::cu::CommandEncoder& enc, const mx::array& src, mx::Dtype to);

// `src` starting 16-byte aligned, as kernels that read rows by 16-byte vectors need: src
// itself, or (a view may start anywhere) its copy in scratch.
mx::array aligned16_copy(mx::cu::CommandEncoder& enc, const mx::array& src);

// The same for two arrays, in one launch when both need converting from one dtype (the
// LoRA pair A, B: each launch is a graph node, and the host cost per node adds up).
std::pair<mx::array, mx::array> as_dtype(mx::cu::CommandEncoder& enc, const mx::array& a,
                                         const mx::array& b, mx::Dtype to);

} // namespace mlx_tuner::cuda
