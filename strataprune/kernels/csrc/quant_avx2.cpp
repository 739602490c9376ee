// AVX2 quantized kernels, in two builds of the same templates: with AVX-VNNI (`vpdpbusd` on ymm: Alder
// Lake, Sapphire Rapids, Zen 5) and without (`vpmaddubsw` + `vpmaddwd`).
//
// AVX2 has no byte expand: each 8-column mask byte selects, from a 256-entry table, the `vpshufb`
// control that moves the next popcount(m) codes onto their columns (0x80, i.e. zero, elsewhere); a
// 16-column mask word is one shuffle of two 8-byte loads. 32 columns make one ymm.
// With VNNI the codes are offset to unsigned (v + 128) as in the AVX-512 file and the offset's share is
// subtracted per unit; without, the signed codes use the sign trick: |v| (u8) times sign(v) * xq (s8),
// whose pairwise sums (<= 2 * 127 * 127) cannot saturate `vpmaddubsw`'s int16.
// GEMM: 8-row tiles, each 32-column vector transposed (8 x 8 dwords) into the VNNI layout.
#include "quant_kernels.h"

#if SP_X86
#include <immintrin.h>

#include <unistd.h>

#include <atomic>
#include <new>
#include <cstring>

#define SQ_AVX2 __attribute__((target("avx2,fma,popcnt")))
#define SQ_AVX2_VNNI __attribute__((target("avx2,fma,popcnt,avxvnni")))

namespace sp {
namespace {

struct ShuffleTables {
  uint8_t lo[256][8];  // lane j of mask m takes code popcount(m & ((1 << j) - 1)); 0x80 (zero) where bit j is clear
  uint8_t hi[256][8];  // the same + 8: the second 8 bytes of the shuffle source
};

constexpr ShuffleTables make_shuffle_tables() {
  ShuffleTables t{};
  for (int m = 0; m < 256; ++m) {
    int seen = 0;
    for (int j = 0; j < 8; ++j) {
      const bool set = (m >> j) & 1;
      t.lo[m][j] = set ? static_cast<uint8_t>(seen) : 0x80;
      t.hi[m][j] = set ? static_cast<uint8_t>(seen + 8) : 0x80;
      seen += set;
    }
  }
  return t;
}

alignas(64) constexpr ShuffleTables kShuffle = make_shuffle_tables();

// The `vpshufb` control of a whole 16-column mask word: lane j takes code popcount(m & ((1 << j) - 1)), 0x80 where
// bit j is clear (1 MiB, built on first use).
struct WideTable {
  alignas(64) uint8_t control[65536][16];
  WideTable() {
    for (uint32_t m = 0; m < 65536; ++m) {
      uint8_t seen = 0;
      for (int j = 0; j < 16; ++j) control[m][j] = (m >> j) & 1 ? seen++ : 0x80;
    }
  }
};

// nullptr where the 1 MiB cannot be allocated (the byte tables serve then): a throw here would end the process
const uint8_t (*wide_table())[16] {
  static const WideTable* table = new (std::nothrow) WideTable();
  return table ? table->control : nullptr;
}

// The 1 MiB table pays where it stays in a core's L2 (measured on a Sapphire Rapids class Xeon, 2 MiB L2: -22% per
// 576 x 576 int8 matrix in L2, -7% streamed from L3; int4 -20%); with a 512 KiB L2 (Zen 2/3, Skylake client) its
// lookups would miss to L3, so there the byte tables (4 KiB) stay. sq_set_avx2_shuffle overrides (tests, benchmarks).
std::atomic<int> g_shuffle_mode{-1};  // -1 auto (by L2 size), 0 byte tables, 1 the 16-bit table

bool use_wide_table() {
  const int mode = g_shuffle_mode.load(std::memory_order_relaxed);
  if (mode >= 0) return mode == 1 && wide_table() != nullptr;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  // the L2 it was measured with: at 1-1.25 MiB (Alder Lake P-cores) the table alone would fill the L2
  static const bool big_l2 = sysconf(_SC_LEVEL2_CACHE_SIZE) >= (2l << 20);
  return big_l2 && wide_table() != nullptr;
#else
  return false;
#endif
}

// The 1x4 block path's `vpermd` controls: for the 8 block bits m of a 32-column vector, dword lane i takes the
// 4-byte unit popcount(m & ((1 << i) - 1)) of the codes; -1 (the sign bit: pruned, lane cleared) where bit i is clear.
struct alignas(32) BlockTable {
  int32_t control[256][8];
};

constexpr BlockTable make_block_table() {
  BlockTable t{};
  for (int m = 0; m < 256; ++m) {
    int seen = 0;
    for (int i = 0; i < 8; ++i) t.control[m][i] = (m >> i) & 1 ? seen++ : -1;
  }
  return t;
}

constexpr BlockTable kBlockTable = make_block_table();

// 16 columns: codes at the set bits of m (0 elsewhere); `set`: 0xFF where the bit is set
SQ_AVX2 inline __m128i expand16(uint32_t m, const uint8_t* src, __m128i& set) {
  const uint32_t lo = m & 0xFFu, hi = m >> 8;
  const __m128i codes = _mm_castpd_si128(_mm_loadh_pd(
      _mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))),
      reinterpret_cast<const double*>(src + popcount(lo))));
  const __m128i control = _mm_castpd_si128(_mm_loadh_pd(
      _mm_castsi128_pd(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kShuffle.lo[lo]))),
      reinterpret_cast<const double*>(kShuffle.hi[hi])));
  set = _mm_cmpgt_epi8(control, _mm_set1_epi8(-1));
  return _mm_shuffle_epi8(codes, control);
}

