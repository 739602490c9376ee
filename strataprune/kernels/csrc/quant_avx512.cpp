// AVX-512 quantized kernels (F, BW, VL, VBMI, VBMI2, VNNI: Ice Lake, Sapphire Rapids, Zen 4 and later).
//
// Both kernels quantize nothing themselves: the input arrives as int8 (quant_api.cpp). The weights are
// int8 codes (bits 8) or nibbles (bits 4), which one `vpermt2b` turns into 64 code bytes in order
// (measured: 2x faster than unpacking each row's nibbles into a scratch buffer first, whose stores the
// expand loads then wait on). One 64-column vector of a row is one `vpexpandb` of the next
// popcount(mask) codes onto their columns; the expanded bytes are
// offset by 128 to unsigned (v + 128; 128 where the mask bit is clear), so that `vpdpbusd` (u8 x s8,
// 4 products summed per int32 lane) multiplies them with the signed input; the offset's share,
// 128 * sum(xq), depends on the input only and is subtracted per unit in int32, so each unit's sum is
// exact before it is scaled in fp32.
//
// GEMV (<= 4 tokens): R rows walked together, one accumulator per (row, token).
// GEMM: 16-row tiles; each 64-column vector of the 16 rows is expanded, then transposed (16 x 16
// dwords) into the VNNI layout (one zmm = 4 columns x 16 rows), held while every token of the call
// is multiplied with it: per token and 4 columns one `vpdpbusd` with a broadcast dword of the input.
#include "quant_kernels.h"

#if SP_X86
#include <immintrin.h>

#include <cstring>

#define SQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512vnni,avx2,fma,popcnt")))

