// The rank-r products of the LoRA family (lowrank.cuh): project (x M), expand (p M into a
// wide output) and reduce (x^T g over the rows). Each is FFMA with float32 accumulation,
// bound by the one wide operand it streams (x, dy or y: n * width elements); the small
// matrices are turned into float32 once per block, in shared memory or registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>

#include "backend/cuda/gemm.cuh"
#include "backend/cuda/lowrank.cuh"

namespace mlx_tuner::cuda {

namespace {

// The dtypes a small matrix or an output may have, chosen at run time: they are read or
// written a few times per block, not per multiply.
enum Dt : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

Dt dt_of(const mx::array& a, const char* what) {
  switch (a.dtype()) {
    case mx::float32: return kF32;
    case mx::float16: return kF16;
    case mx::bfloat16: return kBF16;
    default: throw std::invalid_argument(std::string("[lowrank] ") + what + " must be a float dtype");
  }
}

__device__ inline void st(void* p, long i, int dt, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = __float2half(v);
  else static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
}

__device__ inline float to_f(float v) { return v; }
__device__ inline float to_f(__half v) { return __half2float(v); }
__device__ inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ inline T from_f(float v) { return static_cast<T>(v); }
template <>
__device__ inline __half from_f<__half>(float v) { return __float2half(v); }
template <>
__device__ inline __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Four consecutive elements, loaded or stored as one vector when aligned.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// Loads n values of a small matrix as float32, all issued before any is used: the
// dtype branch is taken once, outside the unrolled loop, so that the loads are
// independent (a branch per element serializes them on their latency).
template <typename TM, int N, typename Idx>
__device__ inline void gather_as(const void* m, float (&v)[N], Idx&& idx) {
  const TM* p = static_cast<const TM*>(m);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    long o = idx(i);
    v[i] = o >= 0 ? to_f(p[o]) : 0.0f;
  }
}
template <int N, typename Idx>
__device__ inline void gather(const void* m, int dt, float (&v)[N], Idx&& idx) {
  if (dt == kF32) gather_as<float>(m, v, idx);
  else if (dt == kF16) gather_as<__half>(m, v, idx);
  else gather_as<__nv_bfloat16>(m, v, idx);
}

// ---- project: c[row, j] = s sum_k x[row, k] M[k, j] ----------------------------------
// One lane per row and eight warps per block, each warp a different slice of every
// chunk of k (a lane reads one 64-byte run of its row per chunk: 4 loads of V
// elements; 8 would need more registers than a thread has once the next chunk is
// prefetched). The chunk of M sits in shared memory as float32, [k][j], and every lane of a
// warp reads the same k at a time: broadcast reads. The next chunk's x and M are loaded
// while this one is computed. The eight slices' partial sums meet in shared memory.
constexpr int kProjWarps = 8, kProjThreads = kProjWarps * 32, kProjVecs = 4;

template <typename T, int R, int V>
__global__ void __launch_bounds__(kProjThreads)
project_kernel(const T* x, const void* m, int mdt, long msk, long msj, void* c, int cdt,
               int n, int k, int r, float s) {
  constexpr int KW = kProjVecs * V;     // k per warp per chunk
  constexpr int KC = kProjWarps * KW;   // k per chunk
  constexpr int SM = (KC > kProjThreads ? KC : kProjThreads) * R;
  constexpr int PER = KC * R / kProjThreads; // M values staged per thread per chunk
  __shared__ __align__(16) float sm[SM];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int row = blockIdx.x * 32 + lane;
  bool live = row < n;
  const T* xr = x + (long)(live ? row : 0) * k;
  // Staging order follows M's unit stride (A: j fastest; B^T: k fastest) so that
  // neighbouring threads read neighbouring elements.
  bool kfast = msk == 1 && msj != 1;
  auto m_index = [&](int k0) {
    return [=](int p) -> long {
      int i = p * kProjThreads + threadIdx.x;
      int kk = kfast ? i % KC : i / R, j = kfast ? i / KC : i % R;
      return (k0 + kk < k && j < r) ? (k0 + kk) * msk + j * msj : -1;
    };
  };
  auto load_x = [&](int kb, T (&xv)[KW]) {
    if (!live || kb >= k) return;
    if (V > 1 && kb + KW <= k) {
#pragma unroll
      for (int v = 0; v < kProjVecs; ++v) {
        *reinterpret_cast<uint4*>(&xv[v * V]) = *reinterpret_cast<const uint4*>(xr + kb + v * V);
      }
    } else {
#pragma unroll
      for (int e = 0; e < KW; ++e) xv[e] = kb + e < k ? xr[kb + e] : from_f<T>(0.0f);
    }
  };
  float acc[R];
#pragma unroll
  for (int j = 0; j < R; ++j) acc[j] = 0.0f;
  float mv[PER];
  T xv[KW], xn[KW];
  gather(m, mdt, mv, m_index(0));
  load_x(warp * KW, xn);
  for (int k0 = 0; k0 < k; k0 += KC) {
    __syncthreads();
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      int i = p * kProjThreads + threadIdx.x;
      int kk = kfast ? i % KC : i / R, j = kfast ? i / KC : i % R;
      sm[kk * R + j] = mv[p];
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < KW; ++e) xv[e] = xn[e];
    int kb = k0 + warp * KW;
    if (k0 + KC < k) { // the next chunk's loads, in flight during this chunk's FFMAs
      gather(m, mdt, mv, m_index(k0 + KC));
      load_x(kb + KC, xn);
    }
    if (!live || kb >= k) continue;
    const float* ms = sm + warp * KW * R;
#pragma unroll
    for (int e = 0; e < KW; ++e) {
      float xe = kb + e < k ? to_f(xv[e]) : 0.0f;
#pragma unroll
      for (int j = 0; j < R; j += 4) {
        float4 w = *reinterpret_cast<const float4*>(ms + e * R + j);
        acc[j] += xe * w.x;
        acc[j + 1] += xe * w.y;
        acc[j + 2] += xe * w.z;
        acc[j + 3] += xe * w.w;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < R; ++j) sm[(warp * R + j) * 32 + lane] = acc[j];
  __syncthreads();
  for (int o = threadIdx.x; o < 32 * R; o += kProjThreads) {
    int l = o % 32, j = o / 32;
    int rr = blockIdx.x * 32 + l;
    if (rr >= n || j >= r) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kProjWarps; ++w) sum += sm[(w * R + j) * 32 + l];
    st(c, (long)rr * r + j, cdt, s * sum);
  }
}

// ---- expand: y[row, col] = s sum_j p[row, j] M[j, col] (+ bias[col]) -----------------
// Each thread owns 4 consecutive columns and keeps their M (R x 4, float32) in registers;
// a block walks 64 rows of p (in shared memory as float32: broadcast reads) and writes
// each row's 4 outputs as one vector.
constexpr int kExpThreads = 256, kExpRows = 64;

template <typename T, int R>
__global__ void __launch_bounds__(kExpThreads)
expand_kernel(const T* p, const void* m, int mdt, long msj, long msc, const void* bias,
              int bdt, T* y, int n, int cols, int r, float s, bool vec) {
  __shared__ __align__(16) float ps[kExpRows * R];
  int c0 = (blockIdx.x * kExpThreads + threadIdx.x) * 4;
  int r0 = blockIdx.y * kExpRows;
  constexpr int PT = kExpRows * R / kExpThreads;
  float pv[PT];
#pragma unroll
  for (int q = 0; q < PT; ++q) {
    int i = q * kExpThreads + threadIdx.x, rr = r0 + i / R, j = i % R;
    pv[q] = (rr < n && j < r) ? to_f(p[(long)rr * r + j]) : 0.0f;
  }
  float mv[R * 4], bb[4];
  gather(m, mdt, mv, [=](int i) -> long {
    int j = i / 4, q = i % 4;
    return (c0 + q < cols && j < r) ? j * msj + (c0 + q) * msc : -1;
  });
  if (bias != nullptr) {
    gather(bias, bdt, bb, [=](int q) -> long { return c0 + q < cols ? c0 + q : -1; });
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) bb[q] = 0.0f;
  }
#pragma unroll
  for (int q = 0; q < PT; ++q) ps[q * kExpThreads + threadIdx.x] = pv[q];
  __syncthreads();
  if (c0 >= cols) return;
  int rows = min(kExpRows, n - r0);
  for (int i = 0; i < rows; ++i) {
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < R; j += 4) {
      float4 v = *reinterpret_cast<const float4*>(ps + i * R + j);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        o[q] += v.x * mv[j * 4 + q] + v.y * mv[(j + 1) * 4 + q] + v.z * mv[(j + 2) * 4 + q] +
                v.w * mv[(j + 3) * 4 + q];
      }
    }
    T* yr = y + (long)(r0 + i) * cols + c0;
    if (vec && c0 + 4 <= cols) {
      Quad<T> qv;
#pragma unroll
      for (int q = 0; q < 4; ++q) qv.v[q] = from_f<T>(s * o[q] + bb[q]);
      *reinterpret_cast<Quad<T>*>(yr) = qv;
    } else {
      for (int q = 0; q < 4 && c0 + q < cols; ++q) yr[q] = from_f<T>(s * o[q] + bb[q]);
    }
  }
}

