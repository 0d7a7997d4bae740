// Fused 2:4 activation compression + sparse tensor-core GEMM (mma.sp.m16n8k32), sm_80 and newer.
//
//   Y[m, n] = s[m] * sum_k S(X)[m, k] * W[n, k]  +  sum_r T[m, r] * U[n, r]  +  bias[n]
//
// X (M x K) and W (N x K) are row-major fp16/bf16. S keeps the 2 largest magnitudes of each group
// of 4 along K (NaN > Inf > finite, ties keep the lower index, as kernels/reference.py). s is the
// per-row norm compensation ||x|| / ||S(x)|| (1 for rows that are all zero or hold NaN/Inf, or when
// NORM_COMP is off). T = X @ lr_down (M x R) and U = lr_up^T (N x R) carry the optional low-rank term,
// R a multiple of 16. Accumulation is fp32; Y is rounded once.
//
// The CTA (1) copies X and W tiles to shared memory with cp.async (STAGES deep, X one tile ahead of
// W); (2) compresses each X tile once, all threads together, into the exact register image that the
// warps' mma.sp A fragments and metadata need, so each warp loads them with one 16-byte and one
// 4-byte shared load per 16-row slab (the layout, swizzled against bank conflicts, and every index
// into it are in tile_layout.cuh); (3) runs mma.sp against W fragments read by ldmatrix. Steps
// (2) and (3) are software-pipelined: while the tensor cores multiply compressed tile kt, the same
// warps compress tile kt + 1 into a second buffer, with one barrier per K tile. The compressed
// operand never reaches global memory. Row statistics for the norm scale are accumulated by the
// compressing threads as they go.
//
// MAINLOOP_WGMMA (sm_90a) replaces step (3): two warpgroups each issue one asynchronous
// wgmma.mma_async.sp.m64n{BN}k32 per k32 step, A from registers (loaded from the same compressed
// tile), W from 128-byte-swizzled shared memory through a descriptor (wgmma_sp.cuh), and wait for
// them only after compressing tile kt + 1.
//
// CLUSTER_SHARE (with MAINLOOP_WGMMA) launches the kernel in clusters of 2 CTAs that take the same
// BM rows of X and adjacent N tiles. Each CTA copies and compresses only its half of the rows (its
// warps 0-3, one per scheduler, do it) and stores the compressed words both into its own shared
// memory and, through distributed shared memory, into its peer's. The two CTAs therefore multiply
// the same compressed tile while each does half of the compression and half of the X copies; a
// cluster barrier replaces the CTA barrier of each K tile. The last N tile of a row of tiles may have
// no columns (an odd number of N tiles): that CTA still compresses for its peer, and stores nothing.
//
// Layout facts this relies on (PTX ISA, "Matrix fragments for sparse mma.m16n8k32 .f16/.bf16"):
// - the compressed A fragment has the layout of the dense m16n8k16 A fragment applied to the 16x16
//   compressed matrix: lane (g = lane/4, t = lane%4) holds groups t and t+4 of rows g and g+8;
// - metadata: with sparsity selector 0, lanes t=0 and t=1 of each quad supply it; lane t holds the
//   nibbles of groups 4t..4t+3 of row g in bits 0-15 and of row g+8 in bits 16-31, each nibble
//   idx0 | idx1 << 2 with idx0 < idx1 (idx0 == idx1 is undefined behaviour).
// OpenXLA's Triton sparse-dot lowering for Ampere (xla/service/gpu/triton_sparse_extensions.cc) uses
// the same A register order and the same metadata assignment (lane t%2 holds 16 K columns, rows g
// and g+8 packed low/high), an independent check of this reading of the PTX ISA.

