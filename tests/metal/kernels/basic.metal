// Small correct kernels: copy/scale with every position attribute, a threadgroup
// reduction with barriers, and the simd_* functions checked against numpy.
#include <metal_stdlib>
using namespace metal;

template <typename T>
[[kernel]] void scale(
    device const T* x [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant float& alpha [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid < n) {
    y[gid] = static_cast<T>(alpha * static_cast<float>(x[gid]));
  }
}
template [[host_name("scale_float32")]] [[kernel]] decltype(scale<float>) scale<float>;
template [[host_name("scale_float16")]] [[kernel]] decltype(scale<half>) scale<half>;
template [[host_name("scale_bfloat16")]] [[kernel]] decltype(scale<bfloat>) scale<bfloat>;

// Row sums: one threadgroup per row, simd_sum then a threadgroup stage.
[[kernel]] void row_sum(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant int& n [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint lid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float s = 0;
  for (int i = lid; i < n; i += tpg) {
    s += x[row * n + i];
  }
  s = simd_sum(s);
  if (lane == 0) {
    partial[sg] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    s = simd_sum(lane < nsg ? partial[lane] : 0.0f);
    if (lane == 0) {
      out[row] = s;
    }
  }
}

// Every position attribute, written out per thread.
[[kernel]] void positions(
    device uint* out [[buffer(0)]],
    uint3 gid [[thread_position_in_grid]],
    uint3 tid [[thread_position_in_threadgroup]],
    uint3 tgid [[threadgroup_position_in_grid]],
    uint3 tpg [[threads_per_threadgroup]],
    uint3 grid [[threads_per_grid]],
    uint3 ntg [[threadgroups_per_grid]],
    uint lid [[thread_index_in_threadgroup]],
    ushort lane [[thread_index_in_simdgroup]],
    ushort sg [[simdgroup_index_in_threadgroup]]) {
  uint flat = (gid.z * grid.y + gid.y) * grid.x + gid.x;
  device uint* o = out + flat * 12;
  o[0] = gid.x; o[1] = gid.y; o[2] = gid.z;
  o[3] = tid.x; o[4] = tid.y; o[5] = tid.z;
  o[6] = tgid.x + 100 * tgid.y + 10000 * tgid.z;
  o[7] = tpg.x * tpg.y * tpg.z;
  o[8] = ntg.x * ntg.y * ntg.z;
  o[9] = lid;
  o[10] = lane;
  o[11] = sg;
}