// ---- reduce: d[i, j] = s sum_row x[row, i] g[row, j] ----------------------------------
// Pass 1: a block owns 4 columns of x per thread (512 per block) and one slice of at most
// kRedRows rows, whose g sits in shared memory as float32 (broadcast reads); the next 8
// rows of x are loaded while 8 are computed. The block writes its partial sums,
// part[slice][i][j] (float32, j padded to R). Pass 2 sums the slices in a fixed order
// (no atomics: the same inputs give the same bits) and writes d.
constexpr int kRedThreads = 128, kRedRows = 256, kRedUnroll = 8;

struct RedJob {
  const void* x;
  const void* g;
  float* part;
  int k;
};
struct RedJobs {
  RedJob j[2];
};

template <typename T, int R>
__global__ void __launch_bounds__(kRedThreads)
reduce_kernel(RedJobs jobs, int n, int r, int slice_rows, bool vec) {
  // A select, not an index: a dynamic index would copy the parameters to local memory.
  const RedJob job = blockIdx.z == 0 ? jobs.j[0] : jobs.j[1];
  const T* x = static_cast<const T*>(job.x);
  const T* g = static_cast<const T*>(job.g);
  int k = job.k;
  int c0 = (blockIdx.x * kRedThreads + threadIdx.x) * 4;
  if (blockIdx.x * kRedThreads * 4 >= k) return; // the other job is wider: whole block idle
  __shared__ __align__(16) float gs[kRedRows * R];
  int row_begin = blockIdx.y * slice_rows, rows = min(slice_rows, n - row_begin);
  for (int i = threadIdx.x; i < rows * R; i += kRedThreads) {
    int j = i % R;
    gs[i] = j < r ? to_f(g[(long)(row_begin + i / R) * r + j]) : 0.0f;
  }
  __syncthreads();
  if (c0 >= k) return;
  bool quad = vec && c0 + 4 <= k;
  auto load = [&](int i0, Quad<T> (&v)[kRedUnroll]) {
#pragma unroll
    for (int u = 0; u < kRedUnroll; ++u) {
      const T* xr = x + (long)(row_begin + i0 + u) * k + c0;
      if (i0 + u >= rows) {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[u].v[q] = from_f<T>(0.0f);
      } else if (quad) {
        v[u] = *reinterpret_cast<const Quad<T>*>(xr);
      } else {
#pragma unroll
        for (int q = 0; q < 4; ++q) v[u].v[q] = c0 + q < k ? xr[q] : from_f<T>(0.0f);
      }
    }
  };
  float acc[4][R];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int j = 0; j < R; ++j) acc[q][j] = 0.0f;
  Quad<T> cur[kRedUnroll], nxt[kRedUnroll];
  load(0, nxt);
  for (int i0 = 0; i0 < rows; i0 += kRedUnroll) {
#pragma unroll
    for (int u = 0; u < kRedUnroll; ++u) cur[u] = nxt[u];
    if (i0 + kRedUnroll < rows) load(i0 + kRedUnroll, nxt);
#pragma unroll
    for (int u = 0; u < kRedUnroll; ++u) {
      float xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = to_f(cur[u].v[q]);
      int i = min(i0 + u, rows - 1); // rows past the end hold zeros in cur
#pragma unroll
      for (int j = 0; j < R; j += 4) {
        float4 gv = *reinterpret_cast<const float4*>(gs + i * R + j);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[q][j] += xv[q] * gv.x;
          acc[q][j + 1] += xv[q] * gv.y;
          acc[q][j + 2] += xv[q] * gv.z;
          acc[q][j + 3] += xv[q] * gv.w;
        }
      }
    }
  }
  float* out = job.part + ((long)blockIdx.y * k + c0) * R;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (c0 + q >= k) break;
