// Internal header of the quantized sparse kernels (C ABI in quant_api.cpp; format in
// strataprune/kernels/quantized.py and docs/kernels-quantized.md).
//
// Weight format ("bitmask-16 + int8/int4 codes + row offsets + group scales"), W [rows, cols]:
//   masks   uint16 [rows][ceil(cols / 16)]  bit j of masks[n][g] set <=> column 16 g + j of row n is kept
//   offsets int32  [rows + 1]               index (in codes, i.e. kept weights) of row n's first code; last = nnz
//   codes   uint8  [ceil(nnz * bits / 8) + 64]  the kept weights' codes, row by row, columns ascending;
//           bits 8: byte i is the int8 code v_i in [-127, 127];
//           bits 4: code i is the low nibble of byte i / 2 when i is even, the high nibble when odd, q_i in [0, 15];
//           the last 64 bytes are zero padding, so that vector loads never leave the buffer
//   scales  fp32   [rows][ngroups]          ngroups = ceil(cols / group), group in {32, 64, 128} or cols (per row)
//   zeros   uint8  [rows][ngroups]          bits 4 only, in [0, 15]
//   W[n][k] = scales[n][k / group] * v        (bits 8, kept)
//   W[n][k] = scales[n][k / group] * (q - zeros[n][k / group])   (bits 4, kept);   0 where the mask bit is clear.
//
// Activations are quantized on the fly, per token and 128-column block (kActBlock): sx = max|x| / 127,
// xq = round-half-even(x / sx) in [-127, 127] (0 when the block is all zeros). Within a unit of
// U = min(group, 128) columns the products v * xq are summed exactly in int32, then
// y[t][n] = bias[n] + sum over units of float(sum) * (scale * sx).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "sparse_kernels.h"

