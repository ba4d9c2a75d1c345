#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <string>
#include <mutex>
#include <stdexcept>
#include <unordered_map>

#include "backend/cuda/common.cuh"

namespace mlx_tuner::cuda {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("[mlx_tuner] ") + what + ": " + cudaGetErrorString(err));
  }
}

int sm_count(mx::cu::CommandEncoder& enc) {
  static std::mutex mu;
  static std::unordered_map<int, int> counts; // per device
  int device = enc.device().cuda_device();
  std::lock_guard<std::mutex> lock(mu);
  auto it = counts.find(device);
  if (it == counts.end()) {
    int c = 0;
    check(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, device),
          "cudaDeviceGetAttribute");
    it = counts.emplace(device, c).first;
  }
  return it->second;
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

void allow_launch(const void* kernel, int device, unsigned smem, bool big_cluster) {
  if (smem <= 48 * 1024 && !big_cluster) return;
  static std::mutex mu;
  // (kernel, device) -> (largest smem set, big clusters allowed)
  static std::map<std::pair<const void*, int>, std::pair<unsigned, bool>> done;
  std::lock_guard<std::mutex> lock(mu);
  auto& d = done[{kernel, device}];
  bool more_smem = smem > 48 * 1024 && smem > d.first, cluster = big_cluster && !d.second;
  if (!more_smem && !cluster) return;
  check(cudaSetDevice(device), "cudaSetDevice");
  if (more_smem) {
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
          "cudaFuncSetAttribute");
    d.first = smem;
  }
  if (cluster) { // 8 is the portable maximum
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "cudaFuncSetAttribute");
    d.second = true;
  }
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

// Freed buffers kept for reuse, as MLX's allocator keeps its own. Without it every output
// was a fresh cudaMallocAsync, and the default pool (release threshold 0) hands its memory
// back at each synchronize, so the next call mapped it again: a fixed cost per call that
// dwarfed the small GEMMs. A buffer reaches free_device only once the GPU work that used
// it is done (MLX holds a primitive's inputs and siblings until its work completes, and
// alloc_output / scratch hold the rest), so reuse is safe.
// MLX_TUNER_CUDA_CACHE=0 turns it off; MLX_TUNER_CUDA_CACHE_MB caps it (default: 1/16
// of the device memory); on a failed allocation the cache is emptied and the call retried.
struct BufferCache {
  std::mutex mu;
  std::multimap<std::pair<int, size_t>, void*> free; // by (device, rounded size)
  size_t bytes = 0;
  size_t limit = 0;
  bool on = true;
  bool configured = false;
};

BufferCache& cache() {
  static auto* c = new BufferCache; // never destroyed: CUDA may be gone at exit
  return *c;
}

// Sizes are rounded so that buffers of nearly equal size share a bucket.
size_t rounded(size_t n) {
  constexpr size_t kSmall = size_t(64) << 10, kLarge = size_t(2) << 20;
  size_t q = n < (size_t(32) << 20) ? kSmall : kLarge;
  return (n + q - 1) / q * q;
}

void configure(BufferCache& c, int device) {
  if (c.configured) return;
  c.configured = true;
  const char* on = std::getenv("MLX_TUNER_CUDA_CACHE");
  c.on = on == nullptr || std::string(on) != "0";
  const char* mb = std::getenv("MLX_TUNER_CUDA_CACHE_MB");
  if (mb != nullptr && mb[0] != '\0') {
    c.limit = size_t(std::atoll(mb)) << 20;
  } else {
    cudaDeviceProp prop{};
    c.limit = cudaGetDeviceProperties(&prop, device) == cudaSuccess ? prop.totalGlobalMem / 16
                                                                    : size_t(1) << 30;
  }
}

// Cached buffers came from cudaMallocAsync and go back the same way. cudaFree on them left
// the default pool's bytes in use unchanged on the H200 (4.1 GB after one TinyLlama run:
// the whole cache), so a process grew by a cache's worth with every clear. The wait makes
// the memory reusable from any stream before the caller allocates again.
void give_back(void* ptr) {
  if (cudaFreeAsync(ptr, cudaStreamPerThread) != cudaSuccess) cudaGetLastError();
}

void release_all(BufferCache& c) { // caller holds c.mu
  if (c.free.empty()) return;
  for (auto& [key, ptr] : c.free) give_back(ptr);
  c.free.clear();
  c.bytes = 0;
  cudaStreamSynchronize(cudaStreamPerThread);
}

