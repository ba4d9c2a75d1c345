// The LoRA forward, and the backward's dx, as one GEMM on Hopper (sm_90a): y = x W^T +
// p Bp^T (+ bias), where the rank-r term enters the main loop as one more k step instead of
// a separate pass that writes s xa B into y for a beta = 1 GEMM to read back.
// p is the rank-r projection of the GEMM's own left operand: xa = x A in the forward,
// g = dy B^T in the backward. Two ways to get it:
// - from memory (xa_pad, zero-padded to 64 columns, written by lowrank_project);
// - kProj: made inside the GEMM, p = x M with M (16, K) as lowrank_pack packs A or B^T:
//   one 16-wide wgmma beside the main one at every k step, reading the same x tile and a
//   16 x 64 box of M that rides in each stage. p stays in registers and enters the rank
//   step as the wgmma's A operand from registers (the accumulator fragment of m64n16 is
//   the bf16 A fragment of k16, pair for pair). Each CTA walks a contiguous run of
//   row-major tiles, so p is made once per row block of the run (the run's first tile,
//   and each new row block's), and the row block's first tile writes it out (xa for the
//   backward, g for the dA reduce).
// Tiles of 128 x 256, k tiles of 64 through a ring of four TMA stages (128-byte swizzle),
// a producer warpgroup (one thread issues the copies) and two consumer warpgroups (64 rows
// each, wgmma m64n256k16, float32 accumulators in registers), persistent over the tiles.
// Operands bf16, K-major (x (M, K), W (N, K) or with kMN (K, N), xa (M, 64), Bp (N, 64),
// M (16, K)), output bf16.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/reg_reconfig.h>

#include "backend/cuda/mbarrier.cuh"

namespace mlx_tuner::lora_gemm {

constexpr int kBM = 128, kBN = 256, kBK = 64, kStages = 4, kThreads = 384;
constexpr int kABytes = kBM * kBK * 2, kBBytes = kBN * kBK * 2;
constexpr int kRankCols = 64; // xa and Bp columns: the rank, zero-padded to one k tile
constexpr int kProjRows = 16, kProjBytes = kProjRows * kBK * 2; // M's box a stage (kProj)
// The epilogue goes through shared memory and TMA stores (asynchronous: the warpgroup is
// back in the main loop while the tile is written), in rounds: each consumer writes its 64
// rows as 64 x 64 boxes (128-byte swizzle), two a round (half a tile), or with kProj one a
// round (a quarter): M's boxes take the shared memory of the other.
constexpr int kEpiBox = 64, kEpiBoxBytes = kEpiBox * kEpiBox * 2;
template <bool kProj>
struct Layout {
  static constexpr int kStageBytes = kABytes + kBBytes + (kProj ? kProjBytes : 0);
  static constexpr int kEpiBoxes = kProj ? 1 : 2; // a consumer's boxes a round
  static constexpr int kEpiBytes = 2 * kEpiBoxes * kEpiBoxBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes + kEpiBytes + 1024 + 2 * kStages * 8;
};
static_assert(Layout<false>::kSmemBytes <= 227 * 1024 && Layout<true>::kSmemBytes <= 227 * 1024,
              "an sm_90 CTA has 227 KB of shared memory");
static_assert(Layout<true>::kStageBytes % 1024 == 0, "128-byte-swizzled tiles start 1 KB aligned");

struct Params {
  int m, n, k;
  const __nv_bfloat16* bias; // (n,) or null
  int rank; // 1: add the rank step p Bp^T
  __nv_bfloat16* p_out; // kProj: p (m, r) written here, or null
  int r;
  const float* col_scale = nullptr; // (n,) or null: y = col_scale * (x W^T + p Bp^T) + bias
};

// The body is Hopper's alone (wgmma is sm_90a only): for other targets of a multi-arch
// build it is empty, and the host launches it on compute capability 9.0 only.
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED) && defined(CUTE_ARCH_TMA_SM90_ENABLED)
#define MLX_TUNER_LORA_GEMM_BODY 1
#endif

