// The rank-r products of the LoRA family (lowrank.cuh) on the tensor cores: mma.sync
// m16n8k16 (float16 or bfloat16 operands, float32 accumulators), operands loaded straight
// from global memory into the fragment layout of the PTX ISA (for the 16 x 16 A tile,
// lane = 4 * gid + tig holds rows gid and gid + 8, columns 2 tig, 2 tig + 1 and the same
// plus 8; for the 16 x 8 B tile, rows 2 tig, 2 tig + 1 (+ 8) of column gid; for C,
// rows gid and gid + 8, columns 2 tig, 2 tig + 1). Each kernel streams its one wide
// operand (x, dy or y: n * width elements) once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "backend/cuda/dtype.cuh"
#include "backend/cuda/gemm.cuh"
#include "backend/cuda/lowrank.cuh"
#include "common/quant.h"

namespace mlx_tuner::cuda {

namespace {

// The dtypes a LoRA matrix or an output may have, chosen at run time: the pack and
// finish kernels touch each element once.
enum Dt : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

Dt dt_of(const mx::array& a, const char* what) {
  switch (a.dtype()) {
    case mx::float32: return kF32;
    case mx::float16: return kF16;
    case mx::bfloat16: return kBF16;
    default: throw std::invalid_argument(std::string("[lowrank] ") + what + " must be a float dtype");
  }
}

// Element i of a float32 / float16 / bfloat16 buffer whose dtype is known at run time.
__device__ inline float ld(const void* p, long i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kF16) return to_f(static_cast<const __half*>(p)[i]);
  return to_f(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ inline void st(void* p, long i, int dt, float v) {
  if (dt == kF32) static_cast<float*>(p)[i] = v;
  else if (dt == kF16) static_cast<__half*>(p)[i] = from_f<__half>(v);
  else static_cast<__nv_bfloat16*>(p)[i] = from_f<__nv_bfloat16>(v);
}

// Two 16-bit values as one register, the lower index in the low half (mma's order).
template <typename T>
__device__ inline uint32_t pack2(T lo, T hi) {
  return uint32_t(*reinterpret_cast<const uint16_t*>(&lo)) |
         (uint32_t(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}

__device__ inline uint32_t ld32(const void* p) { return *static_cast<const uint32_t*>(p); }

// c += a b for a 16 x 16 A, a 16 x 8 B, in float32; TY is the PTX name of T.
#define LOWRANK_MMA(TY)                                                                    \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, "             \
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                            \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
template <typename T>
__device__ inline void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    LOWRANK_MMA("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "the tensor-core kernels take fp16 or bf16");
    LOWRANK_MMA("f16");
  }
}
#undef LOWRANK_MMA

constexpr int kWarps = 8, kThreads = kWarps * 32;

// ---- pack: dst[u][v] = src[u * su + v * sv] (zero past ulim, vlim), in T -------------
struct PackJob {
  const void* src;
  int sdt;
  long su, sv;
  int ulim, vlim;
  void* dst;
  int U, V, ld; // dst rows ld elements apart
  float s;
  const float* line; // null, or a scale by v (project operands) or by u (expand operands)
  int line_on_u;
};
struct PackJobs {
  PackJob j[2];
  int* zero; // nzero ints zeroed by block (0, 0): a later reduce's counters
  int nzero;
};

template <typename T>
__global__ void pack_kernel(PackJobs jobs) {
  // A select, not an index: a dynamic index would copy the parameters to local memory.
  const PackJob job = blockIdx.y == 0 ? jobs.j[0] : jobs.j[1];
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    for (int i = threadIdx.x; i < jobs.nzero; i += blockDim.x) jobs.zero[i] = 0;
  }
  long total = (long)job.U * job.V;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
       i += (long)gridDim.x * blockDim.x) {
    int u = int(i / job.V), v = int(i % job.V);
    const bool in = u < job.ulim && v < job.vlim;
    float val = in ? ld(job.src, u * job.su + v * job.sv, job.sdt) : 0.0f;
    if (job.line && in) val *= job.line[job.line_on_u ? u : v];
    static_cast<T*>(job.dst)[(long)u * job.ld + v] = from_f<T>(job.s * val);
  }
}

// Every kernel stages its wide operand through a per-warp 16 x 64 tile in shared memory
// (rows padded to 72 elements: the fragment reads and the 16-byte row accesses are both
// free of bank conflicts), so that global memory sees whole 128-byte row segments: one
// lane per 16 bytes, eight lanes per row.
constexpr int kTile = 64, kPitch = kTile + 8;

// Loads rows [r0, r0 + 16) x columns [c0, c0 + 64) of a row-major (rows < r_end, width
// w, a multiple of 8) matrix as 16-byte vectors, four per lane; zeros outside.
template <typename T>
__device__ inline void load_tile(const T* m, int r0, int r_end, int c0, int w, int lane,
                                 uint4 (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int e = lane + 32 * i, row = r0 + e / 8, col = c0 + (e % 8) * 8;
    v[i] = (row < r_end && col < w) ? *reinterpret_cast<const uint4*>(m + (long)row * w + col)
                                    : make_uint4(0, 0, 0, 0);
  }
}

template <typename T>
__device__ inline void store_tile(T* ts, int lane, const uint4 (&v)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int e = lane + 32 * i;
    *reinterpret_cast<uint4*>(ts + (e / 8) * kPitch + (e % 8) * 8) = v[i];
  }
}

// ---- the norm epilogue of project (DoRA): with M = A packed ([16][k] in T) and x = W,
// the block has P = W A for its 16 rows, and G = Mᵀ M from the same fragments: M's B
// fragment registers of a 16-wide k step are also its A fragment (rows gid, gid + 8 of pk,
// columns 2 tig, 2 tig + 1 and + 8), so two more mma a step make G. Then each of the
// block's rows gets n_i = sqrt(max(c_i + 2 s B_i.P_i + s^2 B_iᵀ G B_i, 0)) and
// rs_i = m_i / n_i (ops/dora.h; inv_norm's maths, G from A rounded to T as P is).
struct NormArgs {
  const float* b; // B (r, out), float32
  const float* c; // ||W_i||^2
  const float* m; // the magnitude
  float* n;       // out: n
  float* rs;      // out: m / n
  float s;
};

// Warp 0, after the block's sums: p and g (16 x 17 floats in shared memory) hold P's rows
// row0 .. row0 + 15 and G.
__device__ inline void norm_rows(const NormArgs& na, const float (*p)[17], const float (*g)[17],
                                 int row0, int rows, int r, int lane) {
  const int row = row0 + lane;
  if (lane >= 16 || row >= rows) return;
  float bc[16];
  float cross = 0.f;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    bc[k] = k < r ? na.b[(size_t)k * rows + row] : 0.f;
    cross += bc[k] * p[lane][k];
  }
  float quad = 0.f;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    float t = 0.f;
#pragma unroll
    for (int l = 0; l < 16; ++l) t += g[k][l] * bc[l];
    quad += bc[k] * t;
  }
  const float n2 = fmaxf(na.c[row] + 2.f * na.s * cross + na.s * na.s * quad, 0.f);
  na.n[row] = sqrtf(n2);
  na.rs[row] = na.m[row] / na.n[row];
}

