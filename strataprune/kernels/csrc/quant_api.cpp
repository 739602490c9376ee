// C ABI of the quantized sparse kernels (int8 / int4 codes under the bitmask index; see quant_kernels.h):
// activation quantization, ISA dispatch, OpenMP row split, validation, and the portable kernel that
// every vector path is tested against (beside a plain Python loop over the format).
//
//   sq_linear(x[tokens, cols], packed W[rows, cols], bias[rows] or NULL, y[tokens, rows], isa, threads)
//     isa: -1 best, 0 portable, 1 AVX2 (with AVX-VNNI when the CPU has it), 2 AVX-512 (F, BW, VL, VBMI, VBMI2, VNNI),
//          3 AVX2 without AVX-VNNI (to measure and test that path on a CPU that has AVX-VNNI).
//   sq_linear_blocks: the same with the weight's 1x4 block index (sq_block_index; NULL: none), which the GEMVs
//     (1-4 tokens) of the AVX2 and AVX-512 paths use (sq_set_block_path turns that off process-wide, to compare).
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "quant_kernels.h"
#include "team_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_WIN32)
#define SQ_API extern "C" __declspec(dllexport)
#else
#define SQ_API extern "C" __attribute__((visibility("default")))
#endif

namespace sp {

namespace {
constexpr int kSlots = 4;
thread_local uint8_t* tls_raw[kSlots] = {nullptr, nullptr, nullptr, nullptr};
thread_local size_t tls_bytes[kSlots] = {0, 0, 0, 0};
}  // namespace

uint8_t* quant_scratch(int slot, size_t bytes) {
  if (tls_bytes[slot] < bytes) {
    std::free(tls_raw[slot]);
    tls_raw[slot] = static_cast<uint8_t*>(std::malloc(bytes + 64));
    tls_bytes[slot] = tls_raw[slot] ? bytes : 0;
  }
  if (!tls_raw[slot]) return nullptr;
  return tls_raw[slot] + (64 - reinterpret_cast<uintptr_t>(tls_raw[slot]) % 64);
}

bool derive_block_index(const uint16_t* masks, int64_t rows, int64_t cols, uint8_t* out) {
  if (rows < 1 || cols < 4 || cols % 4) return false;
  const int64_t words = (cols + kGroup - 1) / kGroup, stride = block_index_stride(cols);
  for (int64_t n = 0; n < rows; ++n) {
    uint8_t* row = out ? out + n * stride : nullptr;
    if (row) std::memset(row, 0, static_cast<size_t>(stride));
    for (int64_t g = 0; g < words; ++g) {
      const uint32_t m = masks[n * words + g];
      const uint32_t firsts = m & 0x1111u;  // each nibble's first bit: blocked <=> every nibble is 0 or 15 times it
      if (firsts * 15u != m) return false;
      if (!row) continue;
      const uint32_t four = (firsts & 1u) | (firsts >> 3 & 2u) | (firsts >> 6 & 4u) | (firsts >> 9 & 8u);
      row[g / 2] |= static_cast<uint8_t>(four << (4 * (g & 1)));  // word g holds blocks 4 g .. 4 g + 3
    }
  }
  return true;
}

namespace {
std::atomic<bool> g_block_path{true};        // sq_set_block_path
std::atomic<int64_t> g_block_path_calls{0};  // sq_block_path_calls
}  // namespace

bool block_path_enabled() {
  if (!g_block_path.load(std::memory_order_relaxed)) return false;
  g_block_path_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

uint8_t* unpack_row_nibbles(const QPacked& w, int64_t n, uint8_t* buf) {
  const int64_t first = w.offsets[n], last = w.offsets[n + 1];
  uint8_t* out = buf + (first & 1);
  for (int64_t i = first; i < last; ++i) {
    const uint8_t byte = w.codes[i >> 1];
    out[i - first] = (i & 1) ? byte >> 4 : byte & 0x0F;
  }
  return out;
}

// Reference kernel: a row's kept weights decoded into (column, integer value) lists, then per token the
// exact int32 sum per unit, scaled and accumulated in fp32.
void qlinear_portable(const QPacked& w, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  int32_t* cols = reinterpret_cast<int32_t*>(quant_scratch(0, static_cast<size_t>(w.cols + 1) * 8));
  int32_t* vals = cols + w.cols + 1;
  const int64_t ablocks = in.cols_pad / kActBlock;
  for (int64_t n = r0; n < r1; ++n) {
    int64_t count = 0, code = w.offsets[n];
    for (int64_t g = 0; g < w.words; ++g)
      for (uint32_t m = w.masks[n * w.words + g]; m; m &= m - 1, ++code) {
        const int64_t k = g * kGroup + lowest_bit(m);
        int32_t v;
        if (w.bits == 8) {
          v = static_cast<int8_t>(w.codes[code]);
        } else {
          const uint8_t byte = w.codes[code >> 1];
          v = static_cast<int32_t>((code & 1) ? byte >> 4 : byte & 0x0F) - w.zeros[n * w.ngroups + k / w.group];
        }
        cols[count] = static_cast<int32_t>(k);
        vals[count++] = v;
      }
    for (int64_t t = 0; t < in.tokens; ++t) {
      const int8_t* xq = in.xq + t * in.cols_pad;
      float acc = 0.0f;
      int64_t i = 0;
      while (i < count) {
        const int64_t unit = cols[i] / w.unit;
        int32_t sum = 0;
        for (; i < count && cols[i] / w.unit == unit; ++i) sum += vals[i] * xq[cols[i]];
        const float scale = w.scales[n * w.ngroups + unit * w.unit / w.group] * in.sx[t * ablocks + unit * w.unit / kActBlock];
        acc += static_cast<float>(sum) * scale;
      }
      y[t * w.rows + n] = acc + (bias ? bias[n] : 0.0f);
    }
  }
}

namespace {

enum Status : int { kOk = 0, kUnsupportedIsa = -1, kBadShape = -2, kNoMemory = -3, kBadFormat = -4, kBadGroup = -5 };
enum QIsa : int { kQPortable = 0, kQAvx2 = 1, kQAvx512 = 2, kQAvx2NoVnni = 3 };

bool has_avx_vnni() {
#if SP_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avxvnni");
#else
  return false;
#endif
}

bool qcpu_has(int isa) {
  if (isa == kQPortable) return true;
#if SP_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (isa == kQAvx2 || isa == kQAvx2NoVnni) return avx2;
  if (isa == kQAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("avx512vbmi2") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

int qbest_isa() {
  if (qcpu_has(kQAvx512)) return kQAvx512;
  if (qcpu_has(kQAvx2)) return kQAvx2;
  return kQPortable;
}

QKernelFn kernel_for(int isa, bool gemm) {
#if SP_X86
  if (isa == kQAvx512) return gemm ? qgemm_avx512 : qgemv_avx512;
  if (isa == kQAvx2 && has_avx_vnni()) return gemm ? qgemm_avx2_vnni : qgemv_avx2_vnni;
  if (isa == kQAvx2 || isa == kQAvx2NoVnni) return gemm ? qgemm_avx2 : qgemv_avx2;
#else
  (void)gemm;
#endif
  return isa == kQPortable ? qlinear_portable : nullptr;
}

// Quantizes the tokens [t0, t1) of x into the scratch input (see QInput).
void quantize_tokens(const float* x, int64_t cols, QInput& in, int8_t* xq, float* sx, int32_t* quad, int32_t* block,
                     int64_t t0, int64_t t1) {
  const int64_t ablocks = in.cols_pad / kActBlock;
  for (int64_t t = t0; t < t1; ++t) {
    const float* src = x + t * cols;
    int8_t* dst = xq + t * in.cols_pad;
    for (int64_t b = 0; b < ablocks; ++b) {
      const int64_t k0 = b * kActBlock, k1 = k0 + kActBlock < cols ? k0 + kActBlock : cols;
      sx[t * ablocks + b] = quantize_act_block(src, k0, k1, dst + k0);
    }
    for (int64_t q = 0; q < in.cols_pad / 4; ++q)
      quad[t * (in.cols_pad / 4) + q] = 128 * (dst[4 * q] + dst[4 * q + 1] + dst[4 * q + 2] + dst[4 * q + 3]);
    for (int64_t c = 0; c < in.cols_pad / 32; ++c) {
      int32_t s = 0;
      for (int64_t q = 0; q < 8; ++q) s += quad[t * (in.cols_pad / 4) + 8 * c + q];
      block[t * (in.cols_pad / 32) + c] = s;
    }
  }
}

int resolve_threads(int threads) {
#ifdef _OPENMP
  return threads > 0 ? threads : omp_get_max_threads();
#else
  (void)threads;
  return 1;
#endif
}

// First row of part t of nt, a multiple of `align`, balancing kept weights plus mask words.
int64_t split_rows(const QPacked& w, int t, int nt, int64_t align) {
  if (t <= 0) return 0;
  if (t >= nt) return w.rows;
  const auto work = [&](int64_t n) { return static_cast<int64_t>(w.offsets[n]) * 2 + n * w.words * 4; };
  const int64_t target = work(w.rows) * t / nt;
  int64_t lo = 0, hi = w.rows;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (work(mid) < target) lo = mid + 1; else hi = mid;
  }
  lo = (lo + align - 1) / align * align;
  return lo < w.rows ? lo : w.rows;
}

QPacked make_qpacked(const uint16_t* masks, const int32_t* offsets, const uint8_t* codes, const float* scales,
                     const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group, const uint8_t* blocks) {
  QPacked w;
  w.rows = rows;
  w.cols = cols;
  w.words = (cols + kGroup - 1) / kGroup;
  w.bits = bits;
  w.group = group;
  w.ngroups = (cols + group - 1) / group;
  w.group_shift = group == cols ? 62 : (group == 32 ? 5 : group == 64 ? 6 : 7);
  w.unit = group < kActBlock && group != cols ? group : kActBlock;  // per row: units are the activation blocks
  w.masks = masks;
  w.offsets = offsets;
  w.codes = codes;
  w.scales = scales;
  w.zeros = zeros;
  w.blocks = blocks;
  w.block_stride = block_index_stride(cols);
  return w;
}

// Where the quantized input of `tokens` x `cols` lies in one 64-byte aligned buffer of `bytes`.
struct InputLayout {
  int64_t tokens, cols_pad;
  size_t xq_bytes, sx_bytes, quad_bytes, block_bytes, bytes;
  void place(uint8_t* mem, QInput& in, int8_t*& xq, float*& sx, int32_t*& quad, int32_t*& block) const {
    xq = reinterpret_cast<int8_t*>(mem);
    sx = reinterpret_cast<float*>(mem + xq_bytes);
    quad = reinterpret_cast<int32_t*>(mem + xq_bytes + sx_bytes);
    block = reinterpret_cast<int32_t*>(mem + xq_bytes + sx_bytes + quad_bytes);
    in.tokens = tokens;
    in.cols_pad = cols_pad;
    in.xq = xq;
    in.sx = sx;
    in.quad = quad;
    in.block = block;
  }
};

InputLayout input_layout(int64_t tokens, int64_t cols) {
  InputLayout l;
  l.tokens = tokens;
  l.cols_pad = (cols + kActBlock - 1) / kActBlock * kActBlock;
  l.xq_bytes = (static_cast<size_t>(tokens * l.cols_pad) + 63) / 64 * 64;
  l.sx_bytes = (static_cast<size_t>(tokens * (l.cols_pad / kActBlock)) * 4 + 63) / 64 * 64;
  l.quad_bytes = static_cast<size_t>(tokens * l.cols_pad);  // int32 per 4 columns
  l.block_bytes = (static_cast<size_t>(tokens * (l.cols_pad / 32)) * 4 + 63) / 64 * 64;
  l.bytes = l.xq_bytes + l.sx_bytes + l.quad_bytes + l.block_bytes;
  return l;
}

bool group_ok(int64_t group, int64_t cols) { return group == 32 || group == 64 || group == 128 || (group == cols && cols > 0); }

// the kernels' per-thread scratch, reserved up front so that an allocation failure is a status, not a crash
bool reserve_kernel_scratch(const QPacked& w, int64_t tokens) {
  const size_t need = static_cast<size_t>(16 * row_buffer_bytes(w)) + static_cast<size_t>(tokens) * 64 + 8192;
  return quant_scratch(1, need) && quant_scratch(0, static_cast<size_t>(w.cols + 1) * 8) &&
         quant_scratch(2, static_cast<size_t>(w.cols) + 64);
}

}  // namespace

TeamQuant team_quant(const uint16_t* masks, const int32_t* offsets, const uint8_t* codes, const float* scales,
                     const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group, int isa, bool gemm,
                     const uint8_t* blocks) {
  TeamQuant q{make_qpacked(masks, offsets, codes, scales, zeros, rows, cols, bits, group, blocks), nullptr, false};
  if (isa < 0) isa = qbest_isa();
  if (rows < 1 || cols < 1 || (bits != 8 && bits != 4) || !group_ok(group, cols) || !qcpu_has(isa)) return q;
  q.kernel = kernel_for(isa, gemm);
#if SP_X86
  q.vector = isa != kQPortable;
#endif
  return q;
}

size_t team_input_bytes(int64_t tokens, int64_t cols) { return input_layout(tokens, cols).bytes; }

QInput team_quantize_input(const float* x, int64_t tokens, int64_t cols, bool vector, uint8_t* mem) {
  QInput in;
  int8_t* xq;
  float* sx;
  int32_t *quad, *block;
  input_layout(tokens, cols).place(mem, in, xq, sx, quad, block);
#if SP_X86
  if (vector)
    quantize_tokens_avx2(x, cols, in, xq, sx, quad, block, 0, tokens);
  else
#endif
    quantize_tokens(x, cols, in, xq, sx, quad, block, 0, tokens);
  (void)vector;
  return in;
}

bool team_quant_rows(const TeamQuant& q, const QInput& in, const float* bias, float* y, int64_t r0, int64_t r1) {
  if (!reserve_kernel_scratch(q.w, in.tokens)) return false;
  q.kernel(q.w, in, bias, y, r0, r1);
  return true;
}

}  // namespace sp

SQ_API int sq_isa_supported(int isa) { return sp::qcpu_has(isa) ? 1 : 0; }

SQ_API int sq_best_isa(void) { return sp::qbest_isa(); }

SQ_API int sq_has_avx_vnni(void) { return sp::has_avx_vnni() ? 1 : 0; }

// the AVX2 GEMV's shuffle tables (quant_avx2.cpp): -1 by the L2 size, 0 8-bit tables, 1 the 16-bit table
SQ_API void sq_set_avx2_shuffle(int mode) {
#if SP_X86
  sp::set_avx2_shuffle(mode);
#else
  (void)mode;
#endif
}

// Masks agree with row offsets (each row's step is its popcount, no bit past the last column, offsets start
// at 0) and the codes buffer holds the nnz codes plus the padding. Returns 0 or kBadFormat.
SQ_API int sq_validate(const uint16_t* masks, const int32_t* offsets, int64_t rows, int64_t cols, int bits,
                       int64_t code_bytes) {
  using namespace sp;
  if (rows < 0 || cols < 0 || (bits != 8 && bits != 4)) return kBadShape;
  if (offsets[0] != 0) return kBadFormat;
  const int64_t words = (cols + kGroup - 1) / kGroup;
  const uint32_t tail = cols % kGroup ? (1u << (cols % kGroup)) - 1u : 0xFFFFu;
  for (int64_t n = 0; n < rows; ++n) {
    int64_t count = 0;
    for (int64_t g = 0; g < words; ++g) {
      const uint32_t m = masks[n * words + g];
      if (g == words - 1 && (m & ~tail)) return kBadFormat;
      count += popcount(m);
    }
    if (static_cast<int64_t>(offsets[n + 1]) - offsets[n] != count) return kBadFormat;
  }
  const int64_t nnz = offsets[rows];
  if (code_bytes < (nnz * bits + 7) / 8 + kCodePad) return kBadFormat;
  return kOk;
}

SQ_API int64_t sq_block_index_bytes(int64_t rows, int64_t cols) {
  return rows > 0 && cols > 0 ? rows * sp::block_index_stride(cols) : 0;
}

// 1 and the block index in out (sq_block_index_bytes; NULL: only the check) when masks (validated, sq_validate) are
// 1x4 blocked, else 0
SQ_API int sq_block_index(const uint16_t* masks, int64_t rows, int64_t cols, uint8_t* out) {
  return sp::derive_block_index(masks, rows, cols, out) ? 1 : 0;
}

// 0: the kernels ignore block indexes (the bitmask path everywhere), 1 (default): they use them; returns the previous
// setting. Read at each kernel call (the native decoder's planned weights follow it too).
SQ_API int sq_set_block_path(int enabled) {
  return sp::g_block_path.exchange(enabled != 0, std::memory_order_relaxed) ? 1 : 0;
}

// How many kernel calls (row ranges) have taken the block path in this process: tests check that a path really uses it.
SQ_API int64_t sq_block_path_calls() { return sp::g_block_path_calls.load(std::memory_order_relaxed); }

SQ_API int sq_linear_blocks(const float* x, int64_t tokens, const uint16_t* masks, const int32_t* offsets,
                            const uint8_t* codes, const float* scales, const uint8_t* zeros, const uint8_t* blocks,
                            int64_t rows, int64_t cols, int bits, int64_t group, const float* bias, float* y, int isa,
                            int threads) {
  using namespace sp;
  if (rows < 0 || cols < 0 || tokens < 0 || (bits != 8 && bits != 4)) return kBadShape;
  if (!group_ok(group, cols) && rows > 0 && cols > 0) return kBadGroup;
  if (isa < 0) isa = qbest_isa();
  if (!qcpu_has(isa)) return kUnsupportedIsa;
  if (tokens == 0 || rows == 0) return kOk;
  if (cols == 0) {
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t n = 0; n < rows; ++n) y[t * rows + n] = bias ? bias[n] : 0.0f;
    return kOk;
  }
  const QPacked w = make_qpacked(masks, offsets, codes, scales, zeros, rows, cols, bits, group, blocks);
  uint8_t* mem = quant_scratch(3, input_layout(tokens, cols).bytes);
  if (!mem) return kNoMemory;
  QInput in;
  int8_t* xq;
  float* sx;
  int32_t *quad, *block;
  input_layout(tokens, cols).place(mem, in, xq, sx, quad, block);

  const bool gemm = tokens > kQuantGemvTokens;
  const QKernelFn fn = kernel_for(isa, gemm);
  if (!fn) return kUnsupportedIsa;
  threads = resolve_threads(threads);
  const int64_t work = static_cast<int64_t>(offsets[rows]) * tokens + rows * w.words;
  if (work < 48 * 1024 || rows < 32) threads = 1;
  const int64_t align = gemm ? 16 : 4;
  if (threads == 1) {  // no parallel region: its start costs more than a small layer's whole GEMV
    if (!reserve_kernel_scratch(w, tokens)) return kNoMemory;
#if SP_X86
    if (isa != kQPortable)
      quantize_tokens_avx2(x, cols, in, xq, sx, quad, block, 0, tokens);
    else
#endif
      quantize_tokens(x, cols, in, xq, sx, quad, block, 0, tokens);
    fn(w, in, bias, y, 0, rows);
    return kOk;
  }
  int status = kOk;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    const int64_t t0 = tokens * t / nt, t1 = tokens * (t + 1) / nt;
#if SP_X86
    if (isa != kQPortable)
      quantize_tokens_avx2(x, cols, in, xq, sx, quad, block, t0, t1);
    else
#endif
      quantize_tokens(x, cols, in, xq, sx, quad, block, t0, t1);
#ifdef _OPENMP
#pragma omp barrier
#endif
    const int64_t r0 = split_rows(w, t, nt, align), r1 = split_rows(w, t + 1, nt, align);
    if (r0 < r1) {
      if (!reserve_kernel_scratch(w, tokens)) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
        status = kNoMemory;
      } else {
        fn(w, in, bias, y, r0, r1);
      }
    }
  }
  return status;
}

SQ_API int sq_linear(const float* x, int64_t tokens, const uint16_t* masks, const int32_t* offsets, const uint8_t* codes,
                     const float* scales, const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group,
                     const float* bias, float* y, int isa, int threads) {
  return sq_linear_blocks(x, tokens, masks, offsets, codes, scales, zeros, nullptr, rows, cols, bits, group, bias, y, isa,
                          threads);
}
