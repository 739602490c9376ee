// C ABI of the strataprune CPU sparse kernels: run-time ISA dispatch, OpenMP threading, scratch memory
// and format validation. Python calls these through ctypes on tensor data pointers (see
// strataprune/kernels/_library.py), so the library never links against torch or Python.
//
//   sp_linear(x[tokens, cols], packed W[rows, cols], bias[rows] or NULL, y[tokens, rows], isa, threads)
//     y = x W^T + bias; tokens <= 8: GEMV kernel (weights streamed once, every token per weight load);
//     more: GEMM in passes of 128 tokens, each tile (32 rows x up to 1024 columns) decoded once per pass and
//     reused for both 64-token blocks.
//   isa: -1 best the CPU supports, 0 portable, 1 AVX2, 2 AVX-512F; threads: <= 0 means OpenMP's default.
#include <cstdlib>
#include <cstring>

#include "sparse_kernels.h"
#include "team_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_WIN32)
#define SP_API extern "C" __declspec(dllexport)
#else
#define SP_API extern "C" __attribute__((visibility("default")))
#endif

static_assert(sp::kTokenBlock == 64, "the AVX2 decode shifts column indices by 6 (x 64 tokens)");
static_assert(sp::kMaxSpanGroups * sp::kGroup * sp::kTokenBlock <= 65536, "decoded column offsets are uint16");

