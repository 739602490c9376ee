// AVX2 + FMA kernels (x86 CPUs without AVX-512). AVX2 has no expand-load: each 8-column half of a
// mask selects, from a 256-entry table, the lane permutation that spreads the next popcount(m)
// packed values onto their columns (`vpermps` on a plain 8-value load), and a second 256-entry table
// of lane masks zeroes the columns whose bit is clear (`vandps`). A plain load reads up to 7 values
// past the group's last one, so rows whose values end within 8 floats of the buffer's end take the
// masked-load form (`vmaskmovps` of exactly popcount(m) values), which never reads past the buffer.
// The plain form replaced the masked one everywhere else: it needs no popcount-indexed table lookup
// on the load's critical path and avoids `vmaskmovps`, whose load form is slow on some AMD cores.
// GEMM decodes masks to column offsets through a third table (positions of the set bits). Target
// attributes per function, like the AVX-512 file.
#include "sparse_kernels.h"

#if SP_X86
#include <immintrin.h>

#define SP_AVX2 __attribute__((target("avx2,fma,popcnt")))

namespace sp {
namespace {

struct Tables {
  int32_t expand[256][8];    // lane j of mask m takes packed value popcount(m & ((1 << j) - 1)); inactive lanes take 7
  int32_t lanes[256][8];     // -1 (all bits) where bit j of m is set, else 0
  uint8_t compress[256][8];  // the i-th set bit of m (for i < popcount(m))
  int32_t prefix[9][8];      // lane j loaded iff j < count
};

constexpr Tables make_tables() {
  Tables t{};
  for (int m = 0; m < 256; ++m) {
    int seen = 0;
    for (int j = 0; j < 8; ++j) {
      t.expand[m][j] = 7;
      t.lanes[m][j] = (m >> j) & 1 ? -1 : 0;
      t.compress[m][j] = 0;
    }
    for (int j = 0; j < 8; ++j)
      if (m & (1 << j)) {
        t.expand[m][j] = static_cast<uint8_t>(seen);
        t.compress[m][seen] = static_cast<uint8_t>(j);
        ++seen;
      }
  }
  for (int c = 0; c <= 8; ++c)
    for (int j = 0; j < 8; ++j) t.prefix[c][j] = j < c ? -1 : 0;
  return t;
}

alignas(64) constexpr Tables kTables = make_tables();

// the 8 weights of one mask byte, in column order (zero where the mask bit is clear). kTail: the masked
// load of exactly popcount(m) values (never reads past them); otherwise a plain load of 8.
template <bool kTail>
SP_AVX2 inline __m256 expand8(uint32_t m, const float* v) {
  const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.expand[m]));
  if (kTail) {
    const __m256i load = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTables.prefix[popcount(m)]));
    return _mm256_permutevar8x32_ps(_mm256_maskload_ps(v, load), perm);
  }
  const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kTables.lanes[m]));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(v), perm), keep);
}

template <int R, int T, bool kTail>
SP_AVX2 inline void gemv_rows(const Packed& w, const float* x, const float* bias, float* y, int64_t n0) {
  const int64_t cols = w.cols, full = cols / kGroup, rest = cols % kGroup;
  __m256 acc[R][T];
  const float* v[R];
  const uint16_t* masks[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    v[r] = w.values + w.offsets[(n0 + r) * w.chunks];
    masks[r] = w.masks + (n0 + r) * w.groups;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  Prefetcher ahead(w, n0 + R, n0 + 2 * R);
  for (int64_t g = 0; g <= full; ++g) {
    if (g == full && rest == 0) break;
    ahead.step();
    __m256 lo[T], hi[T];
    if (g < full) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        lo[t] = _mm256_loadu_ps(x + t * cols + g * kGroup);
        hi[t] = _mm256_loadu_ps(x + t * cols + g * kGroup + 8);
      }
    } else {  // last, partial group: never read input past its row
      const __m256i mlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTables.prefix[rest < 8 ? rest : 8]));
      const __m256i mhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTables.prefix[rest > 8 ? rest - 8 : 0]));
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        lo[t] = _mm256_maskload_ps(x + t * cols + g * kGroup, mlo);
        hi[t] = _mm256_maskload_ps(x + t * cols + g * kGroup + 8, mhi);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t m = masks[r][g], mlo = m & 0xFFu, mhi = m >> 8;
      const __m256 wlo = expand8<kTail>(mlo, v[r]);
      v[r] += popcount(mlo);
      const __m256 whi = expand8<kTail>(mhi, v[r]);
      v[r] += popcount(mhi);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(whi, hi[t], _mm256_fmadd_ps(wlo, lo[t], acc[r][t]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r][t]), _mm256_extractf128_ps(acc[r][t], 1));
      const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
      const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
      y[t * w.rows + n0 + r] = _mm_cvtss_f32(s1) + b;
    }
  }
}