// G's products for one 16-wide k step from M's fragments b[nt][2] (nt = 0, 1).
template <typename T>
__device__ inline void gram_step(float (&gacc)[2][4], const uint32_t (&b0)[2], const uint32_t (&b1)[2]) {
  const uint32_t a[4] = {b0[0], b1[0], b0[1], b1[1]};
  mma<T>(gacc[0], a, b0);
  mma<T>(gacc[1], a, b1);
}

// Warp 0: the block's sums of P (red) and G (redg) into shared tiles, then norm_rows.
__device__ inline void norm_epilogue(const NormArgs& na, const float (*red)[8][32],
                                     const float (*redg)[8][32], float (*p)[17], float (*g)[17],
                                     int row0, int rows, int r, int lane) {
  const int gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      float sp = 0.f, sg = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        sp += red[w][nt * 4 + q][lane];
        sg += redg[w][nt * 4 + q][lane];
      }
      const int i = gid + (q >= 2 ? 8 : 0), j = nt * 8 + 2 * tig + (q & 1);
      p[i][j] = sp;
      g[i][j] = sg;
    }
  }
  __syncwarp();
  norm_rows(na, p, g, row0, rows, r, lane);
}

// The end of both projects: the warps' partial sums meet in shared memory and warp 0 adds
// them in warp order (the same bits on every run), then runs the norm epilogue (NORM) or
// hands each of P's entries to store(row, j, sum) (rows < n; j up to 8 NT - 1, past r too).
template <int NT, bool NORM, typename Store>
__device__ inline void block_sums(float (*red)[NT * 4][32], float (*redg)[8][32],
                                  float (*ptile)[17], float (*gtile)[17], const float (&acc)[NT][4],
                                  const float (&gacc)[2][4], const NormArgs& na, int row0, int n,
                                  int r, Store store) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      red[warp][nt * 4 + q][lane] = acc[nt][q];
      if constexpr (NORM) redg[warp][nt * 4 + q][lane] = gacc[nt][q];
    }
  __syncthreads();
  if (warp != 0) return;
  if constexpr (NORM) {
    norm_epilogue(na, red, redg, ptile, gtile, row0, n, r, lane);
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += red[w][nt * 4 + q][lane];
        const int row = row0 + gid + (q >= 2 ? 8 : 0), j = nt * 8 + 2 * tig + (q & 1);
        if (row < n) store(row, j, sum);
      }
    }
  }
}