#pragma unroll
    for (int j = 0; j < R; j += 4) {
      *reinterpret_cast<float4*>(out + q * R + j) =
          make_float4(acc[q][j], acc[q][j + 1], acc[q][j + 2], acc[q][j + 3]);
    }
  }
}

struct FinJob {
  const float* part;
  void* d;
  int k, dt;
  long di, dj;
  float s;
};
struct FinJobs {
  FinJob j[2];
};

template <int R>
__global__ void finish_kernel(FinJobs jobs, int r, int slices) {
  const FinJob job = blockIdx.y == 0 ? jobs.j[0] : jobs.j[1];
  long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (idx >= (long)job.k * r) return;
  int i = int(idx / r), j = int(idx % r);
  float sum = 0.0f;
  for (int sl = 0; sl < slices; ++sl) sum += job.part[((long)sl * job.k + i) * R + j];
  st(job.d, i * job.di + j * job.dj, job.dt, job.s * sum);
}

int sm_count(mx::cu::CommandEncoder& enc) {
  static int count = [&] {
    int c = 0;
    check(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, enc.device().cuda_device()),
          "cudaDeviceGetAttribute");
    return c;
  }();
  return count;
}

// A packed row-major array as (rows, width): its last dimension is the width.
int width(const mx::array& a) { return a.ndim() ? a.shape(-1) : 1; }
int rows(const mx::array& a) {
  long r = 1;
  for (int i = 0; i + 1 < int(a.ndim()); ++i) r *= a.shape(i);
  return int(r);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename F>
void with_t(mx::Dtype t, F&& f) {
  if (t == mx::float32) f(float{});
  else if (t == mx::float16) f(__half{});
  else if (t == mx::bfloat16) f(__nv_bfloat16{});
  else throw std::invalid_argument("[lowrank] the compute dtype must be a float dtype");
}

template <typename F>
void with_r(int r, F&& f) {
  if (r <= 8) f(std::integral_constant<int, 8>{});
  else f(std::integral_constant<int, 16>{});
}

} // namespace

