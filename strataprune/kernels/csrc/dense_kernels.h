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

void dense_portable(const DenseArgs&, int64_t, int64_t);
#if SP_X86
void dense_avx2(const DenseArgs&, int64_t, int64_t);
void dense_avx512(const DenseArgs&, int64_t, int64_t);
#endif

}  // namespace sp
