// Row-range entries of the sparse kernels for a caller that already runs a thread team (the native decoder's own
// worker threads, woken once per decode step, decoder.cpp): the weight is described and its kernel chosen once, the input is
// prepared once per thread into the caller's memory, and any thread computes any rows [r0, r1) without opening a
// nested OpenMP region. sp_linear / sq_linear (api.cpp, quant_api.cpp) compute the same rows with the same kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant_kernels.h"
#include "sparse_kernels.h"

namespace sp {

// fp32 bitmask weight (GEMV: tokens <= kMaxGemvTokens). kernel is null when the ISA is not supported.
struct TeamSparse {
  Packed w;
  GemvFn kernel;
};
TeamSparse team_sparse(const uint16_t* masks, const float* values, const int32_t* offsets, int64_t rows, int64_t cols,
                       int isa);
inline void team_sparse_rows(const TeamSparse& s, const float* x, int64_t tokens, const float* bias, float* y,
                             int64_t r0, int64_t r1) {
  s.kernel(s.w, x, tokens, bias, y, r0, r1);
}

// int8 / int4 bitmask weight (GEMV: tokens <= kQuantGemvTokens). kernel is null when the ISA (-1: best) is not
// supported or the shape or group is not one sq_linear accepts.
struct TeamQuant {
  QPacked w;
  QKernelFn kernel;
  bool vector;  // the input is quantized by the AVX2 routine (bit-identical to the portable one, faster)
};
TeamQuant team_quant(const uint16_t* masks, const int32_t* offsets, const uint8_t* codes, const float* scales,
                     const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group, int isa);

// Bytes of caller memory that team_quantize_input needs for `tokens` tokens of `cols` columns (64-byte aligned).
size_t team_input_bytes(int64_t tokens, int64_t cols);
// x [tokens][cols] quantized into mem (team_input_bytes, 64-byte aligned), as sq_linear quantizes its input.
QInput team_quantize_input(const float* x, int64_t tokens, int64_t cols, bool vector, uint8_t* mem);
// Rows [r0, r1) of y = x W^T + bias from the quantized input; false when the thread's kernel scratch cannot be had.
bool team_quant_rows(const TeamQuant& q, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1);

}  // namespace sp
