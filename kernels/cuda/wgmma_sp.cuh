// sm_90a warpgroup sparse MMA (wgmma.mma_async.sp) for the fused kernel's MAINLOOP_WGMMA build.
//
// A (the compressed X) comes from registers, B (W) from shared memory through a matrix descriptor.
// Facts this relies on (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate", checked
// against the CuTe layouts SM90::GMMA::ALayout_64x32 and ELayout_64x32 of the CUTLASS 4.2 headers):
// - per warp w of the warpgroup, the register A operand of m64nNk32 (sparse, 16-bit) covers rows
//   16w .. 16w+15 in exactly the layout of the mma.sp m16n8k32 A fragment, and the metadata register
//   in exactly the layout of mma.sp m16n8k32 with sparsity selector 0. The compressed tile that the
//   mma.sync build writes to shared memory is therefore also the wgmma operand, unchanged;
// - the f32 accumulators of m64nN, per warp, repeat the m16n8 C fragment over the N/8 column blocks,
//   so acc[0][j][0..3] of the kernel's [MI][NI][4] array is register 4j..4j+3;
// - B is K-major with the 128-byte swizzle: row n of the W tile is 128 bytes (64 values of K), its
//   16-byte chunk c stored at chunk c ^ (n % 8), 8-row groups 1024 bytes apart (the stride byte
//   offset), the tile 1024-byte aligned. The second k32 step starts 64 bytes into the rows; the
//   hardware applies the swizzle to the absolute address, which is why the alignment matters.

#pragma once

// Byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile of 128-byte rows.
__device__ __forceinline__ u32 sw128_offset(int row, int chunk) {
  return (u32)row * 128u + (u32)((chunk ^ (row & 7)) * 16);
}

// Descriptor of a K-major, 128-byte-swizzled operand starting at shared byte address `addr`:
// start address >> 4 in bits 0-13, leading byte offset 1 (unused by swizzled K-major layouts) in
// bits 16-29, stride byte offset 1024 >> 4 in bits 32-45, base offset 0, layout type 1 (128B swizzle)
// in bits 62-63.
__device__ __forceinline__ u64 sw128_desc(u32 addr) {
  return (u64)((addr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// cp.async writes shared memory through the generic proxy; wgmma reads it through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The accumulator operands d[i .. i+63] (as "+f" constraints) and the names of the first 128.
#define WGMMA_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define WGMMA_ACC16(i) WGMMA_ACC4(i), WGMMA_ACC4(i + 4), WGMMA_ACC4(i + 8), WGMMA_ACC4(i + 12)
#define WGMMA_ACC64(i) WGMMA_ACC16(i), WGMMA_ACC16(i + 16), WGMMA_ACC16(i + 32), WGMMA_ACC16(i + 48)
#define WGMMA_D_0_63                                                   \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"             \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"   \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"   \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define WGMMA_D_64_127                                                                \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"                  \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"                  \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"      \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
// After the accumulators: A (4 registers), the B descriptor, the metadata, and 1 for scale-d
// (accumulate), which becomes the predicate p.
#define WGMMA_INPUTS "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(e), "r"(1)
#define WGMMA_SP_OP(n) "wgmma.mma_async.sp.sync.aligned.m64n" #n "k32.f32." MMA_TYPE "." MMA_TYPE " "

// d += A (compressed, registers) x B (descriptor); metadata e, sparsity selector 0.
__device__ __forceinline__ void wgmma_sp_n128(float* d, const u32* a, u64 desc_b, u32 e) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %70, 0;\n" WGMMA_SP_OP(128)
               "{" WGMMA_D_0_63 "}, {%64,%65,%66,%67}, %68, %69, 0, p, 1, 1, 0;\n}\n"
               : WGMMA_ACC64(0)
               : WGMMA_INPUTS);
}

__device__ __forceinline__ void wgmma_sp_n256(float* d, const u32* a, u64 desc_b, u32 e) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %134, 0;\n" WGMMA_SP_OP(256)
               "{" WGMMA_D_0_63 "," WGMMA_D_64_127 "}, {%128,%129,%130,%131}, %132, %133, 0, p, 1, 1, 0;\n}\n"
               : WGMMA_ACC64(0), WGMMA_ACC64(64)
               : WGMMA_INPUTS);
}

template <int N_TILE>
__device__ __forceinline__ void wgmma_sp(float* d, const u32* a, u64 desc_b, u32 e) {
  static_assert(N_TILE == 128 || N_TILE == 256, "the wgmma build has 128- or 256-wide N tiles");
  if constexpr (N_TILE == 256) wgmma_sp_n256(d, a, desc_b, e);
  else wgmma_sp_n128(d, a, desc_b, e);
}
