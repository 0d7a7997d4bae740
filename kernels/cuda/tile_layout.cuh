// The fused kernel's CTA geometry and the shared-memory layout of its tiles (fused_nm_gemm.cu).
//
// Every shared-memory index of the compression stage is computed here: which row and k32 step a
// thread compresses, where it reads them in the X tile, where it stores the packed words and the
// metadata of the compressed tile, and where the MMA warps load them back as mma.sp / wgmma.sp
// fragments. The kernel uses nothing else for these accesses. A host build of this header (LYNX_HOST,
// with the same -D defines as the NVRTC build) lets tests/kernels/test_fused_smem_banks.py list the
// byte addresses of a warp's 32 lanes for each of these instructions, count shared-memory wavefronts
// (bank conflicts), and check that every fragment register a lane loads is the word the PTX ISA's
// fragment layout puts there.
//
// Needs BM, BN, STAGES, MAINLOOP_WGMMA, CLUSTER_SHARE, and u16 / u32 / LYNX_FN (nm_compress.cuh).

#pragma once

#define CLUSTER (CLUSTER_SHARE ? 2 : 1)
#define X_ROWS (BM / CLUSTER)  // rows of the X tile this CTA copies and compresses
#define BK 64
#define THREADS 256
#define KSTEPS (BK / 32)
#define SLABS (BM / 16)  // 16-row slabs of the tile: one mma.sp A fragment per slab and k32 step
#define PITCH (BK + 8)   // elements per shared X row: 144 bytes keeps ldmatrix and the compressor's reads conflict-free
// W rows: with MAINLOOP_WGMMA 128 bytes, 128-byte swizzled (the layout the wgmma descriptor reads).
#define W_PITCH (MAINLOOP_WGMMA ? BK : PITCH)

// ---- the compressed tile --------------------------------------------------------------------------
//
// Per buffer, slab and k32 step, the A fragment of mma.sp.m16n8k32 (PTX ISA: lane (g = lane/4,
// t = lane%4) holds, in registers 0..3, groups t, t, t+4, t+4 of rows g, g+8, g, g+8) is 32 lanes x
// 4 registers: 128 words, each lane's 4 registers one 16-byte chunk, so that a lane loads them with
// one 16-byte load. The metadata is one word per lane (rows g and g+8 in the low and high half).
//
// The writers are the compressing threads: thread (row r16 of the slab, step s) holds the 8 packed
// words of its 32 values, word j going to lane (r16 % 8) * 4 + j % 4, register r16 / 8 + 2 * (j / 4),
// and 2 metadata half-words, h going to lane (r16 % 8) * 4 + h, half r16 / 8. A warp's 32 lanes are
// the 16 rows of one slab times both steps, so each store instruction writes one word into each of
// 8 lanes' chunks of each step.
//
// Bank conflicts (32 banks of 4 bytes, a wavefront per 128 bytes; test_fused_smem_banks.py counts
// them). In plain fragment order the 8 chunks a store reaches per step are those of lanes 4 q + j % 4
// (q = 0..7): only 2 of the 8 16-byte positions of a 128-byte bank row, and both steps write the
// same 2 words of each chunk, so 32 words fell on 4 banks, 8 wavefronts per store (64 per K tile);
// the two metadata stores were 2-way (both steps on the same 8 banks). Now:
// - A: lane L's chunk is L ^ ((L >> 3) & 3). The 8 lanes 4 q + c of a store sit on 8 different
//   positions, each store is 2 wavefronts (16 words per step on 16 banks, the two steps on the same
//   16), and the 8 lanes of each quarter-warp of the 16-byte load (L >> 3 fixed) are still on 8
//   different positions: 4 wavefronts per 512-byte load, its minimum. One wavefront per store needs
//   the two steps in different words of a chunk, i.e. step 1's registers rotated in its chunk. HMMA.SP
//   and HGMMA take A as an aligned register quad in order, so ptxas then adds register moves (tried:
//   the mma.sp loop's common path grew from 551 to 620 instructions). Without the moves, step 1
//   would have to multiply with its two k16 halves swapped, in W's shared layout and in the metadata
//   lanes as well; that changes the B operand, which no test without a GPU checks, so it is not done.
// - metadata: step s of a lane is word lane + 2 s of the slab's words. Only lanes t = 0, 1 of each
//   quad carry metadata (sparsity selector 0), so step 1's words of lanes t = 0, 1 are the unused
//   words of step 0's lanes t = 2, 3: a store is one wavefront (the two steps on different banks), a
//   load is still 32 consecutive words (one wavefront), the two loads differ by a constant, and
//   lanes t = 2, 3 load words nobody reads.
// Per compressing warp and K tile: 8 x 2 + 2 x 1 = 18 store wavefronts instead of 68.
#define A_STEP_WORDS 128
#define A_TILE_WORDS (SLABS * KSTEPS * A_STEP_WORDS)
#define META_SLAB_WORDS (KSTEPS * 32)
#define META_TILE_WORDS (SLABS * META_SLAB_WORDS)

