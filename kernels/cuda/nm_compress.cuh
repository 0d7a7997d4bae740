// 2:4 compression of 32 consecutive values of one row, and the per-row norm-compensation statistics.
//
// Shared by the fused GEMM (compiled by NVRTC for the GPU) and by a host build that the test suite
// compiles with the system C++ compiler, so that the selection, tie and NaN rules and the scale are
// checked bit for bit against kernels/reference.py on a machine with no GPU.
//
// IS_BF16 selects bf16 (1) or fp16 (0) bit patterns; values travel as raw 16-bit words.

#ifdef LYNX_HOST
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#define LYNX_FN inline
typedef uint32_t u32;
typedef uint16_t u16;
typedef uint64_t u64;
static inline float lynx_bits_to_float(u32 b) { float f; std::memcpy(&f, &b, 4); return f; }
static inline u32 lynx_float_to_bits(float f) { u32 b; std::memcpy(&b, &f, 4); return b; }
static inline int lynx_ffs(u32 x) { return __builtin_ffs((int)x); }
static inline int lynx_clz(u32 x) { return __builtin_clz(x); }
// CUDA's __byte_perm for selectors with no sign-replicate bits: byte k of the result is byte
// (selector >> 4k) & 7 of the 64-bit value (hi:lo).
static inline u32 lynx_byte_perm(u32 lo, u32 hi, u32 selector) {
  const u64 bytes = (u64)lo | ((u64)hi << 32);
  u32 out = 0;
  for (int k = 0; k < 4; ++k) out |= (u32)((bytes >> (8 * ((selector >> (4 * k)) & 7u))) & 0xFFu) << (8 * k);
  return out;
}
using std::max;
using std::min;
using std::sqrt;
#else
#define LYNX_FN __device__ __forceinline__
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;
#define lynx_bits_to_float __uint_as_float
#define lynx_float_to_bits __float_as_uint
#define lynx_ffs __ffs
#define lynx_clz __clz
#define lynx_byte_perm __byte_perm
#endif

#if IS_BF16
#define INF_BITS 0x7F80u
LYNX_FN float to_float(u32 bits16) { return lynx_bits_to_float(bits16 << 16); }
#else
#define INF_BITS 0x7C00u
LYNX_FN float to_float(u32 bits16) {
#ifdef LYNX_HOST
  const u32 sign = (bits16 & 0x8000u) << 16, exp = (bits16 >> 10) & 0x1Fu, man = bits16 & 0x3FFu;
  if (exp == 0x1Fu) return lynx_bits_to_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    const float f = (float)man * 5.9604644775390625e-08f;  // subnormal: man * 2^-24
    return sign ? -f : f;
  }
  return lynx_bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
#else
  float f;
  asm("{ .reg .b16 h; cvt.u16.u32 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(bits16));
  return f;
#endif
}
#endif

// Exact rule, used for groups that hold NaN or Inf: every NaN maps to one key above Inf, so NaNs tie
// among themselves and the lower index wins, as in the reference. Returns the two kept values
// packed (lower index in the low half) and the metadata nibble idx0 | idx1 << 2 (idx0 < idx1).
LYNX_FN u32 select_2_of_4_exact(u32 w0, u32 w1, u32& nibble) {
  const u32 k0 = min(w0 & 0x7FFFu, INF_BITS + 1), k1 = min((w0 >> 16) & 0x7FFFu, INF_BITS + 1);
  const u32 k2 = min(w1 & 0x7FFFu, INF_BITS + 1), k3 = min((w1 >> 16) & 0x7FFFu, INF_BITS + 1);
  // i beats j (i < j) when k_i >= k_j; an element is kept when fewer than two others beat it.
  const u32 a = k0 >= k1, b = k0 >= k2, c = k0 >= k3, d = k1 >= k2, e = k1 >= k3, f = k2 >= k3;
  const u32 lost0 = (a ^ 1) + (b ^ 1) + (c ^ 1), lost1 = a + (d ^ 1) + (e ^ 1), lost2 = b + d + (f ^ 1),
            lost3 = c + e + f;
  const u32 mask = (lost0 < 2) | ((lost1 < 2) << 1) | ((lost2 < 2) << 2) | ((lost3 < 2) << 3);
  const u32 idx0 = lynx_ffs(mask) - 1, idx1 = 31 - lynx_clz(mask);
  nibble = idx0 | (idx1 << 2);
  const u64 group = (u64)w0 | ((u64)w1 << 32);
  return (u32)((group >> (16 * idx0)) & 0xFFFFu) | ((u32)((group >> (16 * idx1)) & 0xFFFFu) << 16);
}