// ---- project: c[row, j] = s sum_k x[row, k] M[k, j] ----------------------------------
// A block owns one 16-row tile; its eight warps take the k tiles of 64 in turn (warp w
// the tiles w, w + 8, ...: at any moment the block reads 512 adjacent columns of each
// row, 1 KB runs, not eight 128-byte pieces 1 KB apart), each accumulating the tile's
// 16 x 16 (NT = 2) or 16 x 8 (NT = 1, r <= 8) product with M packed as [16][k]; the next
// x tile is loaded while this one is multiplied, and the eight partial results meet in
// shared memory. With pad, the result is also written in T into the first 16 columns of
// pad (n, kLowRankPad): the rank tile of lora_gemm, zero past r (its other columns are never
// multiplied).
// With NORM (NT = 2, r <= 16; c and pad unused): the norm epilogue instead of P.
template <typename T, int NT, bool NORM = false>
__global__ void __launch_bounds__(kThreads)
project_kernel(const T* x, const T* pk, void* c, int cdt, int n, int k, int r, float s, T* pad,
               NormArgs norm) {
  static_assert(!NORM || NT == 2);
  __shared__ __align__(16) T xs_all[kWarps][16 * kPitch];
  __shared__ float red[kWarps][NT * 4][32];
  __shared__ float redg[NORM ? kWarps : 1][8][32];
  __shared__ float ptile[NORM ? 16 : 1][17], gtile[NORM ? 16 : 1][17];
  float gacc[2][4] = {};
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  T* xs = xs_all[warp];
  int row0 = blockIdx.x * 16;
  int tiles = (k + kTile - 1) / kTile;
  int count = tiles > warp ? (tiles - warp + kWarps - 1) / kWarps : 0; // this warp's tiles
  auto tile = [&](int i) { return warp + i * kWarps; };
  const T* p0 = pk + (long)gid * k + 2 * tig;
  const T* p1 = pk + (long)(gid + 8) * k + 2 * tig;
  float acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[nt][q] = 0.0f;
  // M's fragments for a tile, loaded one tile ahead of their products like x's tile (their
  // loads waited on L2 once a tile: Nsight, thirteenth session). Past k (a multiple of 16,
  // not of 64) both operands are zero: x's tile is zero-filled there.
  using BFrag = uint32_t[kTile / 16][NT][2];
  auto load_b = [&](int t, BFrag& b) {
#pragma unroll
    for (int q16 = 0; q16 < kTile / 16; ++q16) {
      int kk = t * kTile + q16 * 16;
      bool in = kk < k;
      b[q16][0][0] = in ? ld32(p0 + kk) : 0u;
      b[q16][0][1] = in ? ld32(p0 + kk + 8) : 0u;
      if constexpr (NT == 2) {
        b[q16][NT - 1][0] = in ? ld32(p1 + kk) : 0u;
        b[q16][NT - 1][1] = in ? ld32(p1 + kk + 8) : 0u;
      }
    }
  };
  auto mul = [&](const BFrag& b) {
#pragma unroll
    for (int q16 = 0; q16 < kTile / 16; ++q16) {
      const T* xa = xs + gid * kPitch + q16 * 16 + 2 * tig;
      uint32_t a[4] = {ld32(xa), ld32(xa + 8 * kPitch), ld32(xa + 8), ld32(xa + 8 * kPitch + 8)};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma<T>(acc[nt], a, b[q16][nt]);
      if constexpr (NORM) gram_step<T>(gacc, b[q16][0], b[q16][NT - 1]);
    }
  };
  // Two tiles in flight: a warp walks only a few tiles, so one load's latency per tile
  // would be most of its time.
  uint4 na[4], nb[4];
  BFrag ba, bb;
  if (0 < count) {
    load_tile(x, row0, n, tile(0) * kTile, k, lane, na);
    load_b(tile(0), ba);
  }
  if (1 < count) {
    load_tile(x, row0, n, tile(1) * kTile, k, lane, nb);
    load_b(tile(1), bb);
  }
  for (int i = 0; i < count; i += 2) {
    __syncwarp();
    store_tile(xs, lane, na);
    __syncwarp();
    if (i + 2 < count) load_tile(x, row0, n, tile(i + 2) * kTile, k, lane, na);
    mul(ba);
    if (i + 2 < count) load_b(tile(i + 2), ba);
    if (i + 1 >= count) break;
    __syncwarp();
    store_tile(xs, lane, nb);
    __syncwarp();
    if (i + 3 < count) load_tile(x, row0, n, tile(i + 3) * kTile, k, lane, nb);
    mul(bb);
    if (i + 3 < count) load_b(tile(i + 3), bb);
  }
  block_sums<NT, NORM>(red, redg, ptile, gtile, acc, gacc, norm, row0, n, r,
                       [&](int row, int j, float sum) {
                         if (j < r) st(c, (long)row * r + j, cdt, s * sum);
                         if (pad) pad[(long)row * kLowRankPad + j] = from_f<T>(j < r ? s * sum : 0.0f);
                       });
  if (!NORM && warp == 0 && pad && NT == 1) { // columns 8 to 15 of the GEMM's rank tile: zeros
    for (int e = lane; e < 16 * 8; e += 32) {
      int row = row0 + e / 8;
      if (row < n) pad[(long)row * kLowRankPad + 8 + e % 8] = from_f<T>(0.0f);
    }
  }
}

// ---- project_quant: c[row, j] = sum_k dequant(W)[row, k] M[k, j] ----------------------
// W affine-quantized as mx.quantize lays it out (a little-endian stream of BITS-bit codes
// per row; a scale and a bias in T per group of gs >= 32 columns). As project_kernel, a
// block owns 16 rows and its warps take the 64-column tiles in turn, but the A fragments
// are dequantized from the codes in registers: W never exists dequantized in memory. The
// sum over k may take its terms in any order, so a tile's 64 columns are dealt to the
// mma's k slots by a permutation that gives each lane 16 adjacent codes of its two rows:
// lane tig holds columns 16 tig .. 16 tig + 15, and k step j (of 4) multiplies its columns
// 4j .. 4j + 3, in fragment slots (2 tig, 2 tig + 1) and (2 tig + 8, 2 tig + 9). M's
// fragments follow the same permutation: 16 adjacent elements of pk's row gid (and gid + 8),
// two 16-byte loads. k is a multiple of 32 (of gs), so a lane's 16 columns are all in k or
// all past it, and all in one group. WIDE: the 2 BITS bytes of a lane's codes as one
// aligned load (BITS 2, 4, 8); else byte by byte.
template <int BITS, bool WIDE>
__device__ inline void load_codes(const uint8_t* src, uint64_t (&run)[2]) {
  constexpr uint64_t half = BITS == 8 ? ~uint64_t(0) : (uint64_t(1) << (8 * BITS)) - 1; // 8 codes
  if constexpr (WIDE && BITS == 2) {
    uint32_t v = *reinterpret_cast<const uint32_t*>(src);
    run[0] = v & half;
    run[1] = v >> 16;
  } else if constexpr (WIDE && BITS == 4) {
    uint64_t v = *reinterpret_cast<const unsigned long long*>(src);
    run[0] = v & half;
    run[1] = v >> 32;
  } else if constexpr (WIDE && BITS == 8) {
    uint4 v = *reinterpret_cast<const uint4*>(src);
    run[0] = uint64_t(v.x) | (uint64_t(v.y) << 32);
    run[1] = uint64_t(v.z) | (uint64_t(v.w) << 32);
  } else {
    run[0] = run[1] = 0;
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      run[0] |= uint64_t(src[i]) << (8 * i);
      run[1] |= uint64_t(src[BITS + i]) << (8 * i);
    }
  }
}

