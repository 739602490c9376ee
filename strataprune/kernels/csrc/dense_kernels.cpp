// Dense fp32 kernels of the native decoder (see dense_kernels.h). Every vector function carries its own
// target attribute: the file is compiled with the baseline flags and entered only after the dispatcher
// (decoder.cpp) has checked the CPU, like kernels_avx512.cpp.
#include "dense_kernels.h"

#if SP_X86
#include <immintrin.h>
#endif

namespace sp {

void dense_portable(const DenseArgs& a, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    const float* w = a.w + n * a.cols;
    for (int64_t t = 0; t < a.tokens; ++t) {
      const float* x = a.x + t * a.ldx;
      float acc = 0.0f;
      for (int64_t k = 0; k < a.cols; ++k) acc += w[k] * x[k];
      a.y[t * a.ldy + n] = acc + (a.bias ? a.bias[n] : 0.0f);
    }
  }
}

#if SP_X86
#define SP_D512 __attribute__((target("avx512f,avx2,fma")))
#define SP_D256 __attribute__((target("avx2,fma")))

namespace {

constexpr int64_t kAheadRows = 16;  // software prefetch distance of the GEMV row streams (see int8_rows_avx512vnni)

SP_D512 inline float hsum512(__m512 v) {
  const __mmask16 all = 0xFFFF;  // maskz forms: see kernels_avx512.cpp (GCC 12 warnings on the plain intrinsics)
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(all, v, v, 0xB1));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0x4E));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(all, v, 0xB1));
  return _mm512_cvtss_f32(v);
}