// Rows whose values end at least 8 floats before the buffer's end take the plain-load form.
template <int R, int T>
SP_AVX2 void gemv_range(const Packed& w, const float* x, const float* bias, float* y, int64_t r0, int64_t r1) {
  const int64_t safe_end = static_cast<int64_t>(w.offsets[w.rows * w.chunks]) - 8;
  int64_t n = r0;
  for (; n + R <= r1 && w.offsets[(n + R) * w.chunks] <= safe_end; n += R) gemv_rows<R, T, false>(w, x, bias, y, n);
  for (; n < r1; ++n) gemv_rows<1, T, true>(w, x, bias, y, n);
}

// out[0:64] += sum_i v[i] * xb[idx[i] : idx[i] + 64]; eight accumulators, one FMA each per nonzero. Out of
// line, like the AVX-512 form, so the tile loops around it do not crowd its registers.
__attribute__((noinline)) SP_AVX2 void accumulate_block(const float* v, const uint16_t* idx, int32_t count, const float* xb, float* out) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) a[j] = _mm256_loadu_ps(out + 8 * j);
  for (int32_t i = 0; i < count; ++i) {
    const float* x0 = xb + idx[i];
    __asm__("" : "+r"(x0));  // the address in one register: base + displacement loads stay micro-fused
    const __m256 w0 = _mm256_broadcast_ss(v + i);
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(w0, _mm256_load_ps(x0 + 8 * j), a[j]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + 8 * j, a[j]);
}

}  // namespace

SP_AVX2 void gemv_avx2(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, int64_t r0,
                       int64_t r1) {
  switch (tokens) {
    case 1: gemv_range<4, 1>(w, x, bias, y, r0, r1); break;
    case 2: gemv_range<2, 2>(w, x, bias, y, r0, r1); break;
    case 3: gemv_range<2, 3>(w, x, bias, y, r0, r1); break;
    case 4: gemv_range<2, 4>(w, x, bias, y, r0, r1); break;
    case 5: gemv_range<1, 5>(w, x, bias, y, r0, r1); break;
    case 6: gemv_range<1, 6>(w, x, bias, y, r0, r1); break;
    case 7: gemv_range<1, 7>(w, x, bias, y, r0, r1); break;
    case 8: gemv_range<1, 8>(w, x, bias, y, r0, r1); break;
    default: break;
  }
}

SP_AVX2 void gemm_tile_avx2(const GemmTile& tile) {
  {
  const Packed& w = *tile.w;
  const int64_t subs = tile.segments();
  int32_t count = 0;
  for (int64_t n = tile.r0; n < tile.r1; ++n) {
    const uint16_t* masks = w.masks + n * w.groups;
    for (int64_t s = 0; s < subs; ++s) {
      tile.starts[(n - tile.r0) * subs + s] = count;
      const int64_t ga = tile.g0 + s * tile.sub, gb = ga + tile.sub < tile.g1 ? ga + tile.sub : tile.g1;
      for (int64_t g = ga; g < gb; ++g) {
        const uint32_t m = masks[g];
        for (int half = 0; half < 2; ++half) {
          const uint32_t m8 = (m >> (8 * half)) & 0xFFu;
          const __m128i pos = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kTables.compress[m8])));
          const __m128i k = _mm_add_epi16(pos, _mm_set1_epi16(static_cast<short>((g - tile.g0) * kGroup + 8 * half)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(tile.idx + count), _mm_slli_epi16(k, 6));
          count += popcount(m8);
        }
      }
    }
  }
  tile.starts[(tile.r1 - tile.r0) * subs] = count;
  }
  const Packed& w = *tile.w;
  const int64_t subs = tile.segments(), width = tile.blocks * kTokenBlock, chunk = tile.g0 / kGroupsPerChunk;
  const bool whole_rows = tile.g0 == 0 && tile.g1 == w.groups;  // the next tile's rows, a line per call (AVX-512 file)
  Prefetcher ahead(w, whole_rows ? tile.r1 : 0, whole_rows ? 2 * tile.r1 - tile.r0 : 0);
  for (int64_t b = 0; b < tile.blocks; ++b) {
    const float* xb = tile.xp + (b * w.cols + tile.g0 * kGroup) * kTokenBlock;
    for (int64_t s = 0; s < subs; ++s)
      for (int64_t n = tile.r0; n < tile.r1; ++n) {
        const int32_t* seg = tile.starts + (n - tile.r0) * subs;
        if (seg[s] == seg[s + 1]) continue;
        ahead.step();
        accumulate_block(w.values + w.offsets[n * w.chunks + chunk] + (seg[s] - seg[0]), tile.idx + seg[s],
                         seg[s + 1] - seg[s], xb, tile.yt + n * width + b * kTokenBlock);
      }
  }
}

}  // namespace sp
#endif
