// Dense fp32 Linear kernels for the native decoder (dense_kernels.cpp): the Linears a pruned model keeps dense
// (e.g. a tied lm_head, 49152 x 576 on SmolLM2) and, at prefill, a dense GEMM over all prompt tokens.
//   y[t * ldy + n] = sum_k x[t * ldx + k] * W[n * cols + k] + (bias ? bias[n] : 0), rows [r0, r1), every token.
// Rows are walked 4 (AVX-512) or 2 (AVX2) at a time against up to 4 tokens, so each weight row is read from
// memory once per 4 tokens and stays in L1 for the next token block.
#pragma once

#include <cstdint>

#include "sparse_kernels.h"

namespace sp {

struct DenseArgs {
  const float* w;  // [rows][cols]
  const float* bias;
  const float* x;  // [tokens][ldx]
  float* y;        // [tokens][ldy]
  int64_t rows, cols, tokens, ldx, ldy;
};

using DenseFn = void (*)(const DenseArgs& a, int64_t r0, int64_t r1);

// A dense int8 matrix (an int8 lm_head): codes v[n][k] in [-127, 127] row-major (stride cols), one fp32 scale per
// row, wsum[n][b] = sum of row n's codes over 128-column block b. The input is quantized per token and 128-column
// block as in quant_kernels.h (sx = max|x| / 127, xq = round-half-even(x / sx)) and stored offset by 128 as uint8,
// so that AVX-512 VNNI's unsigned x signed product applies: sum (xq + 128) v = sum xq v + 128 wsum.
//   y[t][n] = scale[n] * sum_b sx[t][b] * (sum_{k in b} (xq + 128) v - 128 wsum[n][b]) + bias[n]
struct Int8Args {
  const int8_t* codes;
  const float* scales;
  const int32_t* wsum;  // [rows][blocks]
  const float* bias;
  const uint8_t* xu;  // [tokens][blocks * 128]: xq + 128 (zero-padded columns hold 128)
  const float* sx;    // [tokens][blocks]
  float* y;           // [tokens][ldy]
  int64_t rows, cols, blocks, tokens, ldy;
};

#if SP_X86
void int8_rows_avx512vnni(const Int8Args&, int64_t, int64_t);
void int8_rows_avx2vnni(const Int8Args&, int64_t, int64_t);  // AVX2 + AVX-VNNI (vpdpbusd on ymm)
void int8_rows_avx2(const Int8Args&, int64_t, int64_t);      // AVX2 only (vpmaddubsw + vpmaddwd)
#endif

void dense_portable(const DenseArgs&, int64_t, int64_t);
#if SP_X86
void dense_avx2(const DenseArgs&, int64_t, int64_t);
void dense_avx512(const DenseArgs&, int64_t, int64_t);
#endif

}  // namespace sp