#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 256
#endif
#ifndef STAGES
#define STAGES 3
#endif
#ifndef IS_BF16
#define IS_BF16 1
#endif
#ifndef TIMING_SKIP_SELECTION
#define TIMING_SKIP_SELECTION 0
#endif
#ifndef ORDERED_METADATA
#define ORDERED_METADATA 1
#endif
#ifndef MAINLOOP_WGMMA
#define MAINLOOP_WGMMA 0
#endif
#ifndef CLUSTER_SHARE
#define CLUSTER_SHARE 0
#endif
#if CLUSTER_SHARE && !MAINLOOP_WGMMA
#error "CLUSTER_SHARE needs MAINLOOP_WGMMA"
#endif

#include "nm_compress.cuh"
// CLUSTER, X_ROWS, BK, THREADS, KSTEPS, SLABS, PITCH, W_PITCH, SharedTiles and every shared-memory
// index of the compressed tile.
#include "tile_layout.cuh"

#if MAINLOOP_WGMMA
// sm_90a: two warpgroups, each multiplies 64 rows by the whole N tile with wgmma.mma_async.sp
// (wgmma_sp.cuh). Per warp that is 16 rows x BN columns, which the epilogue sees as a 8 x 1 warp grid.
#define WARPS_M 8
#define WARPS_N 1
#else
#define WARPS_M 2
#define WARPS_N 4
#endif
#define WM (BM / WARPS_M)
#define WN (BN / WARPS_N)
#define MI (WM / 16)
#define NI (WN / 8)
#define SMEM_ALIGN (MAINLOOP_WGMMA ? 1024 : 16)  // bytes; fused_cuda.TileConfig.smem_bytes adds SMEM_ALIGN - 16

static_assert(X_ROWS * KSTEPS * CLUSTER == THREADS, "one compressing thread per (row, k32 step) of the X tile");
static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be whole mma tiles");
static_assert((BM * (BK / 8)) % THREADS == 0 && (BN * (BK / 8)) % THREADS == 0, "whole 16-byte copies per thread");
static_assert(!MAINLOOP_WGMMA || (BM == 128 && BK * 2 == 128), "wgmma build: two 64-row warpgroups, 128-byte K rows");

#if IS_BF16
#define MMA_TYPE "bf16"
#else
#define MMA_TYPE "f16"
#endif