// One lane's share of a tile: the codes of its two rows and its 16 columns of M's rows
// gid and gid + 8 (zeros past k or past the last row).
struct QuantFrag {
  uint64_t ra[2], rb[2];
  float sa, ba, sb, bb;
  uint4 m[2][2];
};

// With NORM: the norm epilogue instead of P (c unused).
template <typename T, int BITS, bool WIDE, bool NORM = false>
__global__ void __launch_bounds__(kThreads)
project_quant_kernel(const uint8_t* wq, const T* scales, const T* biases, const T* pk,
                     float* c, int n, int k, int r, int gs, NormArgs na) {
  __shared__ float red[kWarps][8][32];
  __shared__ float redg[NORM ? kWarps : 1][8][32];
  __shared__ float ptile[NORM ? 16 : 1][17], gtile[NORM ? 16 : 1][17];
  float gacc[2][4] = {};
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int row0 = blockIdx.x * 16, ra = row0 + gid, rb = ra + 8;
  const bool va = ra < n, vb = rb < n;
  const long row_bytes = (long)k * BITS / 8;
  const int groups = k / gs;
  const int tiles = (k + kTile - 1) / kTile;
  auto load = [&](int t, QuantFrag& f) {
    const int col = t * kTile + 16 * tig; // this lane's first column
    const bool in = col < k;
    f.ra[0] = f.ra[1] = f.rb[0] = f.rb[1] = 0;
    f.sa = f.ba = f.sb = f.bb = 0.0f;
    if (in && va) {
      load_codes<BITS, WIDE>(wq + ra * row_bytes + (long)col * BITS / 8, f.ra);
      f.sa = to_f(scales[(long)ra * groups + col / gs]);
      f.ba = to_f(biases[(long)ra * groups + col / gs]);
    }
    if (in && vb) {
      load_codes<BITS, WIDE>(wq + rb * row_bytes + (long)col * BITS / 8, f.rb);
      f.sb = to_f(scales[(long)rb * groups + col / gs]);
      f.bb = to_f(biases[(long)rb * groups + col / gs]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const uint4* src = reinterpret_cast<const uint4*>(pk + (long)(gid + 8 * nt) * k + col);
      f.m[nt][0] = in ? src[0] : make_uint4(0, 0, 0, 0);
      f.m[nt][1] = in ? src[1] : make_uint4(0, 0, 0, 0);
    }
  };
  float acc[2][4] = {};
  auto mul = [&](const QuantFrag& f) {
    constexpr uint64_t mask = (uint64_t(1) << BITS) - 1;
    auto deq = [&](const uint64_t (&run)[2], float s, float b, int e) {
      return from_f<T>(fmaf(s, float(uint32_t((run[e / 8] >> ((e % 8) * BITS)) & mask)), b));
    };
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int e = 4 * j;
      uint32_t a[4] = {pack2(deq(f.ra, f.sa, f.ba, e), deq(f.ra, f.sa, f.ba, e + 1)),
                       pack2(deq(f.rb, f.sb, f.bb, e), deq(f.rb, f.sb, f.bb, e + 1)),
                       pack2(deq(f.ra, f.sa, f.ba, e + 2), deq(f.ra, f.sa, f.ba, e + 3)),
                       pack2(deq(f.rb, f.sb, f.bb, e + 2), deq(f.rb, f.sb, f.bb, e + 3))};
      uint32_t b[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const uint4& v = f.m[nt][j / 2]; // words 2j, 2j + 1 of the lane's 16 elements
        b[nt][0] = j % 2 ? v.z : v.x;
        b[nt][1] = j % 2 ? v.w : v.y;
        mma<T>(acc[nt], a, b[nt]);
      }
      if constexpr (NORM) gram_step<T>(gacc, b[0], b[1]); // same permutation both sides
    }
  };
  // Two tiles in flight, as project_kernel.
  QuantFrag fa, fb;
  int t = warp;
  if (t < tiles) load(t, fa);
  if (t + kWarps < tiles) load(t + kWarps, fb);
  for (; t < tiles; t += 2 * kWarps) {
    mul(fa);
    if (t + 2 * kWarps < tiles) load(t + 2 * kWarps, fa);
    if (t + kWarps >= tiles) break;
    mul(fb);
    if (t + 3 * kWarps < tiles) load(t + 3 * kWarps, fb);
  }
  block_sums<2, NORM>(red, redg, ptile, gtile, acc, gacc, na, row0, n, r,
                      [&](int row, int j, float sum) {
                        if (j < r) c[(long)row * r + j] = sum;
                      });
}

// ---- expand: y[row, col] = s sum_j p[row, j] M[j, col] (+ bias[col]) -----------------
// A block owns one 16-row tile of p (one A fragment per warp: r <= 16 is a single k step)
// and kWarps * kExpCols columns, which its warps take 64 at a time in turn (so that the
// block writes 512 adjacent columns of each row at once); M packed as [cols][16]; each
// 16 x 64 result tile is assembled in shared memory and written out as whole row segments.
constexpr int kExpCols = 128, kExpBlockCols = kWarps * kExpCols;