// Lane and register of the A fragment that hold packed word j of row r16 of a slab.
LYNX_FN int a_frag_lane(int r16, int j) { return (r16 % 8) * 4 + j % 4; }
LYNX_FN int a_frag_reg(int r16, int j) { return r16 / 8 + 2 * (j / 4); }

// The 16-byte chunk of a step's 128 words that holds lane `lane`'s registers 0..3, in order.
LYNX_FN int a_chunk(int lane) { return lane ^ ((lane >> 3) & 3); }

LYNX_FN int a_step_word(int buf, int slab, int step) { return ((buf * SLABS + slab) * KSTEPS + step) * A_STEP_WORDS; }
// Packed word j of row r16 is stored at &sh.a[a_step_word(..)] + a_store_offset(r16, j), that is
// 4 * a_chunk(a_frag_lane(r16, j)) + a_frag_reg(r16, j) words into its step (the round-trip test
// checks it), written so that the compiler sees 4 per-thread offsets (j % 4) and an immediate for
// j / 4: with q = r16 % 8, a_chunk(4 q + j % 4) = 4 q + ((j % 4) ^ ((q >> 1) & 3)).
LYNX_FN int a_store_offset(int r16, int j) {
  const int q = r16 % 8;
  return 16 * q + 4 * ((j % 4) ^ ((q >> 1) & 3)) + r16 / 8 + 2 * (j / 4);
}
// Word index into SharedTiles::a of lane's chunk of a step (its 16-byte load).
LYNX_FN int a_load_word(int buf, int slab, int step, int lane) { return a_step_word(buf, slab, step) + 4 * a_chunk(lane); }

// Word index into SharedTiles::meta (as 32-bit words) of lane `lane`'s metadata register of `step`.
static_assert(KSTEPS == 2, "the metadata of step 1 fills the unused words of step 0");
LYNX_FN int meta_load_word(int buf, int slab, int step, int lane) {
  return (buf * SLABS + slab) * META_SLAB_WORDS + lane + 2 * step;
}
// Half-word index into SharedTiles::meta of metadata half-word h of row r16.
LYNX_FN int meta_store_half(int buf, int slab, int step, int r16, int h) {
  return 2 * meta_load_word(buf, slab, step, (r16 % 8) * 4 + h) + r16 / 8;
}

// ---- the compressing threads ----------------------------------------------------------------------
// Thread tid compresses k32 step cstep of row crow of this CTA's X_ROWS rows: 32 values, which become
// 8 packed words and 2 metadata half-words. trow is that row in the BM-row tile (with a cluster, this
// CTA's rows are rows rank * X_ROWS ..), cslab and cr16 its slab and its row in the slab. With a
// cluster only threads 0 .. X_ROWS * KSTEPS - 1 (warps 0-3) compress; the test is warp-uniform.
struct CompressRole {
  int crow, cstep, trow, cslab, cr16;
  bool active;
};
LYNX_FN CompressRole compress_role(int tid, int rank) {
  CompressRole c;
  c.crow = tid / KSTEPS;
  c.cstep = tid % KSTEPS;
  c.active = !CLUSTER_SHARE || c.crow < X_ROWS;
  c.trow = rank * X_ROWS + c.crow;
  c.cslab = c.trow / 16;
  c.cr16 = c.trow % 16;
  return c;
}
// Element offset, in one stage of the X tile, of the 32 values a compressing thread reads.
LYNX_FN int x_chunk_element(int crow, int cstep) { return crow * PITCH + cstep * 32; }

// W first: with MAINLOOP_WGMMA every W stage (BN x 128 bytes) is then 1024-byte aligned, as the
// 128-byte swizzle needs, once the base is (see SMEM_ALIGN).
struct SharedTiles {
  u16 w[STAGES][BN][W_PITCH];
  u16 x[STAGES][X_ROWS][PITCH];
  u32 a[2 * A_TILE_WORDS];            // compressed A, double-buffered: a_store_offset / a_load_word
  u16 meta[2 * 2 * META_TILE_WORDS];  // metadata, double-buffered: meta_store_half / meta_load_word
  float scale[BM];
};