bool lowrank_fits(int r) {
  static bool on = [] {
    const char* v = std::getenv("MLX_TUNER_LOWRANK");
    return !(v && v[0] == '0');
  }();
  return on && r >= 1 && r <= kLowRankMax;
}

void lowrank_project(mx::cu::CommandEncoder& enc, const mx::array& x, Small m, int r, float s,
                     mx::array& c) {
  int n = rows(x), k = width(x);
  if (n == 0 || r == 0) return;
  reads_writes(enc, {&x, &m.m}, {&c});
  int mdt = dt_of(m.m, "the small matrix"), cdt = dt_of(c, "the output");
  with_t(x.dtype(), [&](auto t) {
    using T = decltype(t);
    constexpr int V = 16 / sizeof(T);
    bool vec = aligned16(gpu_ptr<T>(x)) && (long)k * sizeof(T) % 16 == 0;
    with_r(r, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      const void* kern = vec ? reinterpret_cast<const void*>(&project_kernel<T, R, V>)
                             : reinterpret_cast<const void*>(&project_kernel<T, R, 1>);
      launch(enc, kern, dim3((n + 31) / 32), dim3(kProjWarps * 32), 0, gpu_ptr<T>(x),
             static_cast<const void*>(gpu_ptr<void>(m.m)), mdt, m.si, m.sj,
             gpu_ptr<void>(c), cdt, n, k, r, s);
    });
  });
}