template <typename T>
__global__ void __launch_bounds__(kThreads)
expand_kernel(const T* p, const T* pe, const T* bias, T* y, int n, int cols, int r, float s) {
  __shared__ __align__(16) T ys_all[kWarps][16 * kPitch];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  T* ys = ys_all[warp];
  int spans = (cols + kExpBlockCols - 1) / kExpBlockCols;
  int row0 = int(blockIdx.x / spans) * 16, span0 = int(blockIdx.x % spans) * kExpBlockCols;
  if (row0 >= n) return;
  auto P = [&](int row, int j) -> T {
    return (row < n && j < r) ? p[(long)row * r + j] : from_f<T>(0.0f);
  };
  int ra = row0 + gid, rb = row0 + gid + 8;
  uint32_t a[4] = {pack2(P(ra, 2 * tig), P(ra, 2 * tig + 1)),
                   pack2(P(rb, 2 * tig), P(rb, 2 * tig + 1)),
                   pack2(P(ra, 2 * tig + 8), P(ra, 2 * tig + 9)),
                   pack2(P(rb, 2 * tig + 8), P(rb, 2 * tig + 9))};
  int c_end = min(cols, span0 + kExpBlockCols);
  for (int c0 = span0 + warp * kTile; c0 < c_end; c0 += kWarps * kTile) {
    // The tile's M fragments and bias first (their latency paid once a tile, not once an
    // 8-column step); past c_end (cols is a multiple of 16, not of 64) they are zero and
    // the columns are not written.
    uint32_t b[kTile / 8][2];
    float bv[kTile / 8][2];
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      int cb = c0 + nt * 8, col = cb + 2 * tig;
      bool in = cb < c_end;
      const T* pr = pe + (long)(cb + gid) * 16 + 2 * tig;
      b[nt][0] = in ? ld32(pr) : 0u;
      b[nt][1] = in ? ld32(pr + 8) : 0u;
      bool hb = in && bias != nullptr;
      bv[nt][0] = hb ? to_f(bias[col]) : 0.0f;
      bv[nt][1] = hb ? to_f(bias[col + 1]) : 0.0f;
    }
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      mma<T>(acc, a, b[nt]);
      float b0 = bv[nt][0], b1 = bv[nt][1];
      T* yt = ys + gid * kPitch + nt * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(yt) = pack2(from_f<T>(s * acc[0] + b0), from_f<T>(s * acc[1] + b1));
      *reinterpret_cast<uint32_t*>(yt + 8 * kPitch) =
          pack2(from_f<T>(s * acc[2] + b0), from_f<T>(s * acc[3] + b1));
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int e = lane + 32 * i, row = row0 + e / 8, col = c0 + (e % 8) * 8;
      if (row < n && col < c_end) {
        *reinterpret_cast<uint4*>(y + (long)row * cols + col) =
            *reinterpret_cast<const uint4*>(ys + (e / 8) * kPitch + (e % 8) * 8);
      }
    }
    __syncwarp();
  }
}

// ---- reduce: d[i, j] = s sum_row x[row, i] g[row, j] ----------------------------------
// As d^T = g^T x: A = a 16-row step of g transposed (16 j x 16 rows), B = the same rows
// of x (16 rows x 8 columns). A block owns kTile columns of x and one slice of the rows,
// which its eight warps split in 16-row steps; each step's 16 x 64 block of x comes
// through shared memory (whole row segments from global memory) while the next is loaded.
// The warps' sums meet in shared memory in a fixed order and the block writes one partial
// part[slice][i][j] (float32, j padded to 16); finish_kernel sums the slices in a fixed
// order (no atomics: the same inputs give the same bits) and writes d. One partial per
// block, not per warp: the partials live until the graph completes, and a training
// step's graph holds every layer's. With counters (zeroed by an earlier pack of the same
// primitive), the last block of each column tile to finish does finish_kernel's sum for
// its columns instead, in the same order (the same bits), and there is no finish node.
constexpr int kRedTiles = kTile / 8;

struct RedJob {
  const void* x;
  const void* g;
  float* part;
  int k;
  void* d; // the gradient (for the in-kernel finish)
  int dt;
  long di, dj;
  float s;
  const float* dsc; // null, or d's row scale
};
struct RedJobs {
  RedJob j[2];
};

