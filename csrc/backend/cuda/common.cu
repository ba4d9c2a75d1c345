#include <atomic>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::ostringstream msg;
    msg << "[mlx_tuner] " << what << ": " << cudaGetErrorString(err);
    throw std::runtime_error(msg.str());
  }
}

CUfunction kernel_handle(const void* kernel, int device) {
  static std::mutex mu;
  static std::unordered_map<const void*, std::unordered_map<int, CUfunction>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& per_device = cache[kernel];
  if (auto it = per_device.find(device); it != per_device.end()) {
    return it->second;
  }
  cudaFunction_t f = nullptr;
  check(cudaSetDevice(device), "cudaSetDevice");
  check(cudaGetFuncBySymbol(&f, kernel), "cudaGetFuncBySymbol");
  auto handle = reinterpret_cast<CUfunction>(f);
  per_device.emplace(device, handle);
  return handle;
}

namespace {

// MLX's memory counters do not see malloc_device; these do (benchmarks add them up).
std::atomic<size_t> live_bytes{0};
std::atomic<size_t> peak_bytes{0};

void count_alloc(size_t n) {
  size_t now = live_bytes.fetch_add(n) + n;
  size_t peak = peak_bytes.load();
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now)) {
  }
}

void free_device(mx::allocator::Buffer b) {
  auto* buf = static_cast<mx::cu::CudaBuffer*>(b.ptr());
  if (buf == nullptr) {
    return;
  }
  live_bytes.fetch_sub(buf->size);
  if (buf->data != nullptr) {
    if (buf->device >= 0) {
      cudaFreeAsync(buf->data, cudaStreamPerThread);
    } else {
      // A host read (Buffer::raw_ptr) moved the data to host-visible memory.
      cudaPointerAttributes attr{};
      if (cudaPointerGetAttributes(&attr, buf->data) == cudaSuccess &&
          attr.type == cudaMemoryTypeHost) {
        cudaFreeHost(buf->data);
      } else {
        cudaFree(buf->data);
      }
    }
  }
  delete buf;
}

} // namespace

mx::allocator::Data malloc_device(size_t nbytes, mx::cu::CommandEncoder& enc) {
  void* ptr = nullptr;
  int device = enc.device().cuda_device();
  if (nbytes > 0) {
    enc.device().make_current();
    check(cudaMallocAsync(&ptr, nbytes, enc.stream()), "cudaMallocAsync");
  }
  auto* buf = new mx::cu::CudaBuffer{ptr, nbytes, device};
  count_alloc(nbytes);
  return mx::allocator::Data(mx::allocator::Buffer(buf), free_device);
}

std::pair<size_t, size_t> extra_memory() {
  return {live_bytes.load(), peak_bytes.load()};
}

void reset_extra_peak() {
  peak_bytes.store(live_bytes.load());
}

} // namespace mlx_tuner::cuda
