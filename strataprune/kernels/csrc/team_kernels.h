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

// fp32 bitmask weight: the GEMV kernel (tokens <= kMaxGemvTokens), and with gemm the GEMM's tile kernel and its
// input / output transposes (sp_linear's choice above kMaxGemvTokens). kernel (tile) is null when the ISA is not
// supported.
struct TeamSparse {
  Packed w;
  GemvFn kernel;
  GemmTileFn tile;
  GemmPackInputFn pack;
  GemmUnpackOutputFn unpack;
};
TeamSparse team_sparse(const uint16_t* masks, const float* values, const int32_t* offsets, int64_t rows, int64_t cols,
                       int isa, bool gemm = false);
inline void team_sparse_rows(const TeamSparse& s, const float* x, int64_t tokens, const float* bias, float* y,
                             int64_t r0, int64_t r1) {
  s.kernel(s.w, x, tokens, bias, y, r0, r1);
}
// The GEMM for a team thread: the thread packs the phase's input once into its own memory (token-minor, in passes of
// 128 tokens, as sp_linear's GEMM packs it), then computes any rows [r0, r1) (at most block_rows) through its own
// output tile. Bytes of that memory for `tokens` tokens, `cols` columns, blocks of up to `block_rows` rows:
size_t team_sparse_gemm_bytes(int64_t tokens, int64_t cols, int64_t block_rows);
// x [tokens][s.w.cols] packed into mem (team_sparse_gemm_bytes, 64-byte aligned).
void team_sparse_pack(const TeamSparse& s, const float* x, int64_t tokens, char* mem);
// Rows [r0, r1) of y = x W^T + bias ([tokens][s.w.rows]) from the input packed into mem.
void team_sparse_gemm_rows(const TeamSparse& s, int64_t tokens, const float* bias, float* y, int64_t r0, int64_t r1,
                           int64_t block_rows, char* mem);

// int8 / int4 bitmask weight: the GEMV kernel, or with gemm the GEMM kernel (sq_linear's choice for tokens >
// kQuantGemvTokens; both compute any rows [r0, r1) from the quantized input). kernel is null when the ISA (-1: best)
// is not supported or the shape or group is not one sq_linear accepts. blocks: the weight's 1x4 block index
// (derive_block_index) or nullptr, as sq_linear_blocks takes it.
struct TeamQuant {
  QPacked w;
  QKernelFn kernel;
  bool vector;  // the input is quantized by the AVX2 routine (bit-identical to the portable one, faster)
};
TeamQuant team_quant(const uint16_t* masks, const int32_t* offsets, const uint8_t* codes, const float* scales,
                     const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group, int isa,
                     bool gemm = false, const uint8_t* blocks = nullptr);

// Bytes of caller memory that team_quantize_input needs for `tokens` tokens of `cols` columns (64-byte aligned).
size_t team_input_bytes(int64_t tokens, int64_t cols);
// x [tokens][cols] quantized into mem (team_input_bytes, 64-byte aligned), as sq_linear quantizes its input.
QInput team_quantize_input(const float* x, int64_t tokens, int64_t cols, bool vector, uint8_t* mem);
// Rows [r0, r1) of y = x W^T + bias from the quantized input; false when the thread's kernel scratch cannot be had.
bool team_quant_rows(const TeamQuant& q, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1);

}  // namespace sp