// d[col, j] = s * the slices' partials summed in slice order (eight loads in flight; the
// same bits as a plain loop): the finish, by finish_kernel or by a reduce's last block.
// __ldcg: the partials were written by other blocks.
__device__ inline void finish_entry(const RedJob& job, int slices, int col, int j) {
  const float* p = job.part + (long)col * 16 + j;
  const long step = (long)job.k * 16;
  float sum = 0.0f;
  int sl = 0;
  for (; sl + 8 <= slices; sl += 8) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldcg(p + (sl + u) * step);
#pragma unroll
    for (int u = 0; u < 8; ++u) sum += v[u];
  }
  for (; sl < slices; ++sl) sum += __ldcg(p + sl * step);
  st(job.d, col * job.di + j * job.dj, job.dt, job.s * sum * (job.dsc ? job.dsc[col] : 1.0f));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(RedJobs jobs, int n, int r, int slice_rows, int* counters) {
  __shared__ __align__(16) T xs_all[kWarps][16 * kPitch];
  __shared__ float red[kWarps][kRedTiles / 2 * 4][32];
  const RedJob job = blockIdx.z == 0 ? jobs.j[0] : jobs.j[1];
  const T* x = static_cast<const T*>(job.x);
  const T* gm = static_cast<const T*>(job.g);
  const int k = job.k;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  T* xs = xs_all[warp];
  int c_begin = blockIdx.x * kTile;
  if (c_begin >= k) return; // the whole block: no barrier is left waiting
  // slice_rows is a multiple of 16 * kWarps: each warp gets whole 16-row steps.
  int sub = slice_rows / kWarps;
  int row_end = min(n, blockIdx.y * slice_rows + (warp + 1) * sub);
  int row_begin = min(row_end, blockIdx.y * slice_rows + warp * sub);
  const T zero = from_f<T>(0.0f);
  auto G = [&](int row, int j) -> T {
    return (row < row_end && j < r) ? gm[(long)row * r + j] : zero;
  };
  auto load_g = [&](int n0, uint32_t (&a)[4]) {
    int r0 = n0 + 2 * tig, r1 = r0 + 1, r8 = r0 + 8, r9 = r0 + 9;
    a[0] = pack2(G(r0, gid), G(r1, gid));
    a[1] = pack2(G(r0, gid + 8), G(r1, gid + 8));
    a[2] = pack2(G(r8, gid), G(r9, gid));
    a[3] = pack2(G(r8, gid + 8), G(r9, gid + 8));
  };
  float acc[kRedTiles][4];
#pragma unroll
  for (int nt = 0; nt < kRedTiles; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[nt][q] = 0.0f;
  // Two 16-row steps in flight (x tile and g fragment each), as in project.
  const T* x0 = xs + 2 * tig * kPitch + gid;
  auto mul = [&](const uint32_t (&a)[4]) {
#pragma unroll
    for (int nt = 0; nt < kRedTiles; ++nt) {
      const T* xc = x0 + nt * 8;
      uint32_t b[2] = {pack2(xc[0], xc[kPitch]), pack2(xc[8 * kPitch], xc[9 * kPitch])};
      mma<T>(acc[nt], a, b);
    }
  };
  uint32_t ga[4], gb[4];
  uint4 na[4], nb[4];
  if (row_begin < row_end) {
    load_tile(x, row_begin, row_end, c_begin, k, lane, na);
    load_g(row_begin, ga);
  }
  if (row_begin + 16 < row_end) {
    load_tile(x, row_begin + 16, row_end, c_begin, k, lane, nb);
    load_g(row_begin + 16, gb);
  }
  for (int n0 = row_begin; n0 < row_end; n0 += 32) {
    uint32_t a[4];
    __syncwarp();
    store_tile(xs, lane, na);
#pragma unroll
    for (int q = 0; q < 4; ++q) a[q] = ga[q];
    __syncwarp();
    if (n0 + 32 < row_end) {
      load_tile(x, n0 + 32, row_end, c_begin, k, lane, na);
      load_g(n0 + 32, ga);
    }
    mul(a);
    if (n0 + 16 >= row_end) break;
    __syncwarp();
    store_tile(xs, lane, nb);
#pragma unroll
    for (int q = 0; q < 4; ++q) a[q] = gb[q];
    __syncwarp();
    if (n0 + 48 < row_end) {
      load_tile(x, n0 + 48, row_end, c_begin, k, lane, nb);
      load_g(n0 + 48, gb);
    }
    mul(a);
  }
  // The eight warps' sums, half the column tiles at a time (16 KB of shared memory),
  // warp 0's first: thread t sums values t and t + 256 of the half.
  float* out = job.part + (long)blockIdx.y * k * 16;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
#pragma unroll
    for (int u = 0; u < kRedTiles / 2; ++u)
#pragma unroll
      for (int q = 0; q < 4; ++q) red[warp][u * 4 + q][lane] = acc[half * kRedTiles / 2 + u][q];
    __syncthreads();
#pragma unroll
    for (int e = threadIdx.x; e < kRedTiles / 2 * 4 * 32; e += kThreads) {
      int v = e / 32, ln = e % 32, u = v / 4, q = v % 4;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w][v][ln];
      int j = ln / 4 + (q >= 2 ? 8 : 0);
      int col = c_begin + (half * kRedTiles / 2 + u) * 8 + 2 * (ln % 4) + (q & 1);
      if (col < k) out[(long)col * 16 + j] = sum;
    }
    __syncthreads();
  }
  if (counters == nullptr) return;
  // The partials are written; the last of the column tile's slices to get here sums them.
  __shared__ int last;
  if (threadIdx.x == 0) {
    __threadfence(); // this block's partial, visible before its count
    last = atomicAdd(&counters[blockIdx.z * gridDim.x + blockIdx.x], 1) == int(gridDim.y) - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < kTile * r; e += kThreads) {
    int col = c_begin + e / r;
    if (col >= k) break; // col grows with e
    finish_entry(job, int(gridDim.y), col, e % r);
  }
}

__global__ void finish_kernel(RedJobs jobs, int r, int slices) {
  const RedJob job = blockIdx.y == 0 ? jobs.j[0] : jobs.j[1];
  long idx = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (idx >= (long)job.k * r) return;
  finish_entry(job, slices, int(idx / r), int(idx % r));
}

// A packed row-major array as (rows, width): its last dimension is the width.
int width(const mx::array& a) { return a.ndim() ? a.shape(-1) : 1; }
int rows(const mx::array& a) {
  long r = 1;
  for (int i = 0; i + 1 < int(a.ndim()); ++i) r *= a.shape(i);
  return int(r);
}

template <typename F>
void with_t(mx::Dtype t, F&& f) {
  if (t == mx::float16) f(__half{});
  else if (t == mx::bfloat16) f(__nv_bfloat16{});
  else throw std::logic_error("[lowrank] the compute dtype must be float16 or bfloat16");
}

} // namespace

bool lowrank_fits(int r, mx::Dtype t, std::initializer_list<int> widths,
                  std::initializer_list<const mx::array*> projected, bool switchable) {
  static bool on = [] {
    const char* v = std::getenv("MLX_TUNER_LOWRANK");
    return !(v && v[0] == '0');
  }();
  if ((switchable && !on) || r < 1 || r > kLowRankMax || (t != mx::float16 && t != mx::bfloat16)) {
    return false;
  }
  for (int w : widths) {
    if (w <= 0 || w % 16 != 0) return false;
  }
  for (auto* a : projected) { // a view may start at any element; rows are read by 16 bytes
    if (!aligned16(gpu_ptr<void>(*a))) return false;
  }
  return true;
}

