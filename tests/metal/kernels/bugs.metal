// Planted bugs, each of which the emulator must catch (tests/metal/test_emulator.py).
#include <metal_stdlib>
using namespace metal;

// Row log-sum-exp in two threadgroup stages that re-use `shared`. With BARRIER=false the
// second stage overwrites shared[] while other simdgroups may still read the maxima:
// the write-after-read race that was found in mlx-lm's KL kernel.
template <bool BARRIER>
[[kernel]] void row_lse(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant int& n [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float shared[32];
  if (lid < 32) {
    shared[lid] = -INFINITY;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  x += row * n;
  float m = -INFINITY;
  for (int i = lid; i < n; i += tpg) {
    m = max(m, x[i]);
  }
  m = simd_max(m);
  if (lane == 0) {
    shared[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  m = simd_max(shared[lane]);
  if (BARRIER) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (lid < 32) {
    shared[lid] = 0;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float s = 0;
  for (int i = lid; i < n; i += tpg) {
    s += exp(x[i] - m);
  }
  s = simd_sum(s);
  if (lane == 0) {
    shared[sg] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  s = simd_sum(shared[lane]);
  if (lid == 0) {
    out[row] = m + log(s);
  }
}
template [[host_name("row_lse_fixed")]] [[kernel]] decltype(row_lse<true>) row_lse<true>;
template [[host_name("row_lse_racy")]] [[kernel]] decltype(row_lse<false>) row_lse<false>;

// Wrong index: the position in the threadgroup instead of the grid.
[[kernel]] void copy_wrong_index(
    device const float* x [[buffer(0)]],
    device float* y [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]]) {
  y[tid] = x[gid];
}

// Out-of-bounds read: the neighbour of the last element.
[[kernel]] void diff_oob_read(
    device const float* x [[buffer(0)]],
    device float* y [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid < n) {
    y[gid] = x[gid + 1] - x[gid];
  }
}

// Out-of-bounds write: no bounds check although the grid is rounded up.
[[kernel]] void fill_oob_write(
    device float* y [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  y[gid] = 1.0f;
}

// Out-of-bounds threadgroup read: one past the end of `tile`.
[[kernel]] void tile_oob_read(
    device const float* x [[buffer(0)]],
    device float* y [[buffer(1)]],
    uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  tile[lid] = x[lid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = tile[lid + 1];
}

// Reads threadgroup memory no lane wrote: poisoned (NaN).
[[kernel]] void uninitialised_tile(
    device float* y [[buffer(0)]],
    uint lid [[thread_index_in_threadgroup]]) {
  threadgroup float tile[64];
  if (lid < 32) {
    tile[lid] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  y[lid] = tile[lid];
}