namespace sp {
namespace {

enum Status : int {
  kOk = 0,
  kUnsupportedIsa = -1,  // the CPU (or this build) lacks the requested instruction set
  kBadShape = -2,        // negative sizes or a weight too large for 32-bit offsets
  kNoMemory = -3,
  kBadFormat = -4,       // masks/offsets/values disagree (sp_validate)
};

constexpr int64_t kPassBlocks = 2;          // token blocks per GEMM pass (128 tokens): bounds scratch memory
constexpr int64_t kSerialWork = 48 * 1024;  // below this many (nonzeros x tokens + mask words), one thread is faster

bool cpu_has(int isa) {
  if (isa == kPortable) return true;
#if SP_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return false;
}

int best_isa() {
  for (int isa = kAvx512; isa > kPortable; --isa)
    if (cpu_has(isa)) return isa;
  return kPortable;
}

GemvFn gemv_for(int isa) {
#if SP_X86
  if (isa == kAvx512) return gemv_avx512;
  if (isa == kAvx2) return gemv_avx2;
#endif
  return isa == kPortable ? gemv_portable : nullptr;
}

GemmTileFn gemm_for(int isa) {
#if SP_X86
  if (isa == kAvx512) return gemm_tile_avx512;
  if (isa == kAvx2) return gemm_tile_avx2;
#endif
  return isa == kPortable ? gemm_tile_portable : nullptr;
}

// The transposes around the tiles: the AVX2 forms serve the AVX-512 GEMM too (every AVX-512 CPU the
// dispatcher accepts has AVX2).
struct GemmLayout {
  GemmPackInputFn pack_input;
  GemmUnpackOutputFn unpack_output;
};

GemmLayout layout_for(int isa) {
#if SP_X86
  if (isa == kAvx512 || isa == kAvx2) return {gemm_pack_input_avx2, gemm_unpack_output_avx2};
#endif
  (void)isa;
  return {gemm_pack_input_portable, gemm_unpack_output_portable};
}

int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Grow-only scratch per calling thread: GEMM runs at every prefill, and a fresh multi-MB allocation
// each time costs page faults comparable to a small layer's whole matmul.
struct Scratch {
  char* raw;
  size_t bytes;
};
thread_local Scratch tls_scratch = {nullptr, 0};

char* scratch(size_t bytes) {
  if (tls_scratch.bytes < bytes) {
    std::free(tls_scratch.raw);
    tls_scratch.raw = static_cast<char*>(std::malloc(bytes + 64));
    tls_scratch.bytes = tls_scratch.raw ? bytes : 0;
  }
  if (!tls_scratch.raw) return nullptr;
  return tls_scratch.raw + (64 - reinterpret_cast<uintptr_t>(tls_scratch.raw) % 64);
}

size_t round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

// Work before row n: the nonzeros of earlier rows plus their mask words (an empty row still costs its masks).
int64_t work_before(const Packed& w, int64_t n) { return static_cast<int64_t>(w.offsets[n * w.chunks]) + n * w.groups; }

// Rows [r0, r1) in tiles of kTileRows, each tile's columns in spans (the whole row up to 1024 columns, else 256),
// every span walked by fn in 128-column segments: the one tiling both the GEMM and the team's row ranges use.
void walk_tiles(const Packed& w, int64_t r0, int64_t r1, GemmTile& tile, GemmTileFn fn) {
  const int64_t span = w.groups <= kMaxSpanGroups ? w.groups : kGroupsPerChunk;
  tile.sub = kSegmentGroups;
  for (int64_t n = r0; n < r1; n += kTileRows) {
    tile.r0 = n;
    tile.r1 = n + kTileRows < r1 ? n + kTileRows : r1;
    for (int64_t g = 0; g < w.groups; g += span) {
      tile.g0 = g;
      tile.g1 = g + span < w.groups ? g + span : w.groups;
      fn(tile);
    }
  }
}

// First row of thread t of nt, so that every thread gets about the same work.
int64_t split(const Packed& w, int t, int nt) {
  if (t <= 0) return 0;
  if (t >= nt) return w.rows;
  const int64_t target = work_before(w, w.rows) * t / nt;
  int64_t lo = 0, hi = w.rows;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (work_before(w, mid) < target) lo = mid + 1; else hi = mid;
  }
  return lo;
}

int gemv(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, GemvFn fn, int threads) {
  const int64_t work = static_cast<int64_t>(w.offsets[w.rows * w.chunks]) * tokens + w.rows * w.groups;
  if (threads <= 1 || work < kSerialWork || w.rows < 2) {
    fn(w, x, tokens, bias, y, 0, w.rows);
    return kOk;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id(), nt = team_size();
    const int64_t r0 = split(w, t, nt), r1 = split(w, t + 1, nt);
    if (r0 < r1) fn(w, x, tokens, bias, y, r0, r1);
  }
#endif
  return kOk;
}

int gemm(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, GemmTileFn fn, GemmLayout layout,
         int threads) {
  const int64_t work = static_cast<int64_t>(w.offsets[w.rows * w.chunks]) * tokens + w.rows * w.groups;
  if (work < kSerialWork) threads = 1;
  const int64_t pass_blocks = (tokens + kTokenBlock - 1) / kTokenBlock < kPassBlocks
                                  ? (tokens + kTokenBlock - 1) / kTokenBlock : kPassBlocks;
  const size_t xp_bytes = round64(static_cast<size_t>(pass_blocks * kTokenBlock * w.cols) * sizeof(float));
  const size_t yt_bytes = round64(static_cast<size_t>(w.rows * pass_blocks * kTokenBlock) * sizeof(float));
  const size_t idx_bytes = round64((kTileRows * kMaxSpanGroups * kGroup + kGroup) * sizeof(uint16_t));
  const size_t starts_bytes = round64((kTileRows * kMaxSpanGroups + 1) * sizeof(int32_t));
  char* mem = scratch(xp_bytes + yt_bytes + static_cast<size_t>(threads) * (idx_bytes + starts_bytes));
  if (!mem) return kNoMemory;
  float* xp = reinterpret_cast<float*>(mem);
  float* yt = reinterpret_cast<float*>(mem + xp_bytes);
  char* per_thread = mem + xp_bytes + yt_bytes;

  for (int64_t m0 = 0; m0 < tokens; m0 += kPassBlocks * kTokenBlock) {
    const int64_t mt = tokens - m0 < kPassBlocks * kTokenBlock ? tokens - m0 : kPassBlocks * kTokenBlock;
    const int64_t blocks = (mt + kTokenBlock - 1) / kTokenBlock, width = blocks * kTokenBlock;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
      const int t = thread_id(), nt = team_size();
      // 1. the input, token-minor: xp[block][k][j] = x[m0 + 64 block + j][k] (zero past the last token), 16
      // tokens per step
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t t16 = 0; t16 < width; t16 += 16) layout.pack_input(x + m0 * w.cols, w.cols, mt, t16, t16 + 16, xp);
      // implicit barrier: every thread reads all of xp
      const int64_t r0 = split(w, t, nt), r1 = split(w, t + 1, nt);
      // 2. this thread's rows of yt start at the bias
      for (int64_t n = r0; n < r1; ++n) {
        const float b = bias ? bias[n] : 0.0f;
        for (int64_t j = 0; j < width; ++j) yt[n * width + j] = b;
      }
      // 3. tiles, row-major (the order the weights are stored, so they stream from memory); a tile reuses its
      // decoded offsets for every token block
      GemmTile tile;
      tile.w = &w;
      tile.xp = xp;
      tile.yt = yt;
      tile.blocks = blocks;
      tile.idx = reinterpret_cast<uint16_t*>(per_thread + static_cast<size_t>(t) * (idx_bytes + starts_bytes));
      tile.starts = reinterpret_cast<int32_t*>(per_thread + static_cast<size_t>(t) * (idx_bytes + starts_bytes) + idx_bytes);
      // Up to 1024 columns a tile spans the whole row (its masks decoded in one go), wider rows go 256 columns
      // per tile. Either way the tile is walked in 128-column segments, all its rows per segment, so that a
      // block's slice of the input (32 KB) stays in L1 while every row of the tile reads it (measured against
      // one segment per row on 576-column weights: 1.19x at 70% sparsity).
      walk_tiles(w, r0, r1, tile, fn);
      // 4. back to token-major y
      layout.unpack_output(yt, width, mt, w.rows, r0, r1, y + m0 * w.rows);
    }
  }
  return kOk;
}