// Fast rule for finite groups. Each value gets a 32-bit key, [0 | 15-bit magnitude | 14 zero bits |
// 3 - index]: keys are unique within a group and order by magnitude and then by lower index, so the
// top two are seven integer min/max. Their low bits name the two kept positions, which give both the
// metadata nibble and the byte selector that gathers the two values with one byte permute (cheaper
// than a key that carries the value and has to be unpacked; benchmarks/NOTES.md has the counts).
LYNX_FN u32 select_2_of_4_fast(u32 w0, u32 w1, u32& nibble, u32& top) {
  const u32 k0 = ((w0 << 16) & 0x7FFF0000u) | 3u, k1 = (w0 & 0x7FFF0000u) | 2u;
  const u32 k2 = ((w1 << 16) & 0x7FFF0000u) | 1u, k3 = (w1 & 0x7FFF0000u);
  const u32 hi01 = max(k0, k1), lo01 = min(k0, k1), hi23 = max(k2, k3), lo23 = min(k2, k3);
  top = max(hi01, hi23);
  const u32 second = max(min(hi01, hi23), max(lo01, lo23));
  // c = 3 - index, so the larger c is the lower index.
  const u32 c_top = top & 3u, c_second = second & 3u;
  const u32 c_first = max(c_top, c_second), c_last = min(c_top, c_second);
  nibble = 15u - c_first - 4u * c_last;  // (3 - c_first) | (3 - c_last) << 2
  // Bytes 2i and 2i+1 of (w1:w0) hold value i: gather value 3 - c_first low, 3 - c_last high.
  const u32 selector = (0x1010u + 0x66u + 0x6600u) - 0x22u * c_first - 0x2200u * c_last;
  return lynx_byte_perm(w0, w1, selector);
}

// Running statistics of one row for s = ||x|| / ||S(x)||: sums of (x * 2^-e)^2. e starts at 0 (raw
// squares, the common case: no multiply) and moves only when a chunk's largest magnitude leaves
// [2^-50, 2^50], so neither overflow nor underflow can change the ratio.
struct RowStats {
  float total, kept;
  int exponent;
  int nonfinite;
};

LYNX_FN float pow2(int e) { return lynx_bits_to_float((u32)(127 + e) << 23); }

// Moves the sums to exponent ``exponent``. Moving down only happens while the sums are still zero.
LYNX_FN void stats_rescale(RowStats& st, int exponent) {
  const int shift = max(-64, min(st.exponent - exponent, 63));
  const float f = shift == -64 ? 0.0f : pow2(shift) * pow2(shift);
  st.total *= f;
  st.kept *= f;
  st.exponent = exponent;
}

LYNX_FN int exponent_of_magnitude(u32 key) {
  const int e = (int)((lynx_float_to_bits(to_float(key)) >> 23) & 0xFF) - 127;
  return max(-126, min(e, 126));
}

LYNX_FN void stats_combine(RowStats& st, RowStats other) {
  const int common = max(st.exponent, other.exponent);
  if (st.exponent != common) stats_rescale(st, common);
  if (other.exponent != common) stats_rescale(other, common);
  st.total += other.total;
  st.kept += other.kept;
  st.nonfinite |= other.nonfinite;
}

LYNX_FN float stats_scale(const RowStats& st) {
  return (!st.nonfinite && st.kept > 0.0f) ? sqrt(st.total / st.kept) : 1.0f;
}