std::vector<mx::array> lowrank_pack(mx::cu::CommandEncoder& enc, mx::Dtype t,
                                    std::initializer_list<LowRankMatrix> ms,
                                    mx::array* counters) {
  if (ms.size() == 0 || ms.size() > 2) throw std::logic_error("[lowrank] pack takes 1 or 2 matrices");
  std::vector<mx::array> out;
  PackJobs pj{};
  long most = 0;
  int i = 0;
  for (auto& m : ms) {
    // Both are M transposed, its rank side padded to 16: project's M (k, r) becomes
    // [16][k], expand's M (r, cols) becomes [cols][16]; dst[u][v] = M[v][u].
    int U = m.for_project ? 16 : m.cols, V = m.for_project ? m.rows : 16;
    int ld = m.for_project ? V : m.ld;
    out.push_back(scratch(enc, {U, ld}, t));
    const float* line = m.line_scale ? gpu_ptr<float>(*m.line_scale) : nullptr;
    pj.j[i++] = {gpu_ptr<void>(m.m), dt_of(m.m, "a LoRA matrix"), m.sj, m.si, m.cols, m.rows,
                 gpu_ptr<void>(out.back()), U, V, ld, m.s, line, m.for_project ? 0 : 1};
    most = std::max(most, (long)U * V);
  }
  if (counters) {
    pj.zero = gpu_ptr<int>(*counters);
    pj.nzero = int(counters->size());
  }
  for (auto& m : ms) {
    enc.set_input_array(m.m);
    if (m.line_scale) enc.set_input_array(*m.line_scale);
  }
  for (auto& o : out) enc.set_output_array(o);
  if (counters) enc.set_output_array(*counters);
  with_t(t, [&](auto tt) {
    using T = decltype(tt);
    unsigned blocks = unsigned(std::min<long>((most + 255) / 256, 1024));
    launch(enc, reinterpret_cast<const void*>(&pack_kernel<T>), dim3(blocks, unsigned(ms.size())),
           dim3(256), 0, pj);
  });
  return out;
}

void lowrank_project(mx::cu::CommandEncoder& enc, const mx::array& x, const mx::array& pk,
                     int r, float s, mx::array& c, mx::array* pad) {
  int n = rows(x), k = width(x);
  if (n == 0) return;
  reads_writes(enc, {&x, &pk}, {&c, pad});
  int cdt = dt_of(c, "the output");
  with_t(x.dtype(), [&](auto tt) {
    using T = decltype(tt);
    const void* kern = r <= 8 ? reinterpret_cast<const void*>(&project_kernel<T, 1>)
                              : reinterpret_cast<const void*>(&project_kernel<T, 2>);
    launch(enc, kern, dim3((n + 15) / 16), dim3(kThreads), 0, gpu_ptr<T>(x), gpu_ptr<T>(pk),
           gpu_ptr<void>(c), cdt, n, k, r, s, pad ? gpu_ptr<T>(*pad) : static_cast<T*>(nullptr),
           NormArgs{});
  });
}

namespace {
NormArgs norm_args(mx::cu::CommandEncoder& enc, int r, int n, const ProjectNorm& nm) {
  if (r < 1 || r > kLowRankMax || nm.b.shape(1) != n) {
    throw std::logic_error("[lowrank] the norm epilogue takes ranks 1 to 16 and B (r, rows)");
  }
  reads_writes(enc, {&nm.b, &nm.c, &nm.m}, {&nm.n, &nm.rs});
  return {gpu_ptr<float>(nm.b), gpu_ptr<float>(nm.c), gpu_ptr<float>(nm.m), gpu_ptr<float>(nm.n),
          gpu_ptr<float>(nm.rs), nm.s};
}
} // namespace

void lowrank_project_norm(mx::cu::CommandEncoder& enc, const mx::array& w, const mx::array& pk,
                          int r, const ProjectNorm& norm) {
  int n = rows(w), k = width(w);
  if (n == 0) return;
  NormArgs na = norm_args(enc, r, n, norm);
  reads_writes(enc, {&w, &pk}, {});
  float s = 1.0f;
  int cdt = kF32;
  with_t(w.dtype(), [&](auto tt) {
    using T = decltype(tt);
    launch(enc, reinterpret_cast<const void*>(&project_kernel<T, 2, true>), dim3((n + 15) / 16),
           dim3(kThreads), 0, gpu_ptr<T>(w), gpu_ptr<T>(pk), static_cast<void*>(nullptr), cdt, n,
           k, r, s, static_cast<T*>(nullptr), na);
  });
}