// NR rows x NT tokens: rows past r1 / tokens past the last are computed on a repeated pointer and not stored
template <int NR, int NT>
SP_D512 void block512(const DenseArgs& a, int64_t n, int64_t r1, int64_t t) {
  const float* w[NR];
  const float* x[NT];
  for (int i = 0; i < NR; ++i) w[i] = a.w + (n + i < r1 ? n + i : r1 - 1) * a.cols;
  for (int j = 0; j < NT; ++j) x[j] = a.x + (t + j) * a.ldx;
  __m512 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = a.cols / 16 * 16;
  for (int64_t k = 0; k < full; k += 16) {
    __m512 wv[NR];
    for (int i = 0; i < NR; ++i) {
      if (t == 0) _mm_prefetch(reinterpret_cast<const char*>(w[i] + k + kAheadRows * a.cols), _MM_HINT_T0);
      wv[i] = _mm512_loadu_ps(w[i] + k);
    }
    for (int j = 0; j < NT; ++j) {
      const __m512 xv = _mm512_loadu_ps(x[j] + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  if (full < a.cols) {
    const __mmask16 m = static_cast<__mmask16>((1u << (a.cols - full)) - 1u);
    __m512 wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm512_maskz_loadu_ps(m, w[i] + full);
    for (int j = 0; j < NT; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[j] + full);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm512_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < NR && n + i < r1; ++i) {
    const float b = a.bias ? a.bias[n + i] : 0.0f;
    for (int j = 0; j < NT; ++j) a.y[(t + j) * a.ldy + n + i] = hsum512(acc[i][j]) + b;
  }
}

SP_D256 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NR, int NT>
SP_D256 void block256(const DenseArgs& a, int64_t n, int64_t r1, int64_t t) {
  const float* w[NR];
  const float* x[NT];
  for (int i = 0; i < NR; ++i) w[i] = a.w + (n + i < r1 ? n + i : r1 - 1) * a.cols;
  for (int j = 0; j < NT; ++j) x[j] = a.x + (t + j) * a.ldx;
  __m256 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t full = a.cols / 8 * 8;
  for (int64_t k = 0; k < full; k += 8) {
    __m256 wv[NR];
    for (int i = 0; i < NR; ++i) wv[i] = _mm256_loadu_ps(w[i] + k);
    for (int j = 0; j < NT; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + k);
      for (int i = 0; i < NR; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  float tail[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NT; ++j) {
      float s = 0.0f;
      for (int64_t k = full; k < a.cols; ++k) s += w[i][k] * x[j][k];
      tail[i][j] = s;
    }
  for (int i = 0; i < NR && n + i < r1; ++i) {
    const float b = a.bias ? a.bias[n + i] : 0.0f;
    for (int j = 0; j < NT; ++j) a.y[(t + j) * a.ldy + n + i] = hsum256(acc[i][j]) + tail[i][j] + b;
  }
}

}  // namespace

SP_D512 void dense_avx512(const DenseArgs& a, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; n += 4) {
    int64_t t = 0;
    for (; t + 4 <= a.tokens; t += 4) block512<4, 4>(a, n, r1, t);
    switch (a.tokens - t) {
      case 3: block512<4, 3>(a, n, r1, t); break;
      case 2: block512<4, 2>(a, n, r1, t); break;
      case 1: block512<4, 1>(a, n, r1, t); break;
      default: break;
    }
  }
}

SP_D256 void dense_avx2(const DenseArgs& a, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; n += 2) {
    int64_t t = 0;
    for (; t + 4 <= a.tokens; t += 4) block256<2, 4>(a, n, r1, t);
    switch (a.tokens - t) {
      case 3: block256<2, 3>(a, n, r1, t); break;
      case 2: block256<2, 2>(a, n, r1, t); break;
      case 1: block256<2, 1>(a, n, r1, t); break;
      default: break;
    }
  }
}

#define SP_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))

SP_VNNI void int8_rows_avx512vnni(const Int8Args& a, int64_t r0, int64_t r1) {
  constexpr int R = 4;
  constexpr int64_t kAhead = 16;  // rows
  const int64_t pieces = (a.cols + 63) / 64, pad = a.blocks * 128;
  const int64_t rem = a.cols - 64 * (pieces - 1);
  const __mmask64 tail = rem >= 64 ? ~__mmask64{0} : ((__mmask64{1} << rem) - 1);
  for (int64_t n = r0; n < r1; n += R) {
    const int8_t* w[R];
    for (int i = 0; i < R; ++i) w[i] = a.codes + (n + i < r1 ? n + i : r1 - 1) * a.cols;
    for (int64_t t = 0; t < a.tokens; ++t) {
      const uint8_t* x = a.xu + t * pad;
      const float* sx = a.sx + t * a.blocks;
      __m512 acc[R];
      for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t b = 0; b < a.blocks; ++b) {
        __m512i dot[R];
        for (int i = 0; i < R; ++i) dot[i] = _mm512_setzero_si512();
        for (int64_t c = 2 * b; c < 2 * b + 2 && c < pieces; ++c) {
          const __m512i xv = _mm512_loadu_si512(x + 64 * c);
          const __mmask64 m = c == pieces - 1 ? tail : ~__mmask64{0};
          for (int i = 0; i < R; ++i) {
            // the rows after this group: a GEMV streams the head once, and the rows' short runs (cols bytes each)
            // are too short for the hardware prefetchers to get far enough ahead
            if (t == 0) _mm_prefetch(reinterpret_cast<const char*>(w[i] + 64 * c + kAhead * a.cols), _MM_HINT_T0);
            dot[i] = _mm512_dpbusd_epi32(dot[i], xv, _mm512_maskz_loadu_epi8(m, w[i] + 64 * c));
          }
        }
        const __m512 s = _mm512_set1_ps(sx[b]);
        for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, dot[i]), s, acc[i]);
      }
      for (int i = 0; i < R && n + i < r1; ++i) {
        float correction = 0.0f;
        for (int64_t b = 0; b < a.blocks; ++b) correction += sx[b] * static_cast<float>(128 * a.wsum[(n + i) * a.blocks + b]);
        a.y[t * a.ldy + n + i] = a.scales[n + i] * (hsum512(acc[i]) - correction) + (a.bias ? a.bias[n + i] : 0.0f);
      }
    }
  }
}
// The int8 head on AVX2, 32 columns per step. With AVX-VNNI: `vpdpbusd` on ymm over (xq + 128) x v, as the AVX-512
// kernel above; the offset's share (128 wsum) is subtracted per 128-column block in int32, so each block's sum is
// exact before it is scaled. Without (Zen 2/3, Haswell to Skylake): `vpmaddubsw` of |v| (u8) with sign(v) * xq (s8),
// whose pairwise sums (<= 2 * 127 * 127) cannot saturate its int16, then `vpmaddwd` with ones: the exact sum of
// xq v with no correction. Both: 4 rows at a time, each row's 32-byte run prefetched kAheadRows rows ahead (the
// runs are too short for the hardware prefetchers), a last partial step read through a zero-padded copy (no byte
// masked loads on AVX2).
#define SP_INT8_AVX2_ROWS(NAME, TARGET, VNNI)                                                                                \
  TARGET void NAME(const Int8Args& a, int64_t r0, int64_t r1) {                                                              \
    constexpr int R = 4;                                                                                                     \
    const int64_t steps = (a.cols + 31) / 32, full = a.cols / 32, pad = a.blocks * 128;                                      \
    const __m256i ones16 = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));                          \
    (void)ones16; /* the AVX-VNNI build does not use it */                                                                 \
    for (int64_t n = r0; n < r1; n += R) {                                                                                   \
      const int8_t* w[R];                                                                                                    \
      alignas(32) int8_t tail[R][32] = {};                                                                                   \
      for (int i = 0; i < R; ++i) {                                                                                          \
        w[i] = a.codes + (n + i < r1 ? n + i : r1 - 1) * a.cols;                                                             \
        for (int64_t k = 32 * full; k < a.cols; ++k) tail[i][k - 32 * full] = w[i][k];                                      \
      }                                                                                                                      \
      for (int64_t t = 0; t < a.tokens; ++t) {                                                                               \
        const uint8_t* x = a.xu + t * pad;                                                                                   \
        const float* sx = a.sx + t * a.blocks;                                                                               \
        __m256 acc[R];                                                                                                       \
        for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();                                                            \
        for (int64_t b = 0; b < a.blocks; ++b) {                                                                             \
          __m256i dot[R];                                                                                                    \
          for (int i = 0; i < R; ++i)                                                                                        \
            dot[i] = VNNI ? _mm256_setr_epi32(-128 * a.wsum[(n + i < r1 ? n + i : r1 - 1) * a.blocks + b], 0, 0, 0, 0, 0, 0, 0) \
                          : _mm256_setzero_si256();                                                                          \
          for (int64_t c = 4 * b; c < 4 * b + 4 && c < steps; ++c) {                                                         \
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * c));                            \
            const __m256i xs = VNNI ? xv : _mm256_xor_si256(xv, flip); /* xq, signed */                                     \
            for (int i = 0; i < R; ++i) {                                                                                    \
              if (t == 0 && (c & 1) == 0)                                                                                    \
                _mm_prefetch(reinterpret_cast<const char*>(w[i] + 32 * c + kAheadRows * a.cols), _MM_HINT_T0);               \
              const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c < full ? w[i] + 32 * c : tail[i]));  \
              dot[i] = SP_INT8_DOT_##VNNI(dot[i], xs, wv);                                                                   \
            }                                                                                                                \
          }                                                                                                                  \
          const __m256 s = _mm256_set1_ps(sx[b]);                                                                            \
          for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), s, acc[i]);                       \
        }                                                                                                                    \
        for (int i = 0; i < R && n + i < r1; ++i)                                                                            \
          a.y[t * a.ldy + n + i] = a.scales[n + i] * hsum256(acc[i]) + (a.bias ? a.bias[n + i] : 0.0f);                     \
      }                                                                                                                      \
    }                                                                                                                        \
  }

#define SP_INT8_DOT_1(acc, x, w) _mm256_dpbusd_avx_epi32(acc, x, w)
#define SP_INT8_DOT_0(acc, x, w) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones16))

SP_INT8_AVX2_ROWS(int8_rows_avx2vnni, __attribute__((target("avx2,fma,avxvnni"))), 1)
SP_INT8_AVX2_ROWS(int8_rows_avx2, SP_D256, 0)
#endif

}  // namespace sp