// Sums of squares of a chunk's 32 values and of its 16 kept values, each multiplied by ``unit``.
template <bool SCALED>
LYNX_FN void chunk_sums(const u32* words, const u32* packed, float unit, float& total, float& kept) {
  total = 0.0f;
  kept = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    float x0 = to_float(words[i] & 0xFFFFu), x1 = to_float(words[i] >> 16);
    if (SCALED) x0 *= unit, x1 *= unit;
    total = fmaf(x0, x0, fmaf(x1, x1, total));
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float y0 = to_float(packed[j] & 0xFFFFu), y1 = to_float(packed[j] >> 16);
    if (SCALED) y0 *= unit, y1 *= unit;
    kept = fmaf(y0, y0, fmaf(y1, y1, kept));
  }
}

// Magnitude bits of 2^51 and 2^-50: outside [2^-50, 2^51) the raw sums of squares may leave fp32's range.
#if IS_BF16
#define RAW_SUMS_HI 0x5900u
#define RAW_SUMS_LO 0x2680u
#else
#define RAW_SUMS_HI INF_BITS  // every finite fp16 value is in range
#define RAW_SUMS_LO 0u
#endif

// Compression of 32 values (16 words, two per word, element 2i in the low half of word i) into 8
// packed words (group j: its two kept values) and 2 metadata half-words (groups 4h..4h+3, nibble j%4
// at bit 4*(j%4)), split in two so that the fused kernel can interleave the first part with its
// tensor-core instructions:
// - compress_chunk_fast has no branches: fast selection, the largest magnitude and the raw sums;
// - compress_chunk_finish adds the sums to the row statistics, and takes a branch only in the rare
//   cases (NaN or Inf in the chunk: exact selection again; magnitudes outside [2^-50, 2^51) or a row
//   already rescaled: scaled sums). It reads ``words`` again only in those cases.
LYNX_FN void compress_chunk_fast(const u32* words, u32* packed, u32* meta, u32& key_max, float& total,
                                 float& kept) {
  u32 top_max = 0;
  meta[0] = meta[1] = 0u;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    u32 nibble, top;
    packed[j] = select_2_of_4_fast(words[2 * j], words[2 * j + 1], nibble, top);
    top_max = max(top_max, top);
    meta[j / 4] |= nibble << (4 * (j % 4));
  }
  key_max = top_max >> 16;
  chunk_sums<false>(words, packed, 1.0f, total, kept);
}

// SASS_COMMON_PATH (instruction-count builds of benchmarks/sass_counts.py only; wrong results for
// NaN/Inf and extreme magnitudes) compiles out the rare branches, so that a static count of the
// fused kernel's main loop is the count of its common path.
#ifndef SASS_COMMON_PATH
#define SASS_COMMON_PATH 0
#endif

LYNX_FN void compress_chunk_finish(const u32* words, u32* packed, u32* meta, u32 key_max, float total,
                                   float kept, RowStats& st, bool norm_comp) {
  if (!SASS_COMMON_PATH) {
    if (key_max >= INF_BITS) {  // NaN or Inf in the chunk: redo with the exact rule; the row's scale is 1
      st.nonfinite = 1;
      meta[0] = meta[1] = 0u;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        u32 nibble;
        packed[j] = select_2_of_4_exact(words[2 * j], words[2 * j + 1], nibble);
        meta[j / 4] |= nibble << (4 * (j % 4));
      }
      return;
    }
    const bool raw = st.exponent == 0 && key_max < RAW_SUMS_HI && (key_max >= RAW_SUMS_LO || st.total != 0.0f);
    if (!raw) {  // the raw sums (the common case) cannot be used: rescale, then scaled sums
      if (!norm_comp || st.nonfinite || key_max == 0) return;
      const int e = exponent_of_magnitude(key_max);
      if (st.total == 0.0f && st.exponent == 0 && e < -50) stats_rescale(st, e);  // a row of tiny values
      if (e > st.exponent + 50) stats_rescale(st, e);
      chunk_sums<true>(words, packed, pow2(-st.exponent), total, kept);
    }
  }
  st.total += total;
  st.kept += kept;
}

LYNX_FN void compress_chunk(const u32* words, u32* packed, u32* meta, RowStats& st, bool norm_comp) {
  u32 key_max;
  float total, kept;
  compress_chunk_fast(words, packed, meta, key_max, total, kept);
  compress_chunk_finish(words, packed, meta, key_max, total, kept, st, norm_comp);
}