namespace sp {
namespace {

// all-ones masks: the maskz forms of the intrinsics, because GCC 12 warns about the _mm512_undefined_*()
// inside the plain ones when they are inlined into a target-attributed function
constexpr __mmask16 all16 = 0xFFFF;
constexpr __mmask8 all8 = 0xFF;

SQ_AVX512 inline float hsum16(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

SQ_AVX512 inline uint64_t row_mask(const QPacked& w, int64_t n, int64_t b) {
  if (4 * b + 4 <= w.words) {
    uint64_t m;
    std::memcpy(&m, w.masks + n * w.words + 4 * b, 8);
    return m;
  }
  return mask64(w, n, b);
}

// 128 - zero, as bytes, for the 64 columns of vector b of row n (two groups when group == 32)
SQ_AVX512 inline __m512i zero_offsets(const QPacked& w, int64_t n, int64_t b) {
  const uint8_t* z = w.zeros + n * w.ngroups;
  if (w.group == 32) {
    const int64_t g0 = 2 * b, g1 = 2 * b + 1 < w.ngroups ? 2 * b + 1 : w.ngroups - 1;
    return _mm512_mask_blend_epi8(0xFFFFFFFF00000000ull, _mm512_set1_epi8(static_cast<char>(128 - z[g0])),
                                  _mm512_set1_epi8(static_cast<char>(128 - z[g1])));
  }
  return _mm512_set1_epi8(static_cast<char>(128 - z[(b * 64) >> w.group_shift]));
}

struct NibbleIndex {
  uint8_t lanes[2][64];  // [parity of the first code][lane j]: byte (parity + j) / 2, + 64 to take its high nibble
};

constexpr NibbleIndex make_nibble_index() {
  NibbleIndex t{};
  for (int parity = 0; parity < 2; ++parity)
    for (int j = 0; j < 64; ++j)
      t.lanes[parity][j] = static_cast<uint8_t>(((parity + j) >> 1) | (((parity + j) & 1) << 6));
  return t;
}

alignas(64) constexpr NibbleIndex kNibbles = make_nibble_index();

// codes [pos, pos + 64) as one byte each: bits 8: a load; bits 4: the nibbles of the 33 bytes that hold them,
// low and high nibbles as two byte vectors merged in order by one `vpermt2b`
template <int BITS>
SQ_AVX512 inline __m512i load_codes(const uint8_t* codes, int64_t pos) {
  if (BITS == 8) return _mm512_loadu_si512(codes + pos);
  const __m512i bytes = _mm512_loadu_si512(codes + (pos >> 1));
  const __m512i merged = _mm512_permutex2var_epi8(bytes, _mm512_load_si512(kNibbles.lanes[pos & 1]), _mm512_srli_epi16(bytes, 4));
  return _mm512_and_si512(merged, _mm512_set1_epi8(0x0F));  // one mask for both nibbles, after the merge
}

// the 64 offset codes (v + 128, 128 where the mask bit is clear) of vector b of row n; advances pos
template <int BITS>
SQ_AVX512 inline __m512i expand_vector(const QPacked& w, int64_t n, int64_t b, int64_t& pos) {
  uint64_t m = row_mask(w, n, b);
  __asm__("" : "+r"(m));  // see gemv_rows
  __m512i raw = load_codes<BITS>(w.codes, pos);
  __asm__("" : "+v"(raw));
  pos += popcount64(m);
  const __m512i e = _mm512_maskz_expand_epi8(m, raw);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  if (BITS == 8) return _mm512_xor_si512(e, c128);
  return _mm512_mask_add_epi8(c128, m, e, zero_offsets(w, n, b));
}

// The 1x4 block path of the GEMV (w.blocks): a 64-column vector is 16 blocks, block i = dword lane i, so the
// vector's 16 bits of the block index are the `vpexpandd` mask of the int8 codes' 4-byte units, or the `vpexpandw`
// mask of the int4 codes' 2-byte units, whose nibbles are then split in order by the `vpermt2b` of load_codes
// (a row's codes start at a multiple of 4, so at a whole byte). The lanes hold the bitmask path's bytes (v + 128;
// 128 where pruned), summed and scaled as there (gemv_rows with BLOCKS): the results are bit-identical.
template <int BITS>
SQ_AVX512 inline __m512i expand_blocks(uint32_t m, const uint8_t* codes, int64_t& pos) {
  if (BITS == 8) {
    __m512i raw = _mm512_loadu_si512(codes + pos);
    __asm__("" : "+v"(raw));  // as in gemv_rows: the memory form of the expand is slow
    pos += 4 * popcount(m);
    return _mm512_maskz_expand_epi32(static_cast<__mmask16>(m), raw);
  }
  __m512i raw = _mm512_loadu_si512(codes + (pos >> 1));
  __asm__("" : "+v"(raw));
  pos += 4 * popcount(m);
  const __m512i bytes = _mm512_maskz_expand_epi16(static_cast<__mmask32>(m), raw);  // words 16..31: zero
  const __m512i merged = _mm512_permutex2var_epi8(bytes, _mm512_load_si512(kNibbles.lanes[0]), _mm512_srli_epi16(bytes, 4));
  return _mm512_and_si512(merged, _mm512_set1_epi8(0x0F));
}

// BLOCKS: the vectors expanded from the block index (expand_blocks) instead of the mask: the same bytes
template <int BITS, int R, int T, bool BLOCKS>
SQ_AVX512 void gemv_rows(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t n0) {
  const int64_t vecs = (w.cols + 63) / 64, full = w.words / 4, vpu = w.unit >= 64 ? w.unit / 64 : 1;
  const int64_t ablocks = in.cols_pad / kActBlock;
  int64_t pos[R];
  const uint16_t* mrow[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    pos[r] = w.offsets[n0 + r];
    mrow[r] = w.masks + (n0 + r) * w.words;
  }
  // bits 4: zc[r] holds 128 - zero of the current unit's group (per vector when two groups share one)
  __m512i acc[R][T], corr[T], zc[R];
  __m512 facc[R][T];
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    zc[r] = BITS == 4 ? zero_offsets(w, n0 + r, 0) : c128;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      acc[r][t] = _mm512_setzero_si512();
      facc[r][t] = _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) corr[t] = _mm512_setzero_si512();
  const int8_t* xb = in.xq;
  const int32_t* qb = in.quad;
  for (int64_t b = 0; b < vecs; ++b, xb += 64, qb += 16) {
    __m512i xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      xv[t] = _mm512_loadu_si512(xb + t * in.cols_pad);
      corr[t] = _mm512_add_epi32(corr[t], _mm512_loadu_si512(qb + t * (in.cols_pad / 4)));
    }
    if constexpr (BLOCKS) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        uint16_t mb;
        std::memcpy(&mb, w.blocks + (n0 + r) * w.block_stride + 2 * b, 2);
        const __m512i e = expand_blocks<BITS>(mb, w.codes, pos[r]);
        if (BITS == 4 && w.unit == 32 && b > 0) zc[r] = zero_offsets(w, n0 + r, b);
        const __m512i u = BITS == 8 ? _mm512_xor_si512(e, c128) : _mm512_add_epi8(e, _mm512_mask_blend_epi32(mb, c128, zc[r]));
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
      }
    } else {
      uint64_t m[R];
      if (b < full) {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) std::memcpy(&m[r], mrow[r] + 4 * b, 8);
      } else {
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) m[r] = mask64(w, n0 + r, b);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        // empty asm: keep the mask in a register (GCC otherwise stores it and reloads it for kmov and popcnt) and
        // the codes in a vector register (GCC otherwise folds the load into vpexpandb, whose memory form is slow)
        __asm__("" : "+r"(m[r]));
        __m512i raw = load_codes<BITS>(w.codes, pos[r]);
        __asm__("" : "+v"(raw));
        const __m512i e = _mm512_maskz_expand_epi8(m[r], raw);
        pos[r] += popcount64(m[r]);
        if (BITS == 4 && w.unit == 32 && b > 0) zc[r] = zero_offsets(w, n0 + r, b);
        const __m512i u = BITS == 8 ? _mm512_xor_si512(e, c128) : _mm512_mask_add_epi8(c128, m[r], e, zc[r]);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
      }
    }
    if (((b + 1) & (vpu - 1)) == 0 || b == vecs - 1) {
      const int64_t g0 = w.unit == 32 ? 2 * b : (b * 64) >> w.group_shift;
      const int64_t g1 = w.unit == 32 && 2 * b + 1 < w.ngroups ? 2 * b + 1 : g0;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float* s = w.scales + (n0 + r) * w.ngroups;
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const float sx = in.sx[t * ablocks + b / 2];
          const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s[g0] * sx), _mm512_set1_ps(s[g1] * sx));
          const __m512i exact = _mm512_sub_epi32(acc[r][t], corr[t]);
          facc[r][t] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(all16, exact), scale, facc[r][t]);
          acc[r][t] = _mm512_setzero_si512();
        }
        if (BITS == 4 && w.unit > 32 && b + 1 < vecs) zc[r] = zero_offsets(w, n0 + r, b + 1);
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) corr[t] = _mm512_setzero_si512();
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) y[t * w.rows + n0 + r] = hsum16(facc[r][t]) + (bias ? bias[n0 + r] : 0.0f);
}

