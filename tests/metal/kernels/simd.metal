// Every simd_* function, written out per lane for test_emulator.py to check with numpy.
#include <metal_stdlib>
using namespace metal;

[[kernel]] void simd_ops(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    device uint* votes [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint n [[threads_per_grid]],
    ushort lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  int iv = int(v);
  int k = 0;
  out[n * k++ + gid] = simd_sum(v);
  out[n * k++ + gid] = simd_max(v);
  out[n * k++ + gid] = simd_min(v);
  out[n * k++ + gid] = simd_product(v);
  out[n * k++ + gid] = simd_prefix_inclusive_sum(v);
  out[n * k++ + gid] = simd_prefix_exclusive_sum(v);
  out[n * k++ + gid] = simd_prefix_inclusive_product(v);
  out[n * k++ + gid] = simd_prefix_exclusive_product(v);
  out[n * k++ + gid] = simd_shuffle(v, (lane * 7) % 32);
  out[n * k++ + gid] = simd_shuffle_xor(v, 5);
  out[n * k++ + gid] = simd_shuffle_down(v, 3);
  out[n * k++ + gid] = simd_shuffle_up(v, 3);
  out[n * k++ + gid] = simd_shuffle_rotate_down(v, 3);
  out[n * k++ + gid] = simd_shuffle_rotate_up(v, 3);
  out[n * k++ + gid] = simd_broadcast(v, 9);
  out[n * k++ + gid] = simd_broadcast_first(v);
  out[n * k++ + gid] = float(simd_and(iv));
  out[n * k++ + gid] = float(simd_or(iv));
  out[n * k++ + gid] = float(simd_xor(iv));
  float4 w = simd_sum(float4(v, 2 * v, 1.0f, -v));
  out[n * k++ + gid] = w.x + 10 * w.y + 100 * w.z + 1000 * w.w;
  out[n * k++ + gid] = float(simd_sum(half(v)));
  out[n * k++ + gid] = float(simd_sum(bfloat(v)));
  votes[gid * 3 + 0] = uint(uint64_t(simd_ballot(v > 2.0f)));
  votes[gid * 3 + 1] = simd_all(v >= 0.0f) ? 1 : 0;
  votes[gid * 3 + 2] = simd_any(v > 3.5f) ? 1 : 0;
}

// D = A * B + C on 8x8 tiles, one simdgroup; A, B of type T, C and D float.
template <typename T>
[[kernel]] void mma8(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device const float* c [[buffer(2)]],
    device float* d [[buffer(3)]],
    ushort lane [[thread_index_in_simdgroup]]) {
  threadgroup T tile_b[64];
  for (int i = lane; i < 64; i += 32) {
    tile_b[i] = b[i];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> ma, mb;
  simdgroup_matrix<float, 8, 8> mc, md;
  simdgroup_load(ma, a, 8);
  simdgroup_load(mb, tile_b, 8);
  simdgroup_load(mc, c, 8, ulong2(0, 0), true);  // C transposed
  simdgroup_multiply_accumulate(md, ma, mb, mc);
  simdgroup_store(md, d, 8);
}
template [[host_name("mma8_float32")]] [[kernel]] decltype(mma8<float>) mma8<float>;
template [[host_name("mma8_float16")]] [[kernel]] decltype(mma8<half>) mma8<half>;

// Atomics: a histogram of x into 8 bins.
[[kernel]] void histogram(
    device const uint* x [[buffer(0)]],
    device atomic_uint* bins [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(&bins[x[gid] % 8], 1u, memory_order_relaxed);
}
