// Internal header of the strataprune CPU sparse kernels (the C ABI is in api.cpp).
//
// Weight format ("bitmask-16 + packed fp32 + chunk offsets"), for a Linear weight W [rows, cols]:
//   masks   uint16 [rows][groups]        bit j of masks[n][g] set <=> W[n][16 g + j] != 0 (groups = ceil(cols / 16))
//   values  fp32   [nnz]                 the nonzeros, row by row, in column order
//   offsets int32  [rows * chunks + 1]   index in values of the first nonzero of (row n, chunk c) at n * chunks + c,
//                                        chunks = ceil(cols / 256); the last entry is nnz
// Bytes per weight at density d: 2/16 (mask) + 4 d (values) + 4/256 (offsets) = 0.141 + 4 d
// (0.335 of dense fp32 at 70% sparsity, 0.235 at 80%, 0.135 at 90%).
//
// The chunk offsets let a kernel start anywhere in a row without a popcount walk from its beginning:
// GEMM tiles start at a chunk, and GEMV walks several rows at once (independent popcount chains) so
// the serial "pointer += popcount(mask)" dependency of one row does not bound throughput.
#pragma once

#include <cstdint>

#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SP_X86 1
#else
#define SP_X86 0
#endif

namespace sp {

constexpr int64_t kGroup = 16;                       // columns per mask word
constexpr int64_t kChunk = 256;                      // columns per offsets entry
constexpr int64_t kGroupsPerChunk = kChunk / kGroup;
constexpr int64_t kTokenBlock = 64;                  // tokens per GEMM register block (layout of xp and yt)
constexpr int64_t kMaxSpanGroups = 64;               // a GEMM tile spans at most 1024 columns (uint16 offsets)
constexpr int64_t kMaxGemvTokens = 8;                // up to this many tokens: GEMV kernel; above: GEMM
constexpr int64_t kTileRows = 32;                   // rows decoded together in a GEMM tile
constexpr int64_t kSegmentGroups = 8;               // a GEMM segment: 128 columns, 32 KB of a 64-token block's input

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

struct Packed {
  int64_t rows, cols, groups, chunks;
  const uint16_t* masks;
  const float* values;
  const int32_t* offsets;
};

// y[t][n] = sum_k x[t][k] W[n][k] + bias[n] for rows [r0, r1), tokens t < tokens (<= kMaxGemvTokens)
using GemvFn = void (*)(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, int64_t r0,
                        int64_t r1);

// One GEMM tile: rows [r0, r1) x groups [g0, g1) (g0 a multiple of kGroupsPerChunk, at most kMaxSpanGroups
// groups), every token block. Decodes the tile's masks into column offsets once, one segment per row and
// `sub` groups, then for each token block and segment column range adds W[n, range] . xp[block, range]
// into yt[n, block] for every row of the tile.
struct GemmTile {
  const Packed* w;
  const float* xp;  // [blocks][cols][kTokenBlock]: the input, token-minor (zero-padded tokens)
  float* yt;        // [rows][blocks * kTokenBlock]: the output, token-minor, pre-filled with the bias
  int64_t blocks;
  int64_t g0, g1;   // the tile's column groups
  int64_t sub;      // groups per segment
  int64_t r0, r1;   // row range
  uint16_t* idx;    // scratch: >= kTileRows * kMaxSpanGroups * kGroup + kGroup entries (offsets into xp, k * kTokenBlock)
  int32_t* starts;  // scratch: >= kTileRows * kMaxSpanGroups + 1 entries (segment starts in idx)
  int64_t segments() const { return (g1 - g0 + sub - 1) / sub; }
};
using GemmTileFn = void (*)(const GemmTile& tile);

// The GEMM's layout changes (kernels_gemm_layout.cpp). pack_input: xp[t / 64][k][t % 64] = x[t][k] for tokens
// [t0, t1) (multiples of 16), zero for tokens >= valid. unpack_output: y[j][n] = yt[n][j] for tokens j < valid
// and rows [r0, r1) (y has `rows` columns, yt `width`).
using GemmPackInputFn = void (*)(const float* x, int64_t cols, int64_t valid, int64_t t0, int64_t t1, float* xp);
using GemmUnpackOutputFn = void (*)(const float* yt, int64_t width, int64_t valid, int64_t rows, int64_t r0, int64_t r1,
                                    float* y);
void gemm_pack_input_portable(const float*, int64_t, int64_t, int64_t, int64_t, float*);
void gemm_unpack_output_portable(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
#if SP_X86
void gemm_pack_input_avx2(const float*, int64_t, int64_t, int64_t, int64_t, float*);
void gemm_unpack_output_avx2(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
#endif

void gemv_portable(const Packed&, const float*, int64_t, const float*, float*, int64_t, int64_t);
void gemm_tile_portable(const GemmTile&);
#if SP_X86
void gemv_avx2(const Packed&, const float*, int64_t, const float*, float*, int64_t, int64_t);
void gemm_tile_avx2(const GemmTile&);
void gemv_avx512(const Packed&, const float*, int64_t, const float*, float*, int64_t, int64_t);
void gemm_tile_avx512(const GemmTile&);
#endif

#if SP_X86
// Software prefetch for the GEMV loops: while rows [n0, n0 + R) are processed, one cache line per group
// of the next rows' masks and values (contiguous in both arrays) is requested. A GEMV is memory bound,
// a single core's memory parallelism is its limit, and the hardware prefetchers do not run far enough
// ahead on R short interleaved streams (measured: +10-25% at 50-90% sparsity on 4096 x 4096 weights).
struct Prefetcher {
  const char *values, *values_end, *masks, *masks_end;
  Prefetcher(const Packed& w, int64_t n0, int64_t n1) {
    n0 = n0 < w.rows ? n0 : w.rows;
    n1 = n1 < w.rows ? n1 : w.rows;
    values = reinterpret_cast<const char*>(w.values + w.offsets[n0 * w.chunks]);
    values_end = reinterpret_cast<const char*>(w.values + w.offsets[n1 * w.chunks]);
    masks = reinterpret_cast<const char*>(w.masks + n0 * w.groups);
    masks_end = reinterpret_cast<const char*>(w.masks + n1 * w.groups);
  }
  void step() {
    if (values < values_end) {
      __builtin_prefetch(values, 0, 3);
      values += 64;
    }
    if (masks < masks_end) {
      __builtin_prefetch(masks, 0, 3);
      masks += 64;
    }
  }
};
#endif

inline int popcount(uint32_t m) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcount(m);
#else
  int c = 0;
  for (; m; m &= m - 1) ++c;
  return c;
#endif
}

inline int lowest_bit(uint32_t m) {  // m != 0
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_ctz(m);
#else
  int j = 0;
  while (!(m & 1u)) { m >>= 1; ++j; }
  return j;
#endif
}

}  // namespace sp