bool shape_ok(int64_t rows, int64_t cols) {
  return rows >= 0 && cols >= 0 && cols <= (int64_t{1} << 40) && rows <= (int64_t{1} << 40);
}

Packed make_packed(const uint16_t* masks, const float* values, const int32_t* offsets, int64_t rows, int64_t cols) {
  Packed w;
  w.rows = rows;
  w.cols = cols;
  w.groups = (cols + kGroup - 1) / kGroup;
  w.chunks = (cols + kChunk - 1) / kChunk;
  w.masks = masks;
  w.values = values;
  w.offsets = offsets;
  return w;
}

}  // namespace

TeamSparse team_sparse(const uint16_t* masks, const float* values, const int32_t* offsets, int64_t rows, int64_t cols,
                       int isa, bool gemm) {
  if (isa < 0) isa = best_isa();
  TeamSparse s{make_packed(masks, values, offsets, rows, cols), cpu_has(isa) ? gemv_for(isa) : nullptr, nullptr, nullptr,
               nullptr};
  if (gemm && s.kernel) {
    const GemmLayout layout = layout_for(isa);
    s.tile = gemm_for(isa);
    s.pack = layout.pack_input;
    s.unpack = layout.unpack_output;
  }
  return s;
}

namespace {
constexpr int64_t kPassTokens = kPassBlocks * kTokenBlock;
const size_t kIdxBytes = round64((kTileRows * kMaxSpanGroups * kGroup + kGroup) * sizeof(uint16_t));
const size_t kStartsBytes = round64((kTileRows * kMaxSpanGroups + 1) * sizeof(int32_t));
int64_t passes_of(int64_t tokens) { return (tokens + kPassTokens - 1) / kPassTokens; }
size_t packed_bytes(int64_t tokens, int64_t cols) { return round64(passes_of(tokens) * kPassTokens * cols * sizeof(float)); }
}  // namespace

// [packed input: per pass, kPassTokens x cols][output tile: block_rows x kPassTokens][tile idx][tile starts]
size_t team_sparse_gemm_bytes(int64_t tokens, int64_t cols, int64_t block_rows) {
  return packed_bytes(tokens, cols) + round64(block_rows * kPassTokens * sizeof(float)) + kIdxBytes + kStartsBytes;
}

void team_sparse_pack(const TeamSparse& s, const float* x, int64_t tokens, char* mem) {
  const int64_t cols = s.w.cols;
  for (int64_t pass = 0; pass < passes_of(tokens); ++pass) {
    const int64_t m0 = pass * kPassTokens, mt = tokens - m0 < kPassTokens ? tokens - m0 : kPassTokens;
    const int64_t width = (mt + kTokenBlock - 1) / kTokenBlock * kTokenBlock;
    float* xp = reinterpret_cast<float*>(mem) + pass * kPassTokens * cols;
    for (int64_t t16 = 0; t16 < width; t16 += 16) s.pack(x + m0 * cols, cols, mt, t16, t16 + 16, xp);
  }
}

