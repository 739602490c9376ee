// AVX-512 kernels (AVX-512F only). Every function carries its own target attribute, so this file is
// compiled with the baseline flags and only ever entered after the dispatcher has checked the CPU.
// Measured and not kept: a VBMI2 mask decoder (32 columns per 16-bit compress: 2.5% of a 128-token
// GEMM at 70%), walking a segment once for both 64-token blocks (the doubled input footprint costs more
// than the halved index/broadcast loads; re-measured with 64- and 128-column segments: within 2%, noise on
// this machine), software prefetch of the gathered input rows (slower).
//
// GEMV: one 16-column group of a row is one masked expand-load of its packed values
// (`vexpandps`), multiplied with the 16 matching input values, for up to 8 tokens at once; R rows
// are walked together so their popcount pointer chains run in parallel.
// GEMM tile: the masks of a tile are decoded once into column offsets (`vpcompressd` of an iota), then
// reused for every 64-token block: per nonzero, one broadcast weight times four 16-token input vectors,
// the tile walked 128 columns at a time so that the gathered input vectors come from L1.
// What bounds it: six loads (offset, broadcast, four input vectors) per four FMAs. Sharing an input vector
// between rows that have a nonzero in the same column (sparse register tiling, Wilkinson et al., PLDI 2023)
// needs each row panel's columns grouped by their row pattern: not built here, because building it per call
// (estimated a few cycles per column and panel) eats most of what it saves at 128 tokens; it belongs in the
// packed format, built once.
#include "sparse_kernels.h"

#if SP_X86
#include <immintrin.h>

#define SP_AVX512 __attribute__((target("avx512f,avx2,fma,popcnt")))

namespace sp {
namespace {

// horizontal sum; the all-ones maskz forms because GCC 12 warns about the _mm512_undefined_ps() inside
// the plain intrinsics (and _mm512_reduce_add_ps) when they are inlined into a target-attributed function
SP_AVX512 inline float sum16(__m512 v) {
  const __mmask16 all = 0xFFFF;
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

template <int R, int T>
SP_AVX512 inline void gemv_rows(const Packed& w, const float* x, const float* bias, float* y, int64_t n0) {
  const int64_t cols = w.cols, full = cols / kGroup;
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols % kGroup)) - 1u);
  __m512 acc[R][T];
  const float* v[R];
  const uint16_t* masks[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    v[r] = w.values + w.offsets[(n0 + r) * w.chunks];
    masks[r] = w.masks + (n0 + r) * w.groups;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  Prefetcher ahead(w, n0 + R, n0 + 2 * R);
  for (int64_t g = 0; g < full; ++g) {
    ahead.step();
    __m512 xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + t * cols + g * kGroup);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t m = masks[r][g];
      const __m512 wv = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m), v[r]);
      v[r] += popcount(m);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (full < w.groups) {  // last, partial group: never read input past its row
    __m512 xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(tail, x + t * cols + full * kGroup);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(masks[r][full]), v[r]);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[n0 + r] : 0.0f;
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) y[t * w.rows + n0 + r] = sum16(acc[r][t]) + b;
  }
}

template <int R, int T>
SP_AVX512 void gemv_range(const Packed& w, const float* x, const float* bias, float* y, int64_t r0, int64_t r1) {
  int64_t n = r0;
  for (; n + R <= r1; n += R) gemv_rows<R, T>(w, x, bias, y, n);
  for (; n < r1; ++n) gemv_rows<1, T>(w, x, bias, y, n);
}