void lowrank_project_quant(mx::cu::CommandEncoder& enc, const mx::array& wq,
                           const mx::array& scales, const mx::array& biases, int bits, int gs,
                           const mx::array& pk, int r, mx::array* c, const ProjectNorm* norm) {
  int n = wq.shape(0), k = wq.shape(1) * 32 / bits; // mutable: launch() takes addresses
  if (n == 0) return;
  if (r < 1 || r > kLowRankMax || k % 32 != 0 || gs % 32 != 0 || k % gs != 0 ||
      (c && c->dtype() != mx::float32) || !c == !norm || scales.dtype() != pk.dtype() ||
      biases.dtype() != pk.dtype()) {
    throw std::logic_error("[lowrank] project_quant: unsupported rank, group size or dtype");
  }
  NormArgs na = norm ? norm_args(enc, r, n, *norm) : NormArgs{};
  reads_writes(enc, {&wq, &scales, &biases, &pk}, {c});
  // Rows are k * bits / 8 bytes, a multiple of 4 bits; a lane's codes start at multiples
  // of 2 bits bytes: one aligned load for bits 2, 4, 8 when the base is 16-byte aligned.
  const bool wide = aligned16(gpu_ptr<void>(wq));
  with_t(pk.dtype(), [&](auto tt) {
    using T = decltype(tt);
    const void* kern = nullptr;
    auto pick = [&]<int BITS>() {
      auto with = [&]<bool WIDE>() {
        kern = norm ? reinterpret_cast<const void*>(&project_quant_kernel<T, BITS, WIDE, true>)
                    : reinterpret_cast<const void*>(&project_quant_kernel<T, BITS, WIDE, false>);
      };
      // One load of a lane's codes exists for bits 2, 4, 8 only: the others always go by byte.
      if constexpr (BITS == 2 || BITS == 4 || BITS == 8) {
        if (wide) return with.template operator()<true>();
      }
      with.template operator()<false>();
    };
    quant::dispatch_bits(bits, pick);
    float* cp = c ? gpu_ptr<float>(*c) : nullptr;
    launch(enc, kern, dim3((n + 15) / 16), dim3(kThreads), 0, gpu_ptr<uint8_t>(wq),
           gpu_ptr<T>(scales), gpu_ptr<T>(biases), gpu_ptr<T>(pk), cp, n, k, r, gs, na);
  });
}

void lowrank_expand(mx::cu::CommandEncoder& enc, const mx::array& p, const mx::array& pe,
                    float s, const mx::array* bias, mx::array& y) {
  int n = rows(y), cols = width(y), r = width(p);
  if (n == 0 || cols == 0) return;
  if (bias && bias->dtype() != y.dtype()) {
    throw std::logic_error("[lowrank] the bias must be in the output's dtype");
  }
  reads_writes(enc, {&p, &pe, bias}, {&y});
  with_t(y.dtype(), [&](auto tt) {
    using T = decltype(tt);
    long blocks = (long)((n + 15) / 16) * ((cols + kExpBlockCols - 1) / kExpBlockCols);
    const T* bptr = bias ? gpu_ptr<T>(*bias) : nullptr;
    launch(enc, reinterpret_cast<const void*>(&expand_kernel<T>),
           dim3(unsigned(blocks)), dim3(kThreads), 0, gpu_ptr<T>(p),
           gpu_ptr<T>(pe), bptr, gpu_ptr<T>(y), n, cols, r, s);
  });
}

mx::array reduce_counters(mx::cu::CommandEncoder& enc, int max_k) {
  return scratch(enc, {2 * std::max(1, (max_k + kTile - 1) / kTile)}, mx::int32);
}

void lowrank_reduce(mx::cu::CommandEncoder& enc, const std::vector<ReduceJob>& jobs,
                    mx::array* counters) {
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
  if (max_k == 0 || n == 0) {
    throw std::logic_error("[lowrank] reduce over an empty operand (the callers handle it)");
  }
  // About two blocks per multiprocessor over both jobs; a slice is a whole number of
  // 16-row steps for each of a block's warps.
  int col_blocks = (max_k + kTile - 1) / kTile;
  if (counters && counters->size() < size_t(col_blocks) * jobs.size()) {
    throw std::logic_error("[lowrank] reduce counters sized for narrower jobs");
  }
  int want = std::max(1, 2 * sm_count(enc) / (col_blocks * int(jobs.size())));
  constexpr int kSliceStep = 16 * kWarps;
  int slice_rows = ((n + want - 1) / want + kSliceStep - 1) / kSliceStep * kSliceStep;
  int slices = (n + slice_rows - 1) / slice_rows;
  RedJobs rj{};
  std::vector<mx::array> parts;
  int i = 0;
  for (auto& jb : jobs) {
    int k = width(jb.x);
    parts.push_back(scratch(enc, {slices, std::max(k, 1), 16}, mx::float32));
    rj.j[i] = {gpu_ptr<void>(jb.x), gpu_ptr<void>(jb.g), gpu_ptr<float>(parts.back()), k,
               gpu_ptr<void>(jb.d), dt_of(jb.d, "a gradient"), jb.di, jb.dj, jb.s,
               jb.d_scale ? gpu_ptr<float>(*jb.d_scale) : nullptr};
    ++i;
  }
  for (auto& jb : jobs) {
    enc.set_input_array(jb.x), enc.set_input_array(jb.g);
    if (jb.d_scale) enc.set_input_array(*jb.d_scale);
  }
  if (counters) enc.set_input_array(*counters);
  for (auto& p : parts) enc.set_output_array(p);
  if (counters) {
    for (auto& jb : jobs) enc.set_output_array(jb.d);
  }
  int* cnt = counters ? gpu_ptr<int>(*counters) : nullptr;
  with_t(T, [&](auto tt) {
    using TT = decltype(tt);
    launch(enc, reinterpret_cast<const void*>(&reduce_kernel<TT>),
           dim3(col_blocks, slices, unsigned(jobs.size())), dim3(kThreads), 0, rj, n, r, slice_rows,
           cnt);
  });
  if (counters) return; // finished inside the launch
  for (auto& p : parts) enc.set_input_array(p);
  for (auto& jb : jobs) enc.set_output_array(jb.d);
  long most = (long)max_k * r;
  launch(enc, reinterpret_cast<const void*>(&finish_kernel),
         dim3(unsigned((most + 255) / 256), unsigned(jobs.size())), dim3(256), 0, rj, r, slices);
}

} // namespace mlx_tuner::cuda