SQ_AVX2 inline uint32_t row_mask32(const QPacked& w, int64_t n, int64_t b) {
  const uint16_t* m = w.masks + n * w.words + 2 * b;
  return static_cast<uint32_t>(m[0]) | (2 * b + 1 < w.words ? static_cast<uint32_t>(m[1]) << 16 : 0u);
}

SQ_AVX2 inline float hsum8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// 8 x 8 dwords: r[c] lane i = in[i] lane c
SQ_AVX2 inline void transpose8(__m256i r[8]) {
  __m256i a[8], b[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    b[4 * i + 0] = _mm256_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm256_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm256_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm256_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x20);
    r[4 + j] = _mm256_permute2x128_si256(b[j], b[4 + j], 0x31);
  }
}

namespace plain {
#define SQ_TARGET SQ_AVX2
#define SQ_VNNI 0
#include "quant_avx2_body.inc"
#undef SQ_TARGET
#undef SQ_VNNI
}  // namespace plain

namespace vnni {
#define SQ_TARGET SQ_AVX2_VNNI
#define SQ_VNNI 1
#include "quant_avx2_body.inc"
#undef SQ_TARGET
#undef SQ_VNNI
}  // namespace vnni

}  // namespace

void set_avx2_shuffle(int mode) { g_shuffle_mode.store(mode < 0 ? -1 : (mode > 0 ? 1 : 0), std::memory_order_relaxed); }

SQ_AVX2 uint8_t* unpack_row_nibbles_avx2(const QPacked& w, int64_t n, uint8_t* buf) {
  const int64_t first = w.offsets[n], last = w.offsets[n + 1];
  const uint8_t* in = w.codes + (first >> 1);
  const int64_t bytes = (last + 1) / 2 - (first >> 1);  // the bytes holding the row's nibbles
  const __m256i low = _mm256_set1_epi16(0x000F), high = _mm256_set1_epi16(0x0F00);
  for (int64_t i = 0; i < bytes; i += 16) {
    const __m256i w16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    // byte i of the input becomes bytes 2 i (low nibble) and 2 i + 1 (high nibble)
    const __m256i both = _mm256_or_si256(_mm256_and_si256(w16, low), _mm256_and_si256(_mm256_slli_epi16(w16, 4), high));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + 2 * i), both);
  }
  return buf + (first & 1);
}

// quant_api.cpp's quantize_tokens, 32 columns at a time (same arithmetic: fp32 division, round half to even)
SQ_AVX2 void quantize_tokens_avx2(const float* x, int64_t cols, const QInput& in, int8_t* xq, float* sx, int32_t* quad,
                                  int32_t* block, int64_t t0, int64_t t1) {
  const int64_t ablocks = in.cols_pad / kActBlock;
  const __m256 sign = _mm256_set1_ps(-0.0f), limit = _mm256_set1_ps(127.0f), low = _mm256_set1_ps(-127.0f);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) float tmp[kActBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + t * cols;
    int8_t* dst = xq + t * in.cols_pad;
    for (int64_t b = 0; b < ablocks; ++b) {
      const int64_t k0 = b * kActBlock, n = cols - k0 < kActBlock ? cols - k0 : kActBlock;
      for (int64_t k = 0; k < kActBlock; ++k) tmp[k] = k < n ? src[k0 + k] : 0.0f;
      __m256 amax = _mm256_setzero_ps();
      for (int k = 0; k < kActBlock; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_load_ps(tmp + k)));
      const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      const float scale = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2))) / 127.0f;
      sx[t * ablocks + b] = scale;
      const __m256 div = _mm256_set1_ps(scale > 0.0f ? scale : 1.0f);
      const __m256 keep = scale > 0.0f ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_setzero_ps();
      for (int k = 0; k < kActBlock; k += 32) {
        __m256i q[4];
        for (int i = 0; i < 4; ++i) {
          __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_load_ps(tmp + k + 8 * i), div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          r = _mm256_and_ps(_mm256_min_ps(_mm256_max_ps(r, low), limit), keep);
          q[i] = _mm256_cvtps_epi32(r);
        }
        // packs work per 128-bit lane: the dword permutation restores column order
        const __m256i packed = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k0 + k), packed);
        const __m256i sums = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, packed), ones16), 7);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(quad + t * (in.cols_pad / 4) + (k0 + k) / 4), sums);
        const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
        const __m128i s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        block[t * (in.cols_pad / 32) + (k0 + k) / 32] = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
      }
    }
  }
}

SQ_AVX2 void qgemv_avx2(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) plain::gemv<8>(w, in, bias, y, r0, r1); else plain::gemv<4>(w, in, bias, y, r0, r1);
}

SQ_AVX2 void qgemm_avx2(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) plain::gemm<8>(w, in, bias, y, r0, r1); else plain::gemm<4>(w, in, bias, y, r0, r1);
}

SQ_AVX2_VNNI void qgemv_avx2_vnni(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) vnni::gemv<8>(w, in, bias, y, r0, r1); else vnni::gemv<4>(w, in, bias, y, r0, r1);
}

SQ_AVX2_VNNI void qgemm_avx2_vnni(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (w.bits == 8) vnni::gemm<8>(w, in, bias, y, r0, r1); else vnni::gemm<4>(w, in, bias, y, r0, r1);
}

}  // namespace sp
#endif
