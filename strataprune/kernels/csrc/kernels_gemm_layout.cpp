// The GEMM's layout changes around the sparse tiles: the input to token-minor blocks (xp) and the
// token-minor output (yt) back to token-major y. Each is a transpose of the whole activation; done one
// float at a time with a 256-byte stride they cost 12% of a 128-token 576 x 576 GEMM at 70% sparsity
// (measured), so the x86 forms move 8 x 8 blocks through AVX registers (an 8 x 8 transpose is 24
// shuffles for 64 floats). The AVX-512 GEMM uses the AVX2 forms too: the transposes are a few percent
// of the GEMM after this, and one form is less code to test.
#include "sparse_kernels.h"

#if SP_X86
#include <immintrin.h>
#endif

namespace sp {

void gemm_pack_input_portable(const float* x, int64_t cols, int64_t valid, int64_t t0, int64_t t1, float* xp) {
  for (int64_t t = t0; t < t1; ++t) {
    float* dst = xp + (t / kTokenBlock) * cols * kTokenBlock + t % kTokenBlock;
    if (t < valid) {
      const float* src = x + t * cols;
      for (int64_t k = 0; k < cols; ++k) dst[k * kTokenBlock] = src[k];
    } else {
      for (int64_t k = 0; k < cols; ++k) dst[k * kTokenBlock] = 0.0f;
    }
  }
}

void gemm_unpack_output_portable(const float* yt, int64_t width, int64_t valid, int64_t rows, int64_t r0, int64_t r1,
                                 float* y) {
  for (int64_t n0 = r0; n0 < r1; n0 += 16) {  // 16 rows at a time: reads stay in L1, writes are 64-byte runs
    const int64_t n1 = n0 + 16 < r1 ? n0 + 16 : r1;
    for (int64_t j = 0; j < valid; ++j)
      for (int64_t n = n0; n < n1; ++n) y[j * rows + n] = yt[n * width + j];
  }
}

#if SP_X86
#define SP_AVX2_LAYOUT __attribute__((target("avx2,fma")))

namespace {

// r[i] (row i of an 8 x 8 block) becomes column i: on return r[c][i] is the old r[i][c]
SP_AVX2_LAYOUT inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    s[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    s[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    s[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    s[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(s[c], s[c + 4], 0x20);
    r[c + 4] = _mm256_permute2f128_ps(s[c], s[c + 4], 0x31);
  }
}

}  // namespace

// 16 tokens at a time along whole rows: 16 sequential read streams, and every 64-byte line of xp is written
// whole, once (two 8 x 8 transposes side by side)
SP_AVX2_LAYOUT void gemm_pack_input_avx2(const float* x, int64_t cols, int64_t valid, int64_t t0, int64_t t1, float* xp) {
  const int64_t k8 = cols / 8 * 8;
  for (int64_t t = t0; t < t1; t += 16) {
    float* dst = xp + (t / kTokenBlock) * cols * kTokenBlock + t % kTokenBlock;
    const int64_t live = valid - t < 0 ? 0 : (valid - t > 16 ? 16 : valid - t);  // tokens of these 16 in the input
    for (int64_t k = 0; k < k8; k += 8) {
      __m256 lo[8], hi[8];
      for (int i = 0; i < 8; ++i) {
        lo[i] = i < live ? _mm256_loadu_ps(x + (t + i) * cols + k) : _mm256_setzero_ps();
        hi[i] = i + 8 < live ? _mm256_loadu_ps(x + (t + 8 + i) * cols + k) : _mm256_setzero_ps();
      }
      transpose8(lo);
      transpose8(hi);
      for (int c = 0; c < 8; ++c) {
        _mm256_store_ps(dst + (k + c) * kTokenBlock, lo[c]);
        _mm256_store_ps(dst + (k + c) * kTokenBlock + 8, hi[c]);
      }
    }
    for (int64_t k = k8; k < cols; ++k)
      for (int i = 0; i < 16; ++i) dst[k * kTokenBlock + i] = i < live ? x[(t + i) * cols + k] : 0.0f;
  }
}

// 8 tokens x 16 rows at a time, tokens outer: the stores run along 8 rows of y (64-byte lines written whole)
SP_AVX2_LAYOUT void gemm_unpack_output_avx2(const float* yt, int64_t width, int64_t valid, int64_t rows, int64_t r0,
                                            int64_t r1, float* y) {
  const int64_t n16 = r0 + (r1 - r0) / 16 * 16, j8 = valid / 8 * 8;
  for (int64_t j = 0; j < j8; j += 8) {
    for (int64_t n = r0; n < n16; n += 16) {
      __m256 lo[8], hi[8];
      for (int i = 0; i < 8; ++i) {
        lo[i] = _mm256_loadu_ps(yt + (n + i) * width + j);
        hi[i] = _mm256_loadu_ps(yt + (n + 8 + i) * width + j);
      }
      transpose8(lo);
      transpose8(hi);
      for (int c = 0; c < 8; ++c) {
        _mm256_storeu_ps(y + (j + c) * rows + n, lo[c]);
        _mm256_storeu_ps(y + (j + c) * rows + n + 8, hi[c]);
      }
    }
  }
  for (int64_t n = r0; n < n16; ++n)
    for (int64_t j = j8; j < valid; ++j) y[j * rows + n] = yt[n * width + j];
  for (int64_t n = n16; n < r1; ++n)
    for (int64_t j = 0; j < valid; ++j) y[j * rows + n] = yt[n * width + j];
}
#endif

}  // namespace sp