// int4 with 128-column units (group 128, or one scale per row): a 128-column step is 32 blocks, so one `vpexpandw`
// of its 32-bit block mask spreads 64 bytes of codes, which two `vpermt2b` split into the step's two 64-column vectors
// (per 64 columns half the expands and shifts of gemv_rows' block path); a last half step of 64 columns as there.
template <int R>
SQ_AVX512 void gemv1_block_rows_int4_128(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t n0) {
  const int64_t vecs = (w.cols + 63) / 64, steps = vecs / 2;
  const __m512i lo_index = _mm512_load_si512(kNibbles.lanes[0]);  // codes 0..63 from bytes 0..31 of the expanded units
  const __m512i hi_index = _mm512_add_epi8(lo_index, _mm512_set1_epi8(32));  // codes 64..127 from bytes 32..63
  const __m512i low4 = _mm512_set1_epi8(0x0F), c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t pos[R];
  const uint8_t* brow[R];
  __m512 facc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    pos[r] = w.offsets[n0 + r];
    brow[r] = w.blocks + (n0 + r) * w.block_stride;
    facc[r] = _mm512_setzero_ps();
  }
  for (int64_t st = 0; st < steps; ++st) {
    const __m512i x0 = _mm512_loadu_si512(in.xq + 128 * st), x1 = _mm512_loadu_si512(in.xq + 128 * st + 64);
    const __m512i corr = _mm512_add_epi32(_mm512_loadu_si512(in.quad + 32 * st), _mm512_loadu_si512(in.quad + 32 * st + 16));
    const int64_t g = (st * 128) >> w.group_shift;
    const float sx = in.sx[st];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint32_t m;
      std::memcpy(&m, brow[r] + 4 * st, 4);
      __asm__("" : "+r"(m));
      __m512i raw = _mm512_loadu_si512(w.codes + (pos[r] >> 1));
      __asm__("" : "+v"(raw));
      pos[r] += 4 * popcount(m);
      const __m512i e = _mm512_maskz_expand_epi16(m, raw);
      const __m512i high = _mm512_srli_epi16(e, 4);
      const __m512i c0 = _mm512_and_si512(_mm512_permutex2var_epi8(e, lo_index, high), low4);
      const __m512i c1 = _mm512_and_si512(_mm512_permutex2var_epi8(e, hi_index, high), low4);
      const __m512i zc = _mm512_set1_epi8(static_cast<char>(128 - w.zeros[(n0 + r) * w.ngroups + g]));
      const __m512i u0 = _mm512_add_epi8(c0, _mm512_mask_blend_epi32(static_cast<__mmask16>(m), c128, zc));
      const __m512i u1 = _mm512_add_epi8(c1, _mm512_mask_blend_epi32(static_cast<__mmask16>(m >> 16), c128, zc));
      const __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, x0), u1, x1);
      const __m512 scale = _mm512_set1_ps(w.scales[(n0 + r) * w.ngroups + g] * sx);
      facc[r] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(all16, _mm512_sub_epi32(acc, corr)), scale, facc[r]);
    }
  }
  if (vecs % 2) {  // the last 64 columns, a unit of their own
    const int64_t b = vecs - 1, g = (b * 64) >> w.group_shift;
    const __m512i xv = _mm512_loadu_si512(in.xq + 64 * b), corr = _mm512_loadu_si512(in.quad + 16 * b);
    const float sx = in.sx[b / 2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint16_t m;
      std::memcpy(&m, brow[r] + 2 * b, 2);
      const __m512i e = expand_blocks<4>(m, w.codes, pos[r]);
      const __m512i u = _mm512_add_epi8(e, _mm512_mask_blend_epi32(m, c128, zero_offsets(w, n0 + r, b)));
      const __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, xv);
      const __m512 scale = _mm512_set1_ps(w.scales[(n0 + r) * w.ngroups + g] * sx);
      facc[r] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(all16, _mm512_sub_epi32(acc, corr)), scale, facc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) y[n0 + r] = hsum16(facc[r]) + (bias ? bias[n0 + r] : 0.0f);
}