namespace sp {

constexpr int64_t kActBlock = 128;        // columns per activation scale

// Columns [k0, k1) of a row as int8 codes in dst[0, kActBlock) (0 past k1): symmetric, round to nearest, clamped to
// +-127, NaN as 0. Returns the block's scale amax / 127. Every activation quantizer of the kernels and the decoder
// uses it, so they give the same codes.
inline float quantize_act_block(const float* src, int64_t k0, int64_t k1, int8_t* dst) {
  float amax = 0.0f;
  for (int64_t k = k0; k < k1; ++k) amax = std::fabs(src[k]) > amax ? std::fabs(src[k]) : amax;
  const float scale = amax / 127.0f;
  for (int64_t k = k0; k < k0 + kActBlock; ++k) {
    float r = (k < k1 && scale > 0.0f) ? std::nearbyint(src[k] / scale) : 0.0f;
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    dst[k - k0] = static_cast<int8_t>(r == r ? r : 0.0f);
  }
  return scale;
}
constexpr int64_t kCodePad = 64;          // zero bytes after the last code
constexpr int64_t kQuantGemvTokens = 4;   // up to this many tokens: GEMV kernels; above: GEMM

struct QPacked {
  int64_t rows, cols, words;  // words = ceil(cols / 16)
  int bits;                   // 8 or 4
  int64_t group;              // columns per scale group (cols when per row)
  int group_shift;            // k >> group_shift = k / group (62 when per row: every column in group 0)
  int64_t ngroups;
  int64_t unit;               // min(group, kActBlock): columns summed exactly in int32
  const uint16_t* masks;
  const int32_t* offsets;
  const uint8_t* codes;
  const float* scales;
  const uint8_t* zeros;       // bits 4 only
  // The 1x4 block index (derive_block_index), or nullptr: where set, the GEMVs (1-4 tokens) of the AVX2 and AVX-512 paths
  // expand whole 4-column units instead of single columns (same sums, same results); the other kernels ignore it.
  const uint8_t* blocks;
  int64_t block_stride;       // bytes per row of blocks
};

// The 1x4 block index of a mask whose every aligned 4-column nibble of every row is all kept or all pruned (cols a
// multiple of 4): bit i of byte b of row n is set <=> columns 32 b + 4 i .. 32 b + 4 i + 3 of row n are kept, i.e.
// dword lane i of the row's 32-column vector b. Rows are block_index_stride(cols) bytes (a multiple of 8, zero past
// the last column), so that a 64-column vector's 16 bits and a 128-column vector's 32 bits are whole loads too.
inline int64_t block_index_stride(int64_t cols) { return (cols + 255) / 256 * 8; }
// Fills out (rows * block_index_stride(cols) bytes; nullptr: only checks) and returns true when the mask is 1x4
// blocked; false (out partly written) when it is not, cols is not a multiple of 4, or there are no rows or columns.
bool derive_block_index(const uint16_t* masks, int64_t rows, int64_t cols, uint8_t* out);
// Whether the kernels take the block path where a weight has a block index (sq_set_block_path; default true); call it
// only where a true answer takes the path (it counts those calls: sq_block_path_calls).
bool block_path_enabled();

// The quantized input, shared by all threads of a call. cols_pad = cols rounded up to kActBlock (zero-filled).
struct QInput {
  int64_t tokens, cols_pad;
  const int8_t* xq;      // [tokens][cols_pad]
  const float* sx;       // [tokens][cols_pad / kActBlock]
  const int32_t* quad;   // [tokens][cols_pad / 4]: 128 * (sum of xq over 4 consecutive columns), the VNNI offset correction
  const int32_t* block;  // [tokens][cols_pad / 32]: 128 * (sum of xq over 32 consecutive columns)
};

// y[t][n] = sum_k x[t][k] W[n][k] + bias[n] for rows [r0, r1) and every token (GEMV: tokens <= kQuantGemvTokens).
using QKernelFn = void (*)(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1);

void qlinear_portable(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
#if SP_X86
void qgemv_avx2(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
void qgemm_avx2(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
void qgemv_avx2_vnni(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
void qgemm_avx2_vnni(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
void qgemv_avx512(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
void qgemm_avx512(const QPacked&, const QInput&, const float*, float*, int64_t, int64_t);
#endif

// Grow-only scratch of the calling thread (the OpenMP pool's threads persist, so it survives calls). Slots: 0 the
// portable kernel's row lists, 1 row buffers and GEMM tiles, 2 the AVX2 GEMV's per-unit corrections, 3 the input.
uint8_t* quant_scratch(int slot, size_t bytes);

// The kept-weight mask of row n, columns [64 b, 64 b + 64) (bits past the last column are clear).
inline uint64_t mask64(const QPacked& w, int64_t n, int64_t b) {
  const uint16_t* m = w.masks + n * w.words + 4 * b;
  const int64_t left = w.words - 4 * b;
  uint64_t bits = 0;
  for (int64_t i = 0; i < 4 && i < left; ++i) bits |= static_cast<uint64_t>(m[i]) << (16 * i);
  return bits;
}

inline int popcount64(uint64_t m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(m);
#else
  int c = 0;
  for (; m; m &= m - 1) ++c;
  return c;
#endif
}

// bits 4: the codes of row n unpacked to one byte each (q in [0, 15]) into buf; returns where code 0 of the row
// is. Writes at most cols + 128 bytes (row_buffer_bytes).
inline int64_t row_buffer_bytes(const QPacked& w) { return w.cols + 128; }
uint8_t* unpack_row_nibbles(const QPacked& w, int64_t n, uint8_t* buf);
#if SP_X86
uint8_t* unpack_row_nibbles_avx2(const QPacked& w, int64_t n, uint8_t* buf);
// The AVX2 1-token GEMV's shuffle controls: -1 chosen by the L2 size, 0 the 8-bit tables, 1 the 16-bit table.
void set_avx2_shuffle(int mode);
void quantize_tokens_avx2(const float* x, int64_t cols, const QInput& in, int8_t* xq, float* sx, int32_t* quad,
                          int32_t* block, int64_t t0, int64_t t1);
#endif

}  // namespace sp