// out[0:64] += sum_i v[i] * xb[idx[i] : idx[i] + 64]. Four nonzeros per step into four accumulator sets of
// four (16 chains): one FMA per chain every four nonzeros, so the FMA latency never binds. Kept out of line:
// inlined into the tile loops, GCC runs short of general registers and moves the gathered addresses through
// vector registers, on the FMA ports.
__attribute__((noinline)) SP_AVX512 void accumulate_block(const float* v, const uint16_t* idx, int32_t count, const float* xb,
                                                          float* out) {
  __m512 acc[4][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    acc[0][j] = _mm512_loadu_ps(out + 16 * j);
    acc[1][j] = acc[2][j] = acc[3][j] = _mm512_setzero_ps();
  }
  const uint16_t* end = idx + (count & ~3);
  for (; idx != end; idx += 4, v += 4) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const float* x0 = xb + idx[u];
      const __m512 w0 = _mm512_set1_ps(v[u]);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[u][j] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * j), acc[u][j]);
    }
  }
  for (int u = 0; u < (count & 3); ++u) {
    const float* x0 = xb + idx[u];
    const __m512 w0 = _mm512_set1_ps(v[u]);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[0][j] = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16 * j), acc[0][j]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    _mm512_storeu_ps(out + 16 * j, _mm512_add_ps(_mm512_add_ps(acc[0][j], acc[1][j]), _mm512_add_ps(acc[2][j], acc[3][j])));
}

}  // namespace

SP_AVX512 void gemv_avx512(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, int64_t r0,
                           int64_t r1) {
  switch (tokens) {
    case 1: gemv_range<4, 1>(w, x, bias, y, r0, r1); break;
    case 2: gemv_range<4, 2>(w, x, bias, y, r0, r1); break;
    case 3: gemv_range<4, 3>(w, x, bias, y, r0, r1); break;
    case 4: gemv_range<4, 4>(w, x, bias, y, r0, r1); break;
    case 5: gemv_range<2, 5>(w, x, bias, y, r0, r1); break;
    case 6: gemv_range<2, 6>(w, x, bias, y, r0, r1); break;
    case 7: gemv_range<2, 7>(w, x, bias, y, r0, r1); break;
    case 8: gemv_range<2, 8>(w, x, bias, y, r0, r1); break;
    default: break;
  }
}

namespace {

// Masks to column offsets (k * kTokenBlock, relative to the tile's first column), one segment per row and
// `sub` groups:
// a compress of the 16 column offsets of a group by its mask, widened to uint16.
SP_AVX512 void decode_tile(const GemmTile& tile) {
  const __m512i lanes = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(kTokenBlock));
  const __m512i step = _mm512_set1_epi32(kGroup * kTokenBlock);
  const Packed& w = *tile.w;
  const int64_t subs = tile.segments();
  int32_t count = 0;
  for (int64_t n = tile.r0; n < tile.r1; ++n) {
    const uint16_t* masks = w.masks + n * w.groups;
    for (int64_t s = 0; s < subs; ++s) {
      tile.starts[(n - tile.r0) * subs + s] = count;
      const int64_t ga = tile.g0 + s * tile.sub, gb = ga + tile.sub < tile.g1 ? ga + tile.sub : tile.g1;
      __m512i k = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>((ga - tile.g0) * kGroup * kTokenBlock)));
      for (int64_t g = ga; g < gb; ++g, k = _mm512_add_epi32(k, step)) {
        const uint32_t m = masks[g];
        const __m512i packed = _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), k);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.idx + count), _mm512_maskz_cvtepi32_epi16(0xFFFF, packed));
        count += popcount(m);
      }
    }
  }
  tile.starts[(tile.r1 - tile.r0) * subs] = count;
}

SP_AVX512 void compute_tile(const GemmTile& tile) {
  const Packed& w = *tile.w;
  const int64_t subs = tile.segments(), width = tile.blocks * kTokenBlock, chunk = tile.g0 / kGroupsPerChunk;
  // The tile reads its values segment by segment, jumping between rows, which the hardware prefetchers do not
  // follow from memory; a tile spanning whole rows requests the next tile's rows in storage order instead, a
  // line per call (measured on 70% weights not in cache: 576x576 0.37 -> 0.35 ms, 1536x576 1.05 -> 0.95 ms).
  const bool whole_rows = tile.g0 == 0 && tile.g1 == w.groups;
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

}  // namespace

SP_AVX512 void gemm_tile_avx512(const GemmTile& tile) {
  decode_tile(tile);
  compute_tile(tile);
}

}  // namespace sp
#endif