template <int BITS, int R, int T>
SQ_AVX512 void gemv_range(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  int64_t n = r0;
  if (w.blocks && block_path_enabled()) {
    for (; n + R <= r1; n += R) gemv_rows<BITS, R, T, true>(w, in, bias, y, n);
    for (; n < r1; ++n) gemv_rows<BITS, 1, T, true>(w, in, bias, y, n);
    return;
  }
  for (; n + R <= r1; n += R) gemv_rows<BITS, R, T, false>(w, in, bias, y, n);
  for (; n < r1; ++n) gemv_rows<BITS, 1, T, false>(w, in, bias, y, n);
}

template <int BITS>
SQ_AVX512 void gemv(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  switch (in.tokens) {
    case 1:
      if (BITS == 4 && w.unit == 128 && w.blocks && block_path_enabled()) {
        int64_t n = r0;
        for (; n + 4 <= r1; n += 4) gemv1_block_rows_int4_128<4>(w, in, bias, y, n);
        for (; n < r1; ++n) gemv1_block_rows_int4_128<1>(w, in, bias, y, n);
      } else {
        gemv_range<BITS, 4, 1>(w, in, bias, y, r0, r1);  // the block path there too (gemv_rows' BLOCKS)
      }
      break;
    case 2: gemv_range<BITS, 4, 2>(w, in, bias, y, r0, r1); break;
    case 3: gemv_range<BITS, 2, 3>(w, in, bias, y, r0, r1); break;
    case 4: gemv_range<BITS, 2, 4>(w, in, bias, y, r0, r1); break;
    default: break;
  }
}