#if defined(MLX_TUNER_LORA_GEMM_BODY)
using cuda::mbar_arrive;
using cuda::mbar_expect;
using cuda::mbar_init;
using cuda::mbar_wait;
using cuda::smem_u32;

// A K-major operand tile in shared memory as TMA wrote it with the 128-byte swizzle: rows
// of 128 bytes (64 bf16), groups of 8 rows 1024 bytes apart.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

// An N-major B tile (kMN): four TMA boxes of 64 k rows x 64 n (128 bytes, swizzled), 8 KB
// apart: the leading offset steps from one 64-column box to the next, the stride offset
// from one group of 8 k rows to the next.
__device__ __forceinline__ uint64_t smem_desc_mn(uint32_t addr) {
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t(8192 >> 4) << 16) |
         (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

template <bool kMN, size_t... I>
__device__ __forceinline__ void wgmma_256(float (&d)[128], uint64_t da, uint64_t db, bool acc,
                                          std::index_sequence<I...>) {
  using namespace cute::SM90::GMMA;
  MMA_64x256x16_F32BF16BF16_SS<Major::K, kMN ? Major::MN : Major::K>::fma(
      da, db, d[I]..., acc ? ScaleOut::One : ScaleOut::Zero);
}

// The rank step with its A operand (p, bf16 pairs) from registers.
template <size_t... I>
__device__ __forceinline__ void wgmma_256_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t db,
                                             std::index_sequence<I...>) {
  using namespace cute::SM90::GMMA;
  MMA_64x256x16_F32BF16BF16_RS<Major::K, Major::K>::fma(a[0], a[1], a[2], a[3], db, d[I]...,
                                                        ScaleOut::One);
}

// p += x M for one k16 step (kProj).
__device__ __forceinline__ void wgmma_16(float (&d)[8], uint64_t da, uint64_t db, bool acc) {
  using namespace cute::SM90::GMMA;
  MMA_64x16x16_F32BF16BF16_SS<Major::K, Major::K>::fma(
      da, db, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], acc ? ScaleOut::One : ScaleOut::Zero);
}

// The tiles one CTA computes, walked the same way by the producer and the consumers.
// kProj: a contiguous run of row-major tiles (consecutive tiles share their row block, and
// with it p); else strided over the grid, in groups of 8 row tiles so that the CTAs working
// at once share their x and W tiles in L2.
template <bool kProj>
struct TileWalk {
  int tm, tn, t, first, end, step;
  __device__ TileWalk(int m, int n) : tm((m + kBM - 1) / kBM), tn((n + kBN - 1) / kBN) {
    int tiles = tm * tn;
    if (kProj) {
      int per = (tiles + gridDim.x - 1) / gridDim.x;
      t = blockIdx.x * per, end = min(tiles, t + per), step = 1;
    } else {
      t = blockIdx.x, end = tiles, step = gridDim.x;
    }
    first = t;
  }
  __device__ bool more() const { return t < end; }
  __device__ void next() { t += step; }
  __device__ void coords(int& mb, int& nb) const {
    if (kProj) {
      mb = t / tn, nb = t % tn;
      return;
    }
    constexpr int kGroup = 8;
    int per_group = kGroup * tn, g = t / per_group, top = g * kGroup;
    int rows = min(tm - top, kGroup), in_g = t % per_group;
    mb = top + in_g % rows;
    nb = in_g / rows;
  }
  // kProj: whether this tile makes p (the run's first tile, or a new row block's).
  __device__ bool fresh(int nb) const { return kProj && (t == first || nb == 0); }
};
#endif