void free_device(mx::allocator::Buffer b) {
  auto* buf = static_cast<mx::cu::CudaBuffer*>(b.ptr());
  if (buf == nullptr) {
    return;
  }
  live_bytes.fetch_sub(buf->size);
  if (buf->data != nullptr) {
    if (buf->device >= 0) {
      auto& c = cache();
      std::unique_lock<std::mutex> lk(c.mu);
      if (c.on && c.bytes + buf->size <= c.limit) {
        c.free.emplace(std::make_pair(buf->device, buf->size), buf->data);
        c.bytes += buf->size;
      } else {
        lk.unlock();
        give_back(buf->data);
      }
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
  if (in_gemm_batch()) { // the capture would record the allocation into the graph
    throw std::logic_error("[mlx_tuner] a buffer allocated inside a GemmBatch");
  }
  void* ptr = nullptr;
  int device = enc.device().cuda_device();
  size_t size = nbytes > 0 ? rounded(nbytes) : 0;
  if (size > 0) {
    auto& c = cache();
    {
      std::lock_guard<std::mutex> lk(c.mu);
      configure(c, device);
      auto it = c.free.find({device, size});
      if (it != c.free.end()) {
        ptr = it->second;
        c.free.erase(it);
        c.bytes -= size;
      }
    }
    if (ptr == nullptr) {
      enc.device().make_current();
      if (cudaMallocAsync(&ptr, size, enc.stream()) != cudaSuccess) {
        cudaGetLastError(); // out of memory: give the cached buffers back and retry once
        std::lock_guard<std::mutex> lk(c.mu);
        release_all(c);
        check(cudaMallocAsync(&ptr, size, enc.stream()), "cudaMallocAsync");
      }
    }
  }
  auto* buf = new mx::cu::CudaBuffer{ptr, size, device};
  count_alloc(size);
  return mx::allocator::Data(mx::allocator::Buffer(buf), free_device);
}

void add_cluster_node(
    mx::cu::CommandEncoder& enc,
    const void* kernel,
    dim3 grid,
    dim3 block,
    dim3 cluster,
    unsigned smem,
    void** params) {
  enc.device().make_current();
  cudaGraph_t child = nullptr;
  check(cudaGraphCreate(&child, 0), "cudaGraphCreate");
  try {
    cudaKernelNodeParams p{};
    p.func = const_cast<void*>(kernel);
    p.gridDim = grid;
    p.blockDim = block;
    p.sharedMemBytes = smem;
    p.kernelParams = params;
    cudaGraphNode_t node = nullptr;
    check(cudaGraphAddKernelNode(&node, child, nullptr, 0, &p), "cudaGraphAddKernelNode");
    cudaLaunchAttributeValue attr{};
    attr.clusterDim.x = cluster.x;
    attr.clusterDim.y = cluster.y;
    attr.clusterDim.z = cluster.z;
    check(cudaGraphKernelNodeSetAttribute(node, cudaLaunchAttributeClusterDimension, &attr),
          "cudaGraphKernelNodeSetAttribute");
    enc.add_graph_node(child); // MLX clones the child graph
  } catch (...) {
    cudaGraphDestroy(child);
    throw;
  }
  cudaGraphDestroy(child);
}

namespace {

bool host_times_on() {
  static const bool on = [] {
    const char* e = std::getenv("MLX_TUNER_CUDA_HOST_TIMES");
    return e != nullptr && std::string(e) == "1";
  }();
  return on;
}

long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct HostTimes {
  std::mutex mu;
  std::map<std::string, std::pair<long long, long long>> by_name; // ns, calls
};

HostTimes& times() {
  static auto* t = new HostTimes;
  return *t;
}

} // namespace

HostTimer::HostTimer(const char* name) : name_(name), t0_ns_(host_times_on() ? now_ns() : 0) {}

HostTimer::~HostTimer() {
  if (t0_ns_ == 0) return;
  long long dt = now_ns() - t0_ns_;
  auto& t = times();
  std::lock_guard<std::mutex> lk(t.mu);
  auto& v = t.by_name[name_];
  v.first += dt;
  v.second += 1;
}

std::vector<std::tuple<std::string, double, long long>> host_times(bool reset) {
  auto& t = times();
  std::lock_guard<std::mutex> lk(t.mu);
  std::vector<std::tuple<std::string, double, long long>> out;
  for (auto& [name, v] : t.by_name) out.emplace_back(name, v.first / 1e3, v.second);
  if (reset) t.by_name.clear();
  return out;
}

size_t cached_memory() {
  auto& c = cache();
  std::lock_guard<std::mutex> lk(c.mu);
  return c.bytes;
}

void clear_cache() {
  auto& c = cache();
  std::lock_guard<std::mutex> lk(c.mu);
  release_all(c);
}

size_t set_cache_limit(size_t bytes) {
  auto& c = cache();
  std::lock_guard<std::mutex> lk(c.mu);
  int device = 0;
  cudaGetDevice(&device);
  configure(c, device);
  size_t old = c.limit;
  c.limit = bytes;
  bool gave = false;
  while (c.bytes > c.limit && !c.free.empty()) {
    auto it = c.free.begin();
    give_back(it->second);
    c.bytes -= it->first.second;
    c.free.erase(it);
    gave = true;
  }
  if (gave) cudaStreamSynchronize(cudaStreamPerThread);
  return old;
}

std::pair<size_t, size_t> pool_usage(bool reset_high) {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  cudaMemPool_t pool;
  check(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool");
  if (reset_high) {
    cuuint64_t zero = 0;
    check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero), "reset UsedMemHigh");
  }
  cuuint64_t used = 0, high = 0;
  check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used), "UsedMemCurrent");
  check(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high), "UsedMemHigh");
  return {size_t(used), size_t(high)};
}

std::pair<size_t, size_t> extra_memory() {
  return {live_bytes.load(), peak_bytes.load()};
}

void reset_extra_peak() {
  peak_bytes.store(live_bytes.load());
}

} // namespace mlx_tuner::cuda