__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  asm("cvt.rn." MMA_TYPE "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

#if MAINLOOP_WGMMA
#include "wgmma_sp.cuh"
#endif

#if ORDERED_METADATA
#define MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
#else
#define MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
#endif

__device__ __forceinline__ void mma_sp(float* d, const u32* a, const u32* b, u32 e) {
  asm volatile(MMA_SP "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

__device__ __forceinline__ void mma_dense_k16(float* d, const u32* a, const u32* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

#if CLUSTER_SHARE
__device__ __forceinline__ u32 cluster_ctarank() {
  u32 r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
// The address of shared byte address `addr` in the shared memory of cluster CTA `rank`.
__device__ __forceinline__ u32 mapa_shared(u32 addr, int rank) {
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void st_cluster(u32 addr, u32 v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void st_cluster(u32 addr, u16 v) {
  asm volatile("st.shared::cluster.u16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}
__device__ __forceinline__ void st_cluster(u32 addr, float v) {
  asm volatile("st.shared::cluster.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
#endif

// The barrier of each K tile: the CTA's, or with a cluster the cluster's, whose release/acquire
// also orders the stores into the peer's shared memory.
__device__ __forceinline__ void tile_sync() {
#if CLUSTER_SHARE
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (then nothing is read).
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

#ifdef SMEM_BYTES
static_assert(sizeof(SharedTiles) + SMEM_ALIGN - 16 == SMEM_BYTES,
              "fused_cuda.TileConfig.smem_bytes must match SharedTiles and its alignment");
#endif

#if CLUSTER_SHARE
#define CLUSTER_DIMS __cluster_dims__(CLUSTER, 1, 1)
#else
#define CLUSTER_DIMS
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1) CLUSTER_DIMS
fused_nm_gemm(const u16* __restrict__ X, const u16* __restrict__ W, const u16* __restrict__ bias,
              const u16* __restrict__ T, const u16* __restrict__ U, u16* __restrict__ Y, int M, int N, int K,
              int R, int norm_comp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
#if MAINLOOP_WGMMA
  // The dynamic shared memory base is only guaranteed 16-byte aligned: round it up (the launch
  // reserves SMEM_ALIGN extra bytes).
  SharedTiles& sh = *reinterpret_cast<SharedTiles*>(smem_raw + ((SMEM_ALIGN - (smem_addr(smem_raw) % SMEM_ALIGN)) % SMEM_ALIGN));
#else
  SharedTiles& sh = *reinterpret_cast<SharedTiles*>(smem_raw);
#endif

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int g = lane >> 2, t = lane & 3;

  // Grouped tile order: GROUP consecutive CTAs (clusters) share W tiles in L2. A cluster's CTAs take
  // the same rows and adjacent N tiles, so the grid has CLUSTER * ceil(tiles_n / CLUSTER) of them per
  // row of tiles.
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int GROUP = 8, slots_n = (tiles_n + CLUSTER - 1) / CLUSTER;
#if CLUSTER_SHARE
  const int rank = (int)cluster_ctarank();
#else
  const int rank = 0;
#endif
  const int pid = blockIdx.x / CLUSTER, per_group = GROUP * slots_n;
  const int first_m = (pid / per_group) * GROUP, group_rows = min(tiles_m - first_m, GROUP);
  const int tile_m = first_m + (pid % per_group) % group_rows;
  const int tile_n = CLUSTER * ((pid % per_group) / group_rows) + rank;
  const int row0 = tile_m * BM, col0 = tile_n * BN;
  const int x_row0 = row0 + rank * X_ROWS;  // the X rows this CTA copies and compresses

  // This thread's part of every tile copy: 16 bytes at column copy_col of rows copy_row + i * COPY_STEP
  // of the tile. Which of those rows exist (row0 + r < M, col0 + r < N) is fixed for the whole K
  // loop: one bit per copy. Byte offsets are 32-bit from the tile's first row; a missing row, or a tile
  // past the last (see load_group), is a zero-fill copy from a valid address (no global read).
  constexpr int COPY_STEP = THREADS / (BK / 8), X_COPIES = X_ROWS / COPY_STEP, W_COPIES = BN / COPY_STEP;
  const int copy_row = tid / (BK / 8), copy_col = (tid % (BK / 8)) * 8;
  const u16* x_src = X + (size_t)x_row0 * K + copy_col;
  const u16* w_src = W + (size_t)col0 * K + copy_col;
  u32 x_rows = 0, w_rows = 0;
  u32 x_offset[X_COPIES], w_offset[W_COPIES];  // bytes
#pragma unroll
  for (int i = 0; i < W_COPIES; ++i) {
    const int r = copy_row + i * COPY_STEP;
    if (i < X_COPIES) {
      x_rows |= (u32)(r < M - x_row0) << i;
      x_offset[i] = r < M - x_row0 ? 2u * r * K : 0u;
    }
    w_rows |= (u32)(r < N - col0) << i;
    w_offset[i] = r < N - col0 ? 2u * r * K : 0u;
  }
  // Shared addresses of this thread's first copy in stage 0; the rest are constant offsets. COPY_STEP
  // is a multiple of 8 rows, so the swizzled chunk of the wgmma build's W copies is the same for all.
  const u32 x_dst = smem_addr(&sh.x[0][copy_row][copy_col]);
#if MAINLOOP_WGMMA
  static_assert(COPY_STEP % 8 == 0, "one swizzled chunk per thread");
  const u32 w_dst = smem_addr(&sh.w[0][0][0]) + sw128_offset(copy_row, copy_col / 8);
#else
  const u32 w_dst = smem_addr(&sh.w[0][copy_row][copy_col]);
#endif
  auto copy_rows = [&](u32 dst, u32 step_bytes, const u16* tile, const u32* offset, u32 rows, int count) {
    const char* bytes = reinterpret_cast<const char*>(tile);
#pragma unroll
    for (int i = 0; i < count; ++i) cp_async_16(dst + i * step_bytes, bytes + offset[i], (rows & (1u << i)) != 0);
  };
  // Commit group j holds X tile j and W tile j - 1: X runs one tile ahead, because tile kt + 1 is
  // compressed while the tensor cores work on tile kt. Tiles outside [0, k_tiles) are zero-filled
  // copies instead of branches, so that the main loop stays one basic block.
  const int k_tiles = K / BK;
  auto load_group = [&](int j) {
    const int xt = min(j, k_tiles - 1), wt = max(min(j - 1, k_tiles - 1), 0);
    copy_rows(x_dst + (j % STAGES) * (u32)sizeof(sh.x[0]), COPY_STEP * PITCH * 2, x_src + xt * BK, x_offset,
              j < k_tiles ? x_rows : 0u, X_COPIES);
    copy_rows(w_dst + ((j + STAGES - 1) % STAGES) * (u32)sizeof(sh.w[0]), COPY_STEP * W_PITCH * 2, w_src + wt * BK,
              w_offset, j >= 1 && j - 1 < k_tiles ? w_rows : 0u, W_COPIES);
    cp_async_commit();
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // The compressing role of this thread: 32 values of one row of the X tile (one k32 step), which
  // become 8 packed words and 2 metadata half-words of the compressed tile. crow is the row among
  // this CTA's X_ROWS, trow the row of the BM-row tile. With a cluster, only threads 0..127 (warps
  // 0-3, one on each scheduler) compress; the test is warp-uniform.
  const CompressRole role = compress_role(tid, rank);
  const int crow = role.crow, cstep = role.cstep, trow = role.trow, cslab = role.cslab, cr16 = role.cr16;
  const bool compressor = role.active;
#if CLUSTER_SHARE
  // The peer's copy of a shared variable is at its own address plus this offset in the cluster's
  // shared window (mapa maps addresses linearly).
  const u32 peer_offset = mapa_shared(smem_addr(&sh), rank ^ 1) - smem_addr(&sh);
#endif
  // Stores one word of the compressed tile, in this CTA and, with a cluster, in the peer.
  auto store_shared = [&](auto* p, auto value) {
    *p = value;
#if CLUSTER_SHARE
    st_cluster(smem_addr(p) + peer_offset, value);
#endif
  };
  RowStats stats = {0.0f, 0.0f, 0, 0};
  u32 packed[8], meta[2], key_max;
  float sum_total, sum_kept;
  auto chunk_of = [&](int kt) { return reinterpret_cast<const u32*>(&sh.x[kt % STAGES][0][0] + x_chunk_element(crow, cstep)); };
  auto compress_fast = [&](int kt) {
    const uint4* src = reinterpret_cast<const uint4*>(chunk_of(kt));
    uint4 v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = src[i];
    const u32 words[16] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w,
                           v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w};
#if TIMING_SKIP_SELECTION  // benchmark-only variant: keeps elements 0 and 1 of each group, no statistics
#pragma unroll
    for (int j = 0; j < 8; ++j) packed[j] = words[2 * j];
    meta[0] = meta[1] = 0x4444u;
#else
    compress_chunk_fast(words, packed, meta, key_max, sum_total, sum_kept);
#endif
  };
  auto compress_finish = [&](int kt) {
#if !TIMING_SKIP_SELECTION
    compress_chunk_finish(chunk_of(kt), packed, meta, key_max, sum_total, sum_kept, stats, norm_comp != 0);
#endif
    const int buf = kt & 1;
    // Groups 4-7 and their metadata first, then groups 0-3. In the SASS (NVRTC 12.9) these stores stay
    // in program order and the wgmma build's wait comes right after the last one; in the plain order
    // the ends of the statistics sums then fell after the wait, and ending with the half that is ready
    // first keeps them before it (test_fused_cuda.py checks that the wait ends the loop).
#pragma unroll
    for (int half = 1; half >= 0; --half) {
#pragma unroll
      for (int j = 4 * half; j < 4 * half + 4; ++j)
        store_shared(&sh.a[a_step_word(buf, cslab, cstep)] + a_store_offset(cr16, j), packed[j]);
      store_shared(&sh.meta[meta_store_half(buf, cslab, cstep, cr16, half)], (u16)meta[half]);
    }
  };

  // Prologue: groups 0 .. STAGES-1 in flight, then X tile 0 compressed.
#pragma unroll
  for (int j = 0; j < STAGES; ++j) load_group(j);
  cp_async_wait<STAGES - 1>();
  tile_sync();  // with a cluster also: the peer is running, so its shared memory may be written
  if (compressor) {
    compress_fast(0);
    compress_finish(0);
  }

  // One barrier per K tile. Iteration kt multiplies compressed tile kt (buffer kt % 2) by W tile kt
  // while the same warps compress X tile kt + 1 into the other buffer. The two are independent and,
  // up to compress_finish, in one basic block, so the scheduler interleaves the integer work of the
  // compression with the tensor-core instructions. The last iteration compresses the zero-filled
  // tile k_tiles, which adds nothing to the statistics and is never multiplied.
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // groups <= kt + 1 have landed: X tile kt + 1 and W tile kt
#if MAINLOOP_WGMMA
    fence_proxy_async();  // this thread's copies of W tile kt, visible to the wgmma (async proxy)
#endif
    // Also: compressed tile kt is complete, and every warp is done with W tile kt - 1 and with
    // compressed buffer (kt + 1) % 2, which this iteration refills (with a cluster: in both CTAs).
    tile_sync();
    load_group(kt + STAGES);  // X tile kt + STAGES and W tile kt + STAGES - 1, into freed stages

    const int buf = kt & 1, stage = kt % STAGES;
#if MAINLOOP_WGMMA
    // Both k32 steps of tile kt go to the tensor cores asynchronously; the warps compress tile
    // kt + 1 meanwhile and wait for the products only at the end of the iteration, before the next
    // barrier lets W stage kt be refilled.
    u32 a[KSTEPS][4], e[KSTEPS];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const uint4 frag = *reinterpret_cast<const uint4*>(&sh.a[a_load_word(buf, warp, ks, lane)]);
      a[ks][0] = frag.x; a[ks][1] = frag.y; a[ks][2] = frag.z; a[ks][3] = frag.w;
      e[ks] = reinterpret_cast<const u32*>(sh.meta)[meta_load_word(buf, warp, ks, lane)];
    }
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks)
      wgmma_sp<BN>(&acc[0][0][0], a[ks], sw128_desc(smem_addr(&sh.w[stage][0][0]) + ks * 64), e[ks]);
    wgmma_commit();
    if (compressor) {
      compress_fast(kt + 1);
      compress_finish(kt + 1);
    }
    wgmma_wait<0>();
#else
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      u32 a[MI][4], e[MI];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int slab = warp_m * MI + i;
        const uint4 frag = *reinterpret_cast<const uint4*>(&sh.a[a_load_word(buf, slab, ks, lane)]);
        a[i][0] = frag.x; a[i][1] = frag.y; a[i][2] = frag.z; a[i][3] = frag.w;
        e[i] = reinterpret_cast<const u32*>(sh.meta)[meta_load_word(buf, slab, ks, lane)];
      }
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        u32 b[4];
        ldmatrix_x4(b, &sh.w[stage][warp_n * WN + j * 8 + (lane & 7)][ks * 32 + (lane >> 3) * 8]);
#pragma unroll
        for (int i = 0; i < MI; ++i) mma_sp(acc[i][j], a[i], b, e[i]);
      }
      if (ks == 0) compress_fast(kt + 1);
    }
    compress_finish(kt + 1);
#endif
  }
  cp_async_wait<0>();
#if MAINLOOP_WGMMA
  // The accumulators were last written by asynchronous instructions: keep the epilogue's reads
  // after the final wgmma_wait.
#pragma unroll
  for (int j = 0; j < NI; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) asm volatile("" : "+f"(acc[0][j][c])::"memory");
#endif

  // ---- norm scale per row: combine the KSTEPS threads that compressed each row -----------------
  if (compressor) {
    RowStats st = stats;
#pragma unroll
    for (int offset = 1; offset < KSTEPS; offset <<= 1) {
      RowStats other;
      other.total = __shfl_xor_sync(0xffffffffu, st.total, offset);
      other.kept = __shfl_xor_sync(0xffffffffu, st.kept, offset);
      other.exponent = __shfl_xor_sync(0xffffffffu, st.exponent, offset);
      other.nonfinite = __shfl_xor_sync(0xffffffffu, st.nonfinite, offset);
      stats_combine(st, other);
    }
    if (cstep == 0) store_shared(&sh.scale[trow], norm_comp ? stats_scale(st) : 1.0f);
  }
  tile_sync();  // with a cluster, also the last access to the peer's shared memory

  // ---- epilogue: scale, low-rank term, bias, one rounding --------------------------------------
#pragma unroll
  for (int i = 0; i < MI; ++i) {
    const int r_lo = warp_m * WM + i * 16 + g;
    const float s_lo = sh.scale[r_lo], s_hi = sh.scale[r_lo + 8];
#pragma unroll
    for (int j = 0; j < NI; ++j) {
      acc[i][j][0] *= s_lo; acc[i][j][1] *= s_lo;
      acc[i][j][2] *= s_hi; acc[i][j][3] *= s_hi;
    }
  }
  if (T != nullptr) {
    for (int r0 = 0; r0 < R; r0 += 16) {
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int m_lo = row0 + warp_m * WM + i * 16 + g, m_hi = m_lo + 8;
        u32 a[4];
        a[0] = m_lo < M ? *reinterpret_cast<const u32*>(T + (size_t)m_lo * R + r0 + 2 * t) : 0u;
        a[1] = m_hi < M ? *reinterpret_cast<const u32*>(T + (size_t)m_hi * R + r0 + 2 * t) : 0u;
        a[2] = m_lo < M ? *reinterpret_cast<const u32*>(T + (size_t)m_lo * R + r0 + 2 * t + 8) : 0u;
        a[3] = m_hi < M ? *reinterpret_cast<const u32*>(T + (size_t)m_hi * R + r0 + 2 * t + 8) : 0u;
#pragma unroll
        for (int j = 0; j < NI; ++j) {
          const int n = col0 + warp_n * WN + j * 8 + g;
          u32 b[2];
          b[0] = n < N ? *reinterpret_cast<const u32*>(U + (size_t)n * R + r0 + 2 * t) : 0u;
          b[1] = n < N ? *reinterpret_cast<const u32*>(U + (size_t)n * R + r0 + 2 * t + 8) : 0u;
          mma_dense_k16(acc[i][j], a, b);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < NI; ++j) {
    const int n = col0 + warp_n * WN + j * 8 + 2 * t;
    if (n >= N) continue;
    float b0 = 0.0f, b1 = 0.0f;
    if (bias != nullptr) {
      b0 = to_float(bias[n]);
      b1 = to_float(bias[n + 1]);
    }
#pragma unroll
    for (int i = 0; i < MI; ++i) {
      const int m = row0 + warp_m * WM + i * 16 + g;
      if (m < M) *reinterpret_cast<u32*>(Y + (size_t)m * N + n) = pack2(acc[i][j][0] + b0, acc[i][j][1] + b1);
      if (m + 8 < M) *reinterpret_cast<u32*>(Y + (size_t)(m + 8) * N + n) = pack2(acc[i][j][2] + b0, acc[i][j][3] + b1);
    }
  }
}