// 16 x 16 dwords: out[c] lane i = in[i] lane c (each dword: 4 consecutive columns of one row)
SQ_AVX512 inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_maskz_unpacklo_epi32(all16, r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_maskz_unpackhi_epi32(all16, r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    b[4 * i + 0] = _mm512_maskz_unpacklo_epi64(all8, a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_maskz_unpackhi_epi64(all8, a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_maskz_unpacklo_epi64(all8, a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_maskz_unpackhi_epi64(all8, a[4 * i + 1], a[4 * i + 3]);
  }
  // b[4 i + j], 128-bit lane L: rows 4 i .. 4 i + 3 of dword column 4 L + j
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_maskz_shuffle_i32x4(all16, b[j], b[4 + j], 0x44), c1 = _mm512_maskz_shuffle_i32x4(all16, b[j], b[4 + j], 0xEE);
    const __m512i c2 = _mm512_maskz_shuffle_i32x4(all16, b[8 + j], b[12 + j], 0x44), c3 = _mm512_maskz_shuffle_i32x4(all16, b[8 + j], b[12 + j], 0xEE);
    r[j] = _mm512_maskz_shuffle_i32x4(all16, c0, c2, 0x88);
    r[4 + j] = _mm512_maskz_shuffle_i32x4(all16, c0, c2, 0xDD);
    r[8 + j] = _mm512_maskz_shuffle_i32x4(all16, c1, c3, 0x88);
    r[12 + j] = _mm512_maskz_shuffle_i32x4(all16, c1, c3, 0xDD);
  }
}

// tokens [t0, t0 + TT): ytile[t] += (sum over the unit's 4-column blocks wt[k4] . x[t][k0 + 4 k4] - correction) * scale
template <int TT>
SQ_AVX512 inline void gemm_tokens(const QInput& in, const __m512i* wt, int64_t steps, int64_t k0, __m512 scale,
                                  int64_t t0, float* ytile) {
  const int64_t ablocks = in.cols_pad / kActBlock, blocks32 = in.cols_pad / 32;
  __m512i acc[TT];
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) acc[t] = _mm512_setzero_si512();
  const int8_t* x = in.xq + t0 * in.cols_pad + k0;
  for (int64_t k4 = 0; k4 < steps; ++k4) {
    const __m512i wv = _mm512_load_si512(wt + k4);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      int32_t word;
      std::memcpy(&word, x + t * in.cols_pad + 4 * k4, 4);
      acc[t] = _mm512_dpbusd_epi32(acc[t], wv, _mm512_set1_epi32(word));
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t) {
    const int32_t* blk = in.block + (t0 + t) * blocks32 + k0 / 32;
    int32_t correction = 0;
    for (int64_t c = 0; c < steps / 8; ++c) correction += blk[c];
    const __m512 f = _mm512_maskz_cvtepi32_ps(all16, _mm512_sub_epi32(acc[t], _mm512_set1_epi32(correction)));
    const __m512 s = _mm512_mul_ps(scale, _mm512_set1_ps(in.sx[(t0 + t) * ablocks + k0 / kActBlock]));
    float* out = ytile + (t0 + t) * 16;
    _mm512_store_ps(out, _mm512_fmadd_ps(f, s, _mm512_load_ps(out)));
  }
}

template <int BITS>
SQ_AVX512 void gemm(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  const int64_t span = w.unit > 64 ? w.unit : 64;  // columns decoded at once
  const int64_t tokens = in.tokens;
  uint8_t* mem = quant_scratch(1, static_cast<size_t>(tokens * 64 + 4096));
  float* ytile = reinterpret_cast<float*>(mem);
  __m512i* wt = reinterpret_cast<__m512i*>(reinterpret_cast<uint8_t*>(ytile) + tokens * 64);
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n0 = r0; n0 < r1; n0 += 16) {
    const int64_t nr = r1 - n0 < 16 ? r1 - n0 : 16;
    const __mmask16 live = static_cast<__mmask16>((1u << nr) - 1u);
    int64_t pos[16];
    for (int64_t i = 0; i < nr; ++i) pos[i] = w.offsets[n0 + i];
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
    for (int64_t t = 0; t < tokens; ++t) _mm512_store_ps(ytile + t * 16, b0);
    for (int64_t k0 = 0; k0 < w.cols; k0 += span) {
      for (int64_t v = 0; v < span / 64; ++v) {
        const int64_t b = k0 / 64 + v;
        __m512i rows[16];
        for (int64_t i = 0; i < 16; ++i)
          rows[i] = (i < nr && 64 * b < w.cols) ? expand_vector<BITS>(w, n0 + i, b, pos[i]) : c128;
        transpose16(rows);
#pragma GCC unroll 16
        for (int c = 0; c < 16; ++c) _mm512_store_si512(wt + 16 * v + c, rows[c]);
      }
      for (int64_t j = 0; j < span / w.unit; ++j) {
        const int64_t ku = k0 + j * w.unit;
        if (ku >= w.cols) break;
        alignas(64) float s[16] = {0};
        for (int64_t i = 0; i < nr; ++i) s[i] = w.scales[(n0 + i) * w.ngroups + (ku >> w.group_shift)];
        const __m512 scale = _mm512_load_ps(s);
        const __m512i* wu = wt + j * (w.unit / 4);
        int64_t t = 0;
        for (; t + 8 <= tokens; t += 8) gemm_tokens<8>(in, wu, w.unit / 4, ku, scale, t, ytile);
        for (; t < tokens; ++t) gemm_tokens<1>(in, wu, w.unit / 4, ku, scale, t, ytile);
      }
    }
    for (int64_t t = 0; t < tokens; ++t) _mm512_mask_storeu_ps(y + t * w.rows + n0, live, _mm512_load_ps(ytile + t * 16));
  }
}

}  // namespace

SQ_AVX512 void qgemv_avx512(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) gemv<8>(w, in, bias, y, r0, r1); else gemv<4>(w, in, bias, y, r0, r1);
}

SQ_AVX512 void qgemm_avx512(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) gemm<8>(w, in, bias, y, r0, r1); else gemm<4>(w, in, bias, y, r0, r1);
}

}  // namespace sp
#endif