// kMN: W is given as (K, N), N-major (the backward's dx = dy W: W (out, in) as stored);
// else (N, K). The rank step's Bp is (N, 64) either way. tr: xa (M, 64), or with kProj
// M (16, K).
// kScale: y's columns scaled by p.col_scale in the epilogue (DoRA's forward; its own
// instantiations, so that LoRA's kernels stay as they were).
template <bool kMN, bool kProj, bool kScale = false>
__global__ void __launch_bounds__(kThreads, 1)
lora_gemm_kernel(const __grid_constant__ CUtensorMap tx, const __grid_constant__ CUtensorMap tw,
                 const __grid_constant__ CUtensorMap tr, const __grid_constant__ CUtensorMap tbp,
                 const __grid_constant__ CUtensorMap ty, Params p) {
#if defined(MLX_TUNER_LORA_GEMM_BODY)
  using L = Layout<kProj>;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* epi = smem + kStages * L::kStageBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(epi + L::kEpiBytes);
  uint64_t* empty = full + kStages;
  int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  int kt_main = (p.k + kBK - 1) / kBK, kt_all = kt_main + (p.rank ? 1 : 0);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 2); // one arrival per consumer warpgroup
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (wg == 0) { // producer
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (tid != 0) return;
    int it = 0;
    for (TileWalk<kProj> w(p.m, p.n); w.more(); w.next()) {
      int mb, nb;
      w.coords(mb, nb);
      bool fresh = w.fresh(nb);
      for (int kt = 0; kt < kt_all; ++kt, ++it) {
        int s = it % kStages;
        if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) & 1) ^ 1);
        unsigned char* sa = smem + s * L::kStageBytes;
        if (kt < kt_main) {
          mbar_expect(&full[s], kABytes + kBBytes + (fresh ? kProjBytes : 0));
          cute::SM90_TMA_LOAD_2D::copy(&tx, &full[s], 0, sa, kt * kBK, mb * kBM);
          if constexpr (kMN) {
#pragma unroll
            for (int q = 0; q < kBN / 64; ++q) {
              cute::SM90_TMA_LOAD_2D::copy(&tw, &full[s], 0, sa + kABytes + q * 8192,
                                           nb * kBN + 64 * q, kt * kBK);
            }
          } else {
            cute::SM90_TMA_LOAD_2D::copy(&tw, &full[s], 0, sa + kABytes, kt * kBK, nb * kBN);
          }
          if (fresh) cute::SM90_TMA_LOAD_2D::copy(&tr, &full[s], 0, sa + kABytes + kBBytes, kt * kBK, 0);
        } else if (kProj) { // the rank step: p is in the consumers' registers
          mbar_expect(&full[s], kBBytes);
          cute::SM90_TMA_LOAD_2D::copy(&tbp, &full[s], 0, sa + kABytes, 0, nb * kBN);
        } else {
          mbar_expect(&full[s], kABytes + kBBytes);
          cute::SM90_TMA_LOAD_2D::copy(&tr, &full[s], 0, sa, 0, mb * kBM);
          cute::SM90_TMA_LOAD_2D::copy(&tbp, &full[s], 0, sa + kABytes, 0, nb * kBN);
        }
      }
    }
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<232>();
  int c = wg - 1, warp = tid / 32, lane = tid % 32;
  int r0 = warp * 16 + lane / 4; // this thread's rows of the fragments: r0 and r0 + 8
  float acc[128];
  float pacc[8]; // kProj: p's float32 accumulators (m64n16 fragment)
  uint32_t pa[4]; // and p as the rank step's bf16 A fragment
  int it = 0;
  // One k step of the main loop, its products one batch committed in straight-line code:
  // with wgmma under a branch before the commit (p's products on fresh tiles, the rank
  // step in the same loop), ptxas closed each batch with a dummy wgmma of its own, and
  // wait<1> then waited for the real batch, so no product ran while the next stage was
  // waited for and issued (SASS: HGMMA.64x8x16 RZ, gsb0 before each DEPBAR.LE gsb0, 0x1).
  auto main_step = [&]<bool kFresh>(int kt) {
    int s = it % kStages;
    mbar_wait(&full[s], (it / kStages) & 1);
    unsigned char* sa = smem + s * L::kStageBytes;
    uint32_t a0 = smem_u32(sa + c * 64 * 128), b0 = smem_u32(sa + kABytes);
    cute::warpgroup_arrive();
#pragma unroll
    for (int k16 = 0; k16 < kBK / 16; ++k16) {
      uint64_t db = kMN ? smem_desc_mn(b0 + 2048 * k16) : smem_desc(b0 + 32 * k16);
      wgmma_256<kMN>(acc, smem_desc(a0 + 32 * k16), db, kt > 0 || k16 > 0,
                     std::make_index_sequence<128>{});
    }
    if constexpr (kFresh) {
      uint32_t m0 = smem_u32(sa + kABytes + kBBytes);
#pragma unroll
      for (int k16 = 0; k16 < kBK / 16; ++k16) {
        wgmma_16(pacc, smem_desc(a0 + 32 * k16), smem_desc(m0 + 32 * k16), kt > 0 || k16 > 0);
      }
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<1>(); // the previous stage's products are done: release it
    if (kt > 0 && tid == 0) mbar_arrive(&empty[(it - 1) % kStages]);
    ++it;
  };
  TileWalk<kProj> w(p.m, p.n);
  for (; w.more(); w.next()) {
    int mb, nb;
    w.coords(mb, nb);
    bool fresh = w.fresh(nb);
    if (kProj && fresh) {
      for (int kt = 0; kt < kt_main; ++kt) main_step.template operator()<kProj>(kt);
    } else {
      for (int kt = 0; kt < kt_main; ++kt) main_step.template operator()<false>(kt);
    }
    if (p.rank) { // the rank step: one more k step
      int s = it % kStages;
      mbar_wait(&full[s], (it / kStages) & 1);
      unsigned char* sa = smem + s * L::kStageBytes;
      uint32_t a0 = smem_u32(sa + c * 64 * 128), b0 = smem_u32(sa + kABytes);
      if constexpr (kProj) { // p from registers
        if (fresh) {
          cute::warpgroup_wait<0>(); // p's products are done
#pragma unroll
          for (int i = 0; i < 8; ++i) cute::warpgroup_fence_operand(pacc[i]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            __nv_bfloat162 v = __floats2bfloat162_rn(pacc[2 * i], pacc[2 * i + 1]);
            pa[i] = *reinterpret_cast<uint32_t*>(&v);
          }
          // p (row r0 or r0 + 8, columns 2 (lane % 4) + {0, 1}, + 8 for pa[2], pa[3]), as
          // rounded for the product: written once, by the row block's first tile.
          if (nb == 0 && p.p_out) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              int row = mb * kBM + c * 64 + r0 + 8 * (i % 2), col = 2 * (lane % 4) + 8 * (i / 2);
              const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&pa[i]);
              if (row < p.m && col < p.r) p.p_out[(long)row * p.r + col] = v[0];
              if (row < p.m && col + 1 < p.r) p.p_out[(long)row * p.r + col + 1] = v[1];
            }
          }
        }
        cute::warpgroup_arrive();
        wgmma_256_rs(acc, pa, smem_desc(b0), std::make_index_sequence<128>{});
      } else { // from xa: only its first 16 columns can be nonzero (r <= 16)
        cute::warpgroup_arrive();
        wgmma_256<false>(acc, smem_desc(a0), smem_desc(b0), true, std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<1>();
      if (kt_main > 0 && tid == 0) mbar_arrive(&empty[(it - 1) % kStages]);
      ++it;
    }
    cute::warpgroup_wait<0>();
#pragma unroll
    for (int i = 0; i < 128; ++i) cute::warpgroup_fence_operand(acc[i]); // read after the wait
    if (tid == 0) mbar_arrive(&empty[(it - 1) % kStages]);
    // Epilogue: accumulator i of the fragment holds (row g or g + 8, column 8 (i / 4) +
    // 2 (lane % 4) + (i & 1)), g = lane / 4, of this warp's 16 rows. Written as bf16 pairs
    // into the 128-byte-swizzled boxes (16-byte unit u of row r at unit u ^ (r % 8): the
    // warp's 32 stores hit 32 banks), then stored by one thread; TMA clips rows and
    // columns past the matrix.
    constexpr int kBoxes = L::kEpiBoxes, kRounds = kBN / kEpiBox / kBoxes;
    unsigned char* mine = epi + c * kBoxes * kEpiBoxBytes;
#pragma unroll
    for (int rd = 0; rd < kRounds; ++rd) {
      // kScale: the round's column scale first, by read-only loads issued together (one
      // load latency a round: the compiler cannot move a plain load past the shared-memory
      // stores below, which may alias it).
      [[maybe_unused]] float2 scale2[8 * kBoxes];
      if constexpr (kScale) {
#pragma unroll
        for (int jj = 0; jj < 8 * kBoxes; ++jj) {
          int col = nb * kBN + 8 * (rd * 8 * kBoxes + jj) + 2 * (lane % 4);
          scale2[jj] = make_float2(1.0f, 1.0f);
          if (col < p.n) { // our own buffer: 8-byte aligned pairs (n % 8 == 0)
            scale2[jj] = __ldg(reinterpret_cast<const float2*>(p.col_scale + col));
          }
        }
      }
      if (rd > 0 || w.t != w.first) { // the buffer's last stores have read it
        if (tid == 0) cute::tma_store_wait<0>();
        asm volatile("bar.sync %0, 128;" ::"r"(c + 1) : "memory");
      }
#pragma unroll
      for (int jj = 0; jj < 8 * kBoxes; ++jj) {
        int j = rd * 8 * kBoxes + jj, col = nb * kBN + 8 * j + 2 * (lane % 4);
        float b0 = 0.0f, b1 = 0.0f;
        if (p.bias && col < p.n) {
          b0 = __bfloat162float(p.bias[col]);
          b1 = __bfloat162float(p.bias[col + 1]);
        }
        float v0 = acc[4 * j], v1 = acc[4 * j + 1], v2 = acc[4 * j + 2], v3 = acc[4 * j + 3];
        if constexpr (kScale) {
          v0 *= scale2[jj].x;
          v1 *= scale2[jj].y;
          v2 *= scale2[jj].x;
          v3 *= scale2[jj].y;
        }
        unsigned char* box = mine + (jj / 8) * kEpiBoxBytes + 4 * (lane % 4);
        int u = jj % 8;
        *reinterpret_cast<__nv_bfloat162*>(box + r0 * 128 + ((u ^ (r0 % 8)) << 4)) =
            __floats2bfloat162_rn(v0 + b0, v1 + b1);
        int r1 = r0 + 8;
        *reinterpret_cast<__nv_bfloat162*>(box + r1 * 128 + ((u ^ (r1 % 8)) << 4)) =
            __floats2bfloat162_rn(v2 + b0, v3 + b1);
      }
      cute::tma_store_fence(); // the generic-proxy writes, visible to the TMA unit
      asm volatile("bar.sync %0, 128;" ::"r"(c + 1) : "memory");
      if (tid == 0) {
        int row = mb * kBM + c * 64, col = nb * kBN + rd * kBoxes * kEpiBox;
#pragma unroll
        for (int b = 0; b < kBoxes; ++b) {
          cute::SM90_TMA_STORE_2D::copy(&ty, mine + b * kEpiBoxBytes, col + b * kEpiBox, row);
        }
        cute::tma_store_arrive();
      }
    }
  }
  if (tid == 0) { // every store complete before the kernel ends
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
#endif
}

} // namespace mlx_tuner::lora_gemm