// gemm()'s steps 2-4 for rows [r0, r1), the output tile addressed from row r0
void team_sparse_gemm_rows(const TeamSparse& s, int64_t tokens, const float* bias, float* y, int64_t r0, int64_t r1,
                           int64_t block_rows, char* mem) {
  const Packed& w = s.w;
  float* tile_out = reinterpret_cast<float*>(mem + packed_bytes(tokens, w.cols));
  char* tile_mem = mem + packed_bytes(tokens, w.cols) + round64(block_rows * kPassTokens * sizeof(float));
  for (int64_t pass = 0; pass < passes_of(tokens); ++pass) {
    const int64_t m0 = pass * kPassTokens, mt = tokens - m0 < kPassTokens ? tokens - m0 : kPassTokens;
    const int64_t blocks = (mt + kTokenBlock - 1) / kTokenBlock, width = blocks * kTokenBlock;
    float* yt = tile_out - r0 * width;
    for (int64_t n = r0; n < r1; ++n) {
      const float b = bias ? bias[n] : 0.0f;
      for (int64_t j = 0; j < width; ++j) yt[n * width + j] = b;
    }
    GemmTile tile;
    tile.w = &w;
    tile.xp = reinterpret_cast<const float*>(mem) + pass * kPassTokens * w.cols;
    tile.yt = yt;
    tile.blocks = blocks;
    tile.idx = reinterpret_cast<uint16_t*>(tile_mem);
    tile.starts = reinterpret_cast<int32_t*>(tile_mem + kIdxBytes);
    walk_tiles(w, r0, r1, tile, s.tile);
    s.unpack(yt, width, mt, w.rows, r0, r1, y + m0 * w.rows);
  }
}

}  // namespace sp

SP_API int sp_abi_version(void) { return 1; }

SP_API int sp_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

SP_API int sp_isa_supported(int isa) { return sp::cpu_has(isa) ? 1 : 0; }

SP_API int sp_best_isa(void) { return sp::best_isa(); }

SP_API int sp_default_threads(void) { return sp::resolve_threads(0); }

SP_API void sp_release_scratch(void) {
  std::free(sp::tls_scratch.raw);
  sp::tls_scratch.raw = nullptr;
  sp::tls_scratch.bytes = 0;
}

// Checks that masks and offsets agree (every chunk's offset step is the popcount of its masks, no bit
// past the last column, offsets start at 0 and end at most at nvalues). Returns 0 or kBadFormat.
SP_API int sp_validate(const uint16_t* masks, const int32_t* offsets, int64_t rows, int64_t cols, int64_t nvalues) {
  using namespace sp;
  if (!shape_ok(rows, cols)) return kBadShape;
  const Packed w = make_packed(masks, nullptr, offsets, rows, cols);
  if (offsets[0] != 0) return kBadFormat;
  const uint32_t tail = cols % kGroup ? (1u << (cols % kGroup)) - 1u : 0xFFFFu;
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t c = 0; c < w.chunks; ++c) {
      int64_t count = 0;
      const int64_t g1 = (c + 1) * kGroupsPerChunk < w.groups ? (c + 1) * kGroupsPerChunk : w.groups;
      for (int64_t g = c * kGroupsPerChunk; g < g1; ++g) {
        const uint32_t m = masks[n * w.groups + g];
        if (g == w.groups - 1 && (m & ~tail)) return kBadFormat;
        count += popcount(m);
      }
      const int64_t i = n * w.chunks + c;
      if (static_cast<int64_t>(offsets[i + 1]) - offsets[i] != count) return kBadFormat;
    }
  if (offsets[rows * w.chunks] > nvalues) return kBadFormat;
  return kOk;
}

SP_API int sp_linear(const float* x, int64_t tokens, const uint16_t* masks, const float* values, const int32_t* offsets,
                     int64_t rows, int64_t cols, const float* bias, float* y, int isa, int threads) {
  using namespace sp;
  if (!shape_ok(rows, cols) || tokens < 0) return kBadShape;
  if (isa < 0) isa = best_isa();
  if (!cpu_has(isa) || !gemv_for(isa)) return kUnsupportedIsa;
  if (tokens == 0 || rows == 0) return kOk;
  const Packed w = make_packed(masks, values, offsets, rows, cols);
  threads = resolve_threads(threads);
  if (tokens <= kMaxGemvTokens) return gemv(w, x, tokens, bias, y, gemv_for(isa), threads);
  return gemm(w, x, tokens, bias, y, gemm_for(isa), layout_for(isa), threads);
}
