// AVX-512 kernels (AVX-512F only). Every function carries its own target attribute, so this file is
// compiled with the baseline flags and only ever entered after the dispatcher has checked the CPU.
//
// GEMV: one 16-column group of a row is one masked expand-load of its packed values
// (`vexpandps`), multiplied with the 16 matching input values, for up to 8 tokens at once; R rows
// are walked together so their popcount pointer chains run in parallel.
// GEMM tile: the masks of a tile are decoded once into column offsets (`vpcompressd` of an iota), then
// reused for every 32-token block: per nonzero, one broadcast weight times two 16-token input vectors.
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
  for (int64_t g = 0; g < full; ++g) {
    __m512 xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x + t * cols + g * kGroup);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t m = masks[r][g];
      const __m512 wv = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(m), v[r]);
      v[r] += popcount16(m);
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

// out[0:32] += sum_i v[i] * xb[idx[i] : idx[i] + 32]; four independent accumulator pairs hide the FMA latency
SP_AVX512 inline void accumulate_block(const float* v, const uint16_t* idx, int32_t count, const float* xb, float* out) {
  __m512 a0 = _mm512_loadu_ps(out), a1 = _mm512_loadu_ps(out + 16);
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
  __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps();
  int32_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float* x0 = xb + idx[i];
    const float* x1 = xb + idx[i + 1];
    const float* x2 = xb + idx[i + 2];
    const float* x3 = xb + idx[i + 3];
    const __m512 w0 = _mm512_set1_ps(v[i]), w1 = _mm512_set1_ps(v[i + 1]);
    const __m512 w2 = _mm512_set1_ps(v[i + 2]), w3 = _mm512_set1_ps(v[i + 3]);
    a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
    a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
    b0 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1), b0);
    b1 = _mm512_fmadd_ps(w1, _mm512_load_ps(x1 + 16), b1);
    c0 = _mm512_fmadd_ps(w2, _mm512_load_ps(x2), c0);
    c1 = _mm512_fmadd_ps(w2, _mm512_load_ps(x2 + 16), c1);
    d0 = _mm512_fmadd_ps(w3, _mm512_load_ps(x3), d0);
    d1 = _mm512_fmadd_ps(w3, _mm512_load_ps(x3 + 16), d1);
  }
  for (; i < count; ++i) {
    const float* x0 = xb + idx[i];
    const __m512 w0 = _mm512_set1_ps(v[i]);
    a0 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0), a0);
    a1 = _mm512_fmadd_ps(w0, _mm512_load_ps(x0 + 16), a1);
  }
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_add_ps(a0, b0), _mm512_add_ps(c0, d0)));
  _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_add_ps(a1, b1), _mm512_add_ps(c1, d1)));
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

SP_AVX512 void gemm_tile_avx512(const GemmTile& tile) {
  const Packed& w = *tile.w;
  const int64_t g0 = tile.chunk * kGroupsPerChunk;
  const int64_t g1 = g0 + kGroupsPerChunk < w.groups ? g0 + kGroupsPerChunk : w.groups;
  const __m512i lanes = _mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 5);
  int32_t count = 0;
  for (int64_t n = tile.r0; n < tile.r1; ++n) {
    tile.starts[n - tile.r0] = count;
    const uint16_t* masks = w.masks + n * w.groups;
    for (int64_t g = g0; g < g1; ++g) {
      const uint32_t m = masks[g];
      const __m512i k = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>((g - g0) * kGroup * kTokenBlock)));
      const __m512i packed = _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile.idx + count), _mm512_maskz_cvtepi32_epi16(0xFFFF, packed));
      count += popcount16(m);
    }
  }
  tile.starts[tile.r1 - tile.r0] = count;
  const int64_t width = tile.blocks * kTokenBlock;
  for (int64_t b = 0; b < tile.blocks; ++b) {
    const float* xb = tile.xp + (b * w.cols + tile.chunk * kChunk) * kTokenBlock;
    for (int64_t n = tile.r0; n < tile.r1; ++n) {
      const int32_t s = tile.starts[n - tile.r0], e = tile.starts[n - tile.r0 + 1];
      if (s == e) continue;
      accumulate_block(w.values + w.offsets[n * w.chunks + tile.chunk], tile.idx + s, e - s, xb,
                       tile.yt + n * width + b * kTokenBlock);
    }
  }
}

}  // namespace sp
#endif
