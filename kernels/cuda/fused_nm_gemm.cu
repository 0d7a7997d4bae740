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
// Per K tile the CTA (1) copies the X and W tiles to shared memory with cp.async (STAGES deep),
// (2) compresses the X tile once, all threads together, into the exact register image that the
// consumer warps' mma.sp A fragments and metadata need, so each warp loads them with one 16-byte and
// one 4-byte shared load per 16-row slab; (3) runs mma.sp against W fragments read by ldmatrix.
// The compressed operand never reaches global memory. Row statistics for the norm scale are
// accumulated by the compressing threads as they go.
//
// Layout facts this relies on (PTX ISA, "Matrix fragments for sparse mma.m16n8k32 .f16/.bf16"):
// - the compressed A fragment has the layout of the dense m16n8k16 A fragment applied to the 16x16
//   compressed matrix: lane (g = lane/4, t = lane%4) holds groups t and t+4 of rows g and g+8;
// - metadata: with sparsity selector 0, lanes t=0 and t=1 of each quad supply it; lane t holds the
//   nibbles of groups 4t..4t+3 of row g in bits 0-15 and of row g+8 in bits 16-31, each nibble
//   idx0 | idx1 << 2 with idx0 < idx1.

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

#define BK 64
#define THREADS 256
#define WARPS_M 2
#define WARPS_N 4
#define WM (BM / WARPS_M)
#define WN (BN / WARPS_N)
#define MI (WM / 16)
#define NI (WN / 8)
#define KSTEPS (BK / 32)
#define PITCH (BK + 8)  // elements per shared row: 144 bytes keeps ldmatrix and the compressor conflict-free

static_assert(BM * KSTEPS == THREADS, "one compressing thread per (row, k32 step) of the X tile");
static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be whole mma tiles");
static_assert((BM * (BK / 8)) % THREADS == 0 && (BN * (BK / 8)) % THREADS == 0, "whole 16-byte copies per thread");

#include "nm_compress.cuh"

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

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

struct SharedTiles {
  u16 x[STAGES][BM][PITCH];
  u16 w[STAGES][BN][PITCH];
  u32 a[BM / 16][KSTEPS][32][4];   // compressed A, in mma.sp fragment order
  u16 meta[BM / 16][KSTEPS][32][2];  // metadata words, lanes with t = 0, 1 used
  float scale[BM];
};
#ifdef SMEM_BYTES
static_assert(sizeof(SharedTiles) == SMEM_BYTES, "fused_cuda.TileConfig.smem_bytes must match SharedTiles");
#endif

extern "C" __global__ void __launch_bounds__(THREADS, 1)
fused_nm_gemm(const u16* __restrict__ X, const u16* __restrict__ W, const u16* __restrict__ bias,
              const u16* __restrict__ T, const u16* __restrict__ U, u16* __restrict__ Y, int M, int N, int K,
              int R, int norm_comp) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  SharedTiles& sh = *reinterpret_cast<SharedTiles*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int g = lane >> 2, t = lane & 3;

  // Grouped tile order: GROUP consecutive CTAs share W tiles in L2.
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int GROUP = 8;
  const int pid = blockIdx.x, per_group = GROUP * tiles_n;
  const int first_m = (pid / per_group) * GROUP, group_rows = min(tiles_m - first_m, GROUP);
  const int tile_m = first_m + (pid % per_group) % group_rows, tile_n = (pid % per_group) / group_rows;
  const int row0 = tile_m * BM, col0 = tile_n * BN;

  auto load_tile = [&](int stage, int kt) {
    const int k0 = kt * BK;
#pragma unroll
    for (int i = 0; i < BM * (BK / 8) / THREADS; ++i) {
      const int chunk = tid + i * THREADS, r = chunk / (BK / 8), c = (chunk % (BK / 8)) * 8;
      const bool ok = row0 + r < M;
      cp_async_16(&sh.x[stage][r][c], X + (size_t)(ok ? row0 + r : 0) * K + k0 + c, ok);
    }
#pragma unroll
    for (int i = 0; i < BN * (BK / 8) / THREADS; ++i) {
      const int chunk = tid + i * THREADS, r = chunk / (BK / 8), c = (chunk % (BK / 8)) * 8;
      const bool ok = col0 + r < N;
      cp_async_16(&sh.w[stage][r][c], W + (size_t)(ok ? col0 + r : 0) * K + k0 + c, ok);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int i = 0; i < MI; ++i)
#pragma unroll
    for (int j = 0; j < NI; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // The compressing role of this thread: one row of the X tile, one k32 step of each K tile.
  const int crow = tid / KSTEPS, cstep = tid % KSTEPS;
  const int cslab = crow / 16, cr16 = crow % 16;
  RowStats stats = {0.0f, 0.0f, 0, 0};

  const int k_tiles = K / BK;
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt has landed; every warp is done with the previous compressed tile
    if (kt + STAGES - 1 < k_tiles) load_tile((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const int stage = kt % STAGES;

    // ---- compress: 32 values of one row -> 8 packed words + 2 metadata half-words --------------
    {
      const uint4* src = reinterpret_cast<const uint4*>(&sh.x[stage][crow][cstep * 32]);
      uint4 v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = src[i];
      const u32 words[16] = {v[0].x, v[0].y, v[0].z, v[0].w, v[1].x, v[1].y, v[1].z, v[1].w,
                             v[2].x, v[2].y, v[2].z, v[2].w, v[3].x, v[3].y, v[3].z, v[3].w};
      u32 packed[8], meta[2];
#if TIMING_SKIP_SELECTION  // benchmark-only variant: keeps elements 0 and 1 of each group, no statistics
#pragma unroll
      for (int j = 0; j < 8; ++j) packed[j] = words[2 * j];
      meta[0] = meta[1] = 0x4444u;
#else
      compress_chunk(words, packed, meta, stats, norm_comp != 0);
#endif
#pragma unroll
      for (int j = 0; j < 8; ++j) sh.a[cslab][cstep][(cr16 % 8) * 4 + (j % 4)][(cr16 / 8) + 2 * (j / 4)] = packed[j];
#pragma unroll
      for (int h = 0; h < 2; ++h) sh.meta[cslab][cstep][(cr16 % 8) * 4 + h][cr16 / 8] = (u16)meta[h];
    }
    __syncthreads();  // the compressed tile is complete

    // ---- sparse tensor-core products -----------------------------------------------------------
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      u32 a[MI][4], e[MI];
#pragma unroll
      for (int i = 0; i < MI; ++i) {
        const int slab = warp_m * MI + i;
        const uint4 frag = *reinterpret_cast<const uint4*>(&sh.a[slab][ks][lane][0]);
        a[i][0] = frag.x; a[i][1] = frag.y; a[i][2] = frag.z; a[i][3] = frag.w;
        e[i] = *reinterpret_cast<const u32*>(&sh.meta[slab][ks][lane][0]);
      }
#pragma unroll
      for (int j = 0; j < NI; ++j) {
        u32 b[4];
        ldmatrix_x4(b, &sh.w[stage][warp_n * WN + j * 8 + (lane & 7)][ks * 32 + (lane >> 3) * 8]);
#pragma unroll
        for (int i = 0; i < MI; ++i) mma_sp(acc[i][j], a[i], b, e[i]);
      }
    }
  }
  cp_async_wait<0>();

  // ---- norm scale per row: combine the KSTEPS threads that compressed each row -----------------
  {
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
    if (cstep == 0) sh.scale[crow] = norm_comp ? stats_scale(st) : 1.0f;
  }
  __syncthreads();

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