void lowrank_expand(mx::cu::CommandEncoder& enc, const mx::array& p, Small m, float s,
                    const mx::array* bias, mx::array& y) {
  int n = rows(y), cols = width(y), r = width(p);
  if (n == 0 || cols == 0) return;
  reads_writes(enc, {&p, &m.m, bias}, {&y});
  int mdt = dt_of(m.m, "the small matrix");
  int bdt = bias ? dt_of(*bias, "bias") : kF32;
  const void* bptr = bias ? gpu_ptr<void>(*bias) : nullptr;
  with_t(y.dtype(), [&](auto t) {
    using T = decltype(t);
    bool vec = cols % 4 == 0 && reinterpret_cast<uintptr_t>(gpu_ptr<T>(y)) % (4 * sizeof(T)) == 0;
    with_r(r, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      dim3 grid((cols + 4 * kExpThreads - 1) / (4 * kExpThreads), (n + kExpRows - 1) / kExpRows);
      launch(enc, reinterpret_cast<const void*>(&expand_kernel<T, R>), grid, dim3(kExpThreads),
             0, static_cast<const T*>(gpu_ptr<T>(p)), static_cast<const void*>(gpu_ptr<void>(m.m)),
             mdt, m.si, m.sj, bptr, bdt, gpu_ptr<T>(y), n, cols, r, s, vec);
    });
  });
}

void lowrank_reduce(mx::cu::CommandEncoder& enc, std::initializer_list<ReduceJob> jobs) {
  if (jobs.size() == 0) return;
  if (jobs.size() > 2) throw std::logic_error("[lowrank] at most two reduce jobs a launch");
  const ReduceJob& first = *jobs.begin();
  int n = rows(first.x), r = width(first.g);
  auto T = first.x.dtype();
  int max_k = 0;
  for (auto& jb : jobs) {
    if (rows(jb.x) != n || width(jb.g) != r || jb.x.dtype() != T || jb.g.dtype() != T) {
      throw std::logic_error("[lowrank] reduce jobs of one launch must share n, r and dtype");
    }
    max_k = std::max(max_k, width(jb.x));
  }
  if (max_k == 0) return;
  if (n == 0) { // nothing to sum: zeros
    for (auto& jb : jobs) {
      enc.set_output_array(jb.d);
      check(cudaMemsetAsync(gpu_ptr<void>(jb.d), 0, jb.d.nbytes(), enc.stream()), "memset");
    }
    return;
  }
  int col_blocks = (max_k + 4 * kRedThreads - 1) / (4 * kRedThreads);
  // About three blocks per multiprocessor over both jobs, each a slice of at most
  // kRedRows rows (its g must fit in shared memory).
  int want = std::max(1, 3 * sm_count(enc) / (col_blocks * int(jobs.size())));
  int slice_rows = (n + want - 1) / want;
  slice_rows = std::min(kRedRows, (slice_rows + kRedUnroll - 1) / kRedUnroll * kRedUnroll);
  int slices = (n + slice_rows - 1) / slice_rows;
  with_r(r, [&](auto rc) {
    constexpr int R = decltype(rc)::value;
    RedJobs rj{};
    FinJobs fj{};
    std::vector<mx::array> parts;
    int i = 0;
    for (auto& jb : jobs) {
      int k = width(jb.x);
      parts.push_back(scratch(enc, {slices, std::max(k, 1), R}, mx::float32));
      rj.j[i] = {gpu_ptr<void>(jb.x), gpu_ptr<void>(jb.g), gpu_ptr<float>(parts.back()), k};
      fj.j[i] = {gpu_ptr<float>(parts.back()), gpu_ptr<void>(jb.d), k, dt_of(jb.d, "a gradient"),
                 jb.di, jb.dj, jb.s};
      ++i;
    }
    for (auto& jb : jobs) enc.set_input_array(jb.x), enc.set_input_array(jb.g);
    for (auto& p : parts) enc.set_output_array(p);
    bool vec = true;
    for (auto& jb : jobs) {
      vec = vec && width(jb.x) % 4 == 0 &&
            reinterpret_cast<uintptr_t>(gpu_ptr<void>(jb.x)) % (4 * mx::size_of(T)) == 0;
    }
    with_t(T, [&](auto t) {
      using TT = decltype(t);
      launch(enc, reinterpret_cast<const void*>(&reduce_kernel<TT, R>),
             dim3(col_blocks, slices, unsigned(jobs.size())), dim3(kRedThreads), 0, rj, n, r,
             slice_rows, vec);
    });
    for (auto& p : parts) enc.set_input_array(p);
    for (auto& jb : jobs) enc.set_output_array(jb.d);
    long max_elems = (long)max_k * r;
    launch(enc, reinterpret_cast<const void*>(&finish_kernel<R>),
           dim3(unsigned((max_elems + 255) / 256), unsigned(jobs.size())), dim3(256), 0, fj, r,
           slices);
  });
}

} // namespace mlx_tuner::cuda
