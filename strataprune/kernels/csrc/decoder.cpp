// Native Llama-family decoder: the whole forward pass of a pruned (and optionally quantized) model in C++, so
// a decode step is one call instead of ~200 PyTorch modules. The Linears run on this library's own kernels
// (sp_linear: fp32 bitmask, sq_linear: int8/int4 bitmask, dense_kernels.cpp: Linears left dense); the rest
// (embedding, RMSNorm, RoPE, grouped-query attention over a KV cache held here, SiLU-gated MLP, residuals,
// final norm) is plain C++ below. Python builds it with pointers to the packed buffers it already holds (no
// copies; strataprune/kernels/decoder.py keeps them alive) and validates every argument before calling.
//
// Slots: the engine holds max_slots sequences, each with its own fp32 KV cache of max_context positions,
// [layer][K|V][kv_head][position][head_dim]. sd_prefill runs a prompt through one slot in chunks (the GEMM
// kernels over the chunk's tokens); sd_decode runs one step for several slots at once, so every Linear is
// one multi-token GEMV (weights streamed once per step) and attention is per slot.
//
//   h = sd_create(...); sd_set_embedding / sd_set_norm / sd_set_linear for every weight; sd_check(h) == 0
//   sd_prefill(h, slot, tokens, n, logits, all_logits, isa, qisa, threads)   logits [n or 1][vocab]
//   sd_decode(h, slots, tokens, batch, logits, isa, qisa, threads)           logits [batch][vocab]
//   sd_reset(h, slot); sd_length(h, slot); sd_destroy(h)
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "dense_kernels.h"
#include "quant_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_WIN32)
#define SD_API extern "C" __declspec(dllexport)
#else
#define SD_API extern "C" __attribute__((visibility("default")))
#endif

extern "C" int sp_linear(const float* x, int64_t tokens, const uint16_t* masks, const float* values, const int32_t* offsets,
                         int64_t rows, int64_t cols, const float* bias, float* y, int isa, int threads);
extern "C" int sq_linear(const float* x, int64_t tokens, const uint16_t* masks, const int32_t* offsets, const uint8_t* codes,
                         const float* scales, const uint8_t* zeros, int64_t rows, int64_t cols, int bits, int64_t group,
                         const float* bias, float* y, int isa, int threads);
extern "C" int sp_isa_supported(int isa);
extern "C" int sq_isa_supported(int isa);
extern "C" int sq_best_isa(void);
extern "C" int sp_best_isa(void);
extern "C" int sq_has_avx_vnni(void);

namespace sp {
namespace {

enum Status : int {
  kOk = 0,
  kUnsupportedIsa = -1,
  kBadShape = -2,
  kNoMemory = -3,
  kBadSlot = -6,
  kContextFull = -7,
  kBadToken = -8,
  kIncomplete = -9,
  kDuplicateSlot = -10,
};

enum LinearKind : int { kUnset = -1, kDense = 0, kSparse = 1, kQuantized = 2, kDenseInt8 = 3 };
enum Which : int { kQ = 0, kK = 1, kV = 2, kO = 3, kGate = 4, kUp = 5, kDown = 6, kLinearsPerLayer = 7 };

struct Linear {
  int kind = kUnset;
  int64_t rows = 0, cols = 0;
  const void* p[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  const float* bias = nullptr;
  int bits = 0;
  int64_t group = 0;
};

struct Layer {
  Linear lin[kLinearsPerLayer];
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
};

struct Engine {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, max_slots, max_context, chunk;
  float eps, attn_scaling;
  std::vector<float> inv_freq;
  std::vector<float> rope_table;  // [max_context][cos (head_dim / 2) | sin (head_dim / 2)], attention scaling applied
  std::vector<Layer> layer;
  const float* embedding = nullptr;
  const float* final_norm = nullptr;
  Linear head;
  std::vector<float*> kv;  // per slot: layers * 2 * kv_heads * max_context * head_dim floats (lazily allocated)
  std::vector<int64_t> length;
  // activations, sized for `cap` tokens
  int64_t cap;
  std::vector<float> x, h, q, k, v, attn, g, u, out;
  std::vector<float> scores;  // per thread: max_context
  std::vector<uint8_t> head_xu;  // the int8 head's quantized input (kDenseInt8)
  std::vector<float> head_sx;
  int64_t slot_floats() const { return layers * 2 * kv_heads * max_context * head_dim; }
  float* cache(int64_t slot, int64_t l, int kv_index, int64_t kvh) {
    return kv[slot] + (((l * 2 + kv_index) * kv_heads + kvh) * max_context) * head_dim;
  }
};

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

DenseFn dense_for(int isa) {
#if SP_X86
  if (isa == kAvx512) return dense_avx512;
  if (isa == kAvx2) return dense_avx2;
#endif
  return isa == kPortable ? dense_portable : nullptr;
}

int run_dense(const Linear& lin, const float* x, int64_t tokens, float* y, int64_t ldy, int isa, int threads) {
  const DenseFn fn = dense_for(isa);
  if (!fn) return kUnsupportedIsa;
  DenseArgs a{static_cast<const float*>(lin.p[0]), lin.bias, x, y, lin.rows, lin.cols, tokens, lin.cols, ldy};
  const int64_t blocks = (lin.rows + 63) / 64;
  if (threads <= 1 || lin.rows * lin.cols * tokens < 256 * 1024) {
    fn(a, 0, lin.rows);
    return kOk;
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * 64, r1 = r0 + 64 < lin.rows ? r0 + 64 : lin.rows;
    fn(a, r0, r1);
  }
  return kOk;
}

// y[t][n] for tokens t, rows of `lin`; y is [tokens][lin.rows]
int run_linear(const Linear& lin, const float* x, int64_t tokens, float* y, int isa, int qisa, int threads) {
  switch (lin.kind) {
    case kDense:
      return run_dense(lin, x, tokens, y, lin.rows, isa, threads);
    case kSparse:
      return sp_linear(x, tokens, static_cast<const uint16_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]),
                       static_cast<const int32_t*>(lin.p[2]), lin.rows, lin.cols, lin.bias, y, isa, threads);
    case kQuantized:
      return sq_linear(x, tokens, static_cast<const uint16_t*>(lin.p[0]), static_cast<const int32_t*>(lin.p[1]),
                       static_cast<const uint8_t*>(lin.p[2]), static_cast<const float*>(lin.p[3]),
                       static_cast<const uint8_t*>(lin.p[4]), lin.rows, lin.cols, lin.bits, lin.group, lin.bias, y, qisa,
                       threads);
    default:
      return kIncomplete;
  }
}

void rmsnorm(const float* x, const float* w, float* y, int64_t n, float eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// rotate_half convention (the Hugging Face Llama one): pairs (i, i + d/2); cs = the position's [cos | sin] table row
void rope(float* v, int64_t d, const float* cs) {
  const int64_t half = d / 2;
  const float* sn = cs + half;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cs[i] - b * sn[i];
    v[i + half] = b * cs[i] + a * sn[i];
  }
}

// One query head against positions [0, upto] of its KV head: out = softmax(q K^T / sqrt(d)) V. Compiled for the
// baseline and, with target attributes, for AVX2 and AVX-512 (the loops vectorize; the dispatcher picks by isa).
#define SD_DEFINE_ATTEND(NAME, ATTR)                                                                          \
  ATTR void NAME(const float* q, const float* K, const float* V, int64_t upto, int64_t d, float* scores,      \
                 float* out) {                                                                                \
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));                                              \
    float mx = -INFINITY;                                                                                     \
    for (int64_t j = 0; j <= upto; ++j) {                                                                     \
      const float* kj = K + j * d;                                                                            \
      float s = 0.0f;                                                                                         \
      _Pragma("omp simd reduction(+ : s)") for (int64_t i = 0; i < d; ++i) s += q[i] * kj[i];                 \
      scores[j] = s * scale;                                                                                  \
      mx = scores[j] > mx ? scores[j] : mx;                                                                   \
    }                                                                                                         \
    float sum = 0.0f;                                                                                         \
    for (int64_t j = 0; j <= upto; ++j) {                                                                     \
      scores[j] = std::exp(scores[j] - mx);                                                                   \
      sum += scores[j];                                                                                       \
    }                                                                                                         \
    const float inv = 1.0f / sum;                                                                             \
    for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;                                                            \
    for (int64_t j = 0; j <= upto; ++j) {                                                                     \
      const float p = scores[j] * inv;                                                                        \
      const float* vj = V + j * d;                                                                            \
      _Pragma("omp simd") for (int64_t i = 0; i < d; ++i) out[i] += p * vj[i];                                \
    }                                                                                                         \
  }

SD_DEFINE_ATTEND(attend_portable, )
#if SP_X86
SD_DEFINE_ATTEND(attend_avx2, __attribute__((target("avx2,fma"))))
SD_DEFINE_ATTEND(attend_avx512, __attribute__((target("avx512f,avx2,fma"))))
#endif

using AttendFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, float*, float*);

AttendFn attend_for(int isa) {
#if SP_X86
  if (isa == kAvx512) return attend_avx512;
  if (isa == kAvx2) return attend_avx2;
#endif
  return attend_portable;
}

// The int8 lm_head (kDenseInt8: p0 codes, p1 scales, p2 wsum, p3 masks, p4 offsets): a dense kernel on the
// quantized kernels' path (qisa as in quant_api.cpp: 2 AVX-512 VNNI, 1 AVX2 with AVX-VNNI where the CPU has it,
// 3 AVX2 without), else (portable) the quantized bitmask kernel over the same codes (the masks are all ones, so the
// codes are row-major).
int run_int8_head(Engine& e, const Linear& lin, const float* x, int64_t tokens, float* y, int qisa, int threads) {
  const int best = sq_best_isa();
  const int path = qisa < 0 ? best : qisa;
#if SP_X86
  void (*rows_fn)(const Int8Args&, int64_t, int64_t) = nullptr;
  if (path == 2 && sq_isa_supported(2)) rows_fn = int8_rows_avx512vnni;
  if (path == 1 && sq_isa_supported(1)) rows_fn = sq_has_avx_vnni() ? int8_rows_avx2vnni : int8_rows_avx2;
  if (path == 3 && sq_isa_supported(3)) rows_fn = int8_rows_avx2;
  if (rows_fn) {
    const int64_t blocks = (lin.cols + kActBlock - 1) / kActBlock, pad = blocks * kActBlock;
    try {
      if (static_cast<int64_t>(e.head_xu.size()) < tokens * pad) e.head_xu.resize(tokens * pad);
      if (static_cast<int64_t>(e.head_sx.size()) < tokens * blocks) e.head_sx.resize(tokens * blocks);
    } catch (const std::bad_alloc&) {
      return kNoMemory;
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const float* src = x + t * lin.cols;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * kActBlock, k1 = k0 + kActBlock < lin.cols ? k0 + kActBlock : lin.cols;
        float amax = 0.0f;
        for (int64_t k = k0; k < k1; ++k) amax = std::fabs(src[k]) > amax ? std::fabs(src[k]) : amax;
        const float scale = amax / 127.0f;
        e.head_sx[t * blocks + b] = scale;
        for (int64_t k = k0; k < k0 + kActBlock; ++k) {
          float r = (k < k1 && scale > 0.0f) ? std::nearbyint(src[k] / scale) : 0.0f;
          r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
          e.head_xu[t * pad + k] = static_cast<uint8_t>(static_cast<int>(r == r ? r : 0.0f) + 128);
        }
      }
    }
    Int8Args a{static_cast<const int8_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]),
               static_cast<const int32_t*>(lin.p[2]), lin.bias, e.head_xu.data(), e.head_sx.data(), y,
               lin.rows, lin.cols, blocks, tokens, lin.rows};
    if (threads <= 1) {
      rows_fn(a, 0, lin.rows);
      return kOk;
    }
    const int64_t parts = (lin.rows + 255) / 256;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t p = 0; p < parts; ++p) rows_fn(a, p * 256, p * 256 + 256 < lin.rows ? p * 256 + 256 : lin.rows);
    return kOk;
  }
#endif
  (void)e;
  return sq_linear(x, tokens, static_cast<const uint16_t*>(lin.p[3]), static_cast<const int32_t*>(lin.p[4]),
                   static_cast<const uint8_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]), nullptr, lin.rows, lin.cols, 8,
                   lin.cols, lin.bias, y, qisa, threads);
}

// One forward pass over `tokens` tokens: token t belongs to slot slots[t] at position pos[t] (the positions of a
// slot's tokens are consecutive and ascending; its cache already holds positions < its first). Writes the logits of
// the tokens with want[t] (in order) to logits.
int forward(Engine& e, const int64_t* ids, const int64_t* slots, const int64_t* pos, int64_t tokens, float* logits,
            const unsigned char* want, int isa, int qisa, int threads) {
  const int64_t H = e.hidden, D = e.head_dim, QD = e.heads * D, KD = e.kv_heads * D, I = e.inter;
  const int64_t group = e.heads / e.kv_heads;
  float *x = e.x.data(), *h = e.h.data(), *q = e.q.data(), *k = e.k.data(), *v = e.v.data();
  float *attn = e.attn.data(), *g = e.g.data(), *u = e.u.data(), *out = e.out.data();
  for (int64_t t = 0; t < tokens; ++t) std::memcpy(x + t * H, e.embedding + ids[t] * H, H * sizeof(float));
  int status = kOk;
  for (int64_t l = 0; l < e.layers && status == kOk; ++l) {
    Layer& L = e.layer[l];
    for (int64_t t = 0; t < tokens; ++t) rmsnorm(x + t * H, L.input_norm, h + t * H, H, e.eps);
    if ((status = run_linear(L.lin[kQ], h, tokens, q, isa, qisa, threads))) break;
    if ((status = run_linear(L.lin[kK], h, tokens, k, isa, qisa, threads))) break;
    if ((status = run_linear(L.lin[kV], h, tokens, v, isa, qisa, threads))) break;
    for (int64_t t = 0; t < tokens; ++t) {
      const float* cs = e.rope_table.data() + pos[t] * D;
      for (int64_t hd = 0; hd < e.heads; ++hd) rope(q + t * QD + hd * D, D, cs);
      for (int64_t hd = 0; hd < e.kv_heads; ++hd) {
        rope(k + t * KD + hd * D, D, cs);
        std::memcpy(e.cache(slots[t], l, 0, hd) + pos[t] * D, k + t * KD + hd * D, D * sizeof(float));
        std::memcpy(e.cache(slots[t], l, 1, hd) + pos[t] * D, v + t * KD + hd * D, D * sizeof(float));
      }
    }
    const AttendFn attend_fn = attend_for(isa);
    const int64_t pairs = tokens * e.heads;
    const int64_t work = pairs * (pos[tokens - 1] + 1) * D;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4) if (threads > 1 && work > 32 * 1024)
#endif
    for (int64_t p = 0; p < pairs; ++p) {
      const int64_t t = p / e.heads, hd = p % e.heads, kvh = hd / group;
      float* sc = e.scores.data() + static_cast<int64_t>(thread_id()) * e.max_context;
      attend_fn(q + t * QD + hd * D, e.cache(slots[t], l, 0, kvh), e.cache(slots[t], l, 1, kvh), pos[t], D, sc,
             attn + t * QD + hd * D);
    }
    (void)work;
    if ((status = run_linear(L.lin[kO], attn, tokens, out, isa, qisa, threads))) break;
    for (int64_t i = 0; i < tokens * H; ++i) x[i] += out[i];
    for (int64_t t = 0; t < tokens; ++t) rmsnorm(x + t * H, L.post_norm, h + t * H, H, e.eps);
    if ((status = run_linear(L.lin[kGate], h, tokens, g, isa, qisa, threads))) break;
    if ((status = run_linear(L.lin[kUp], h, tokens, u, isa, qisa, threads))) break;
    for (int64_t i = 0; i < tokens * I; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    if ((status = run_linear(L.lin[kDown], g, tokens, out, isa, qisa, threads))) break;
    for (int64_t i = 0; i < tokens * H; ++i) x[i] += out[i];
  }
  if (status) return status;
  int64_t kept = 0;
  for (int64_t t = 0; t < tokens; ++t)
    if (want[t]) rmsnorm(x + t * H, e.final_norm, h + (kept++) * H, H, e.eps);
  if (kept == 0) return kOk;
  if (e.head.kind == kDenseInt8) return run_int8_head(e, e.head, h, kept, logits, qisa, threads);
  return run_linear(e.head, h, kept, logits, isa, qisa, threads);
}

bool linear_complete(const Linear& lin, int64_t rows, int64_t cols) {
  if (lin.rows != rows || lin.cols != cols) return false;
  if (lin.kind == kDense) return lin.p[0] != nullptr;
  if (lin.kind == kSparse) return lin.p[0] && lin.p[1] && lin.p[2];
  if (lin.kind == kQuantized) return lin.p[0] && lin.p[1] && lin.p[2] && lin.p[3] && (lin.bits == 8 || lin.p[4]);
  if (lin.kind == kDenseInt8) return lin.p[0] && lin.p[1] && lin.p[2] && lin.p[3] && lin.p[4];
  return false;
}

int check_isas(int& isa, int& qisa) {
  if (isa < 0) isa = sp_best_isa();
  if (!sp_isa_supported(isa)) return kUnsupportedIsa;
  return kOk;  // sq_linear checks qisa itself (-1: its best)
}

// the per-thread attention scores for `threads` threads
bool ensure_scores(Engine& e, int threads) {
  const size_t need = static_cast<size_t>(threads) * static_cast<size_t>(e.max_context);
  if (e.scores.size() >= need) return true;
  try {
    e.scores.resize(need);
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

bool ensure_slot(Engine& e, int64_t slot) {
  if (e.kv[slot]) return true;
  e.kv[slot] = static_cast<float*>(std::calloc(static_cast<size_t>(e.slot_floats()), sizeof(float)));
  return e.kv[slot] != nullptr;
}

}  // namespace
}  // namespace sp

using sp::Engine;

SD_API int sd_abi_version(void) { return 1; }

// inv_freq: head_dim / 2 floats (the model's RoPE frequencies, rope_theta and any static scaling applied)
SD_API void* sd_create(int64_t layers, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter,
                       int64_t vocab, float eps, const float* inv_freq, float attn_scaling, int64_t max_slots,
                       int64_t max_context, int64_t chunk) {
  if (layers < 1 || hidden < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads || head_dim < 2 || head_dim % 2 ||
      inter < 1 || vocab < 1 || max_slots < 1 || max_context < 1 || chunk < 1 || !inv_freq)
    return nullptr;
  Engine* e = new (std::nothrow) Engine();
  if (!e) return nullptr;
  try {
    e->layers = layers;
    e->hidden = hidden;
    e->heads = heads;
    e->kv_heads = kv_heads;
    e->head_dim = head_dim;
    e->inter = inter;
    e->vocab = vocab;
    e->max_slots = max_slots;
    e->max_context = max_context;
    e->chunk = chunk;
    e->eps = eps;
    e->attn_scaling = attn_scaling;
    e->inv_freq.assign(inv_freq, inv_freq + head_dim / 2);
    e->rope_table.resize(static_cast<size_t>(max_context) * head_dim);
    for (int64_t pos = 0; pos < max_context; ++pos)
      for (int64_t i = 0; i < head_dim / 2; ++i) {
        const float angle = static_cast<float>(pos) * inv_freq[i];  // fp32, as the model computes its angles
        e->rope_table[pos * head_dim + i] = std::cos(angle) * attn_scaling;
        e->rope_table[pos * head_dim + head_dim / 2 + i] = std::sin(angle) * attn_scaling;
      }
    e->layer.resize(layers);
    e->kv.assign(max_slots, nullptr);
    e->length.assign(max_slots, 0);
    e->cap = chunk > max_slots ? chunk : max_slots;
    const int64_t c = e->cap;
    e->x.resize(c * hidden);
    e->h.resize(c * hidden);
    e->q.resize(c * heads * head_dim);
    e->k.resize(c * kv_heads * head_dim);
    e->v.resize(c * kv_heads * head_dim);
    e->attn.resize(c * heads * head_dim);
    e->g.resize(c * inter);
    e->u.resize(c * inter);
    e->out.resize(c * hidden);
    e->scores.resize(static_cast<size_t>(max_context));
  } catch (const std::bad_alloc&) {
    delete e;
    return nullptr;
  }
  return e;
}

SD_API void sd_destroy(void* handle) {
  Engine* e = static_cast<Engine*>(handle);
  if (!e) return;
  for (float* p : e->kv) std::free(p);
  delete e;
}

SD_API int64_t sd_kv_bytes_per_slot(void* handle) {
  return static_cast<Engine*>(handle)->slot_floats() * static_cast<int64_t>(sizeof(float));
}

SD_API int sd_set_embedding(void* handle, const float* weight) {
  static_cast<Engine*>(handle)->embedding = weight;
  return 0;
}

// layer < 0: the final norm
SD_API int sd_set_norm(void* handle, int64_t layer, int which, const float* weight) {
  Engine* e = static_cast<Engine*>(handle);
  if (layer < 0) {
    e->final_norm = weight;
    return 0;
  }
  if (layer >= e->layers || which < 0 || which > 1) return sp::kBadShape;
  (which == 0 ? e->layer[layer].input_norm : e->layer[layer].post_norm) = weight;
  return 0;
}

// layer < 0: the lm_head. kind 0 dense (p0 weight), 1 fp32 bitmask (p0 masks, p1 values, p2 offsets),
// 2 quantized bitmask (p0 masks, p1 offsets, p2 codes, p3 scales, p4 zeros or NULL; bits, group),
// 3 (lm_head only) dense int8 per row: p0 codes int8 [rows][cols], p1 scales [rows], p2 wsum int32 [rows][ceil(cols/128)],
//   p3 masks (all ones) and p4 offsets of the same codes as an int8 bitmask weight (the non-AVX-512 path)
SD_API int sd_set_linear(void* handle, int64_t layer, int which, int kind, int64_t rows, int64_t cols, const void* p0,
                         const void* p1, const void* p2, const void* p3, const void* p4, const float* bias, int bits,
                         int64_t group) {
  Engine* e = static_cast<Engine*>(handle);
  if (layer >= e->layers || which < 0 || which >= sp::kLinearsPerLayer || kind < 0 || kind > 3) return sp::kBadShape;
  if (kind == sp::kDenseInt8 && layer >= 0) return sp::kBadShape;  // the int8 head only
  sp::Linear& lin = layer < 0 ? e->head : e->layer[layer].lin[which];
  lin.kind = kind;
  lin.rows = rows;
  lin.cols = cols;
  lin.p[0] = p0;
  lin.p[1] = p1;
  lin.p[2] = p2;
  lin.p[3] = p3;
  lin.p[4] = p4;
  lin.bias = bias;
  lin.bits = bits;
  lin.group = group;
  return 0;
}

// 0 when every weight is set with the shape the config implies, else kIncomplete
SD_API int sd_check(void* handle) {
  using namespace sp;
  Engine* e = static_cast<Engine*>(handle);
  const int64_t H = e->hidden, QD = e->heads * e->head_dim, KD = e->kv_heads * e->head_dim, I = e->inter;
  if (!e->embedding || !e->final_norm || !linear_complete(e->head, e->vocab, H)) return kIncomplete;
  for (const Layer& L : e->layer) {
    if (!L.input_norm || !L.post_norm) return kIncomplete;
    const int64_t shapes[kLinearsPerLayer][2] = {{QD, H}, {KD, H}, {KD, H}, {H, QD}, {I, H}, {I, H}, {H, I}};
    for (int w = 0; w < kLinearsPerLayer; ++w)
      if (!linear_complete(L.lin[w], shapes[w][0], shapes[w][1])) return kIncomplete;
  }
  return kOk;
}

SD_API int64_t sd_length(void* handle, int64_t slot) {
  Engine* e = static_cast<Engine*>(handle);
  if (slot < 0 || slot >= e->max_slots) return sp::kBadSlot;
  return e->length[slot];
}

SD_API int sd_reset(void* handle, int64_t slot) {
  Engine* e = static_cast<Engine*>(handle);
  if (slot < 0 || slot >= e->max_slots) return sp::kBadSlot;
  e->length[slot] = 0;  // the cache keeps its memory; positions >= length are never read
  return sp::kOk;
}

// Frees a slot's cache memory (it is allocated again at its next use).
SD_API int sd_release(void* handle, int64_t slot) {
  Engine* e = static_cast<Engine*>(handle);
  if (slot < 0 || slot >= e->max_slots) return sp::kBadSlot;
  std::free(e->kv[slot]);
  e->kv[slot] = nullptr;
  e->length[slot] = 0;
  return sp::kOk;
}

// Appends n tokens to `slot`. logits: [n][vocab] when all_logits, else [1][vocab] (the last token's).
SD_API int sd_prefill(void* handle, int64_t slot, const int64_t* tokens, int64_t n, float* logits, int all_logits, int isa,
                      int qisa, int threads) {
  using namespace sp;
  Engine* e = static_cast<Engine*>(handle);
  if (slot < 0 || slot >= e->max_slots) return kBadSlot;
  if (n < 1) return kBadShape;
  if (e->length[slot] + n > e->max_context) return kContextFull;
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= e->vocab) return kBadToken;
  if (int s = check_isas(isa, qisa)) return s;
  if (!ensure_slot(*e, slot)) return kNoMemory;
  threads = resolve_threads(threads);
  if (!ensure_scores(*e, threads)) return kNoMemory;
  std::vector<int64_t> slots(e->chunk, slot), pos(e->chunk);
  std::vector<unsigned char> want(e->chunk);
  const int64_t before = e->length[slot];
  for (int64_t c0 = 0; c0 < n; c0 += e->chunk) {
    const int64_t m = n - c0 < e->chunk ? n - c0 : e->chunk;
    for (int64_t i = 0; i < m; ++i) {
      pos[i] = e->length[slot] + i;
      want[i] = all_logits || c0 + i == n - 1;
    }
    float* dst = all_logits ? logits + c0 * e->vocab : logits;
    const int s = forward(*e, tokens + c0, slots.data(), pos.data(), m, dst, want.data(), isa, qisa, threads);
    if (s) {
      e->length[slot] = before;  // the cache past `before` is not read again
      return s;
    }
    e->length[slot] += m;
  }
  return kOk;
}

// One step for `batch` distinct slots: token i is appended to slots[i]; logits [batch][vocab].
SD_API int sd_decode(void* handle, const int64_t* slots, const int64_t* tokens, int64_t batch, float* logits, int isa,
                     int qisa, int threads) {
  using namespace sp;
  Engine* e = static_cast<Engine*>(handle);
  if (batch < 1 || batch > e->max_slots) return kBadShape;
  for (int64_t i = 0; i < batch; ++i) {
    if (slots[i] < 0 || slots[i] >= e->max_slots) return kBadSlot;
    if (tokens[i] < 0 || tokens[i] >= e->vocab) return kBadToken;
    if (e->length[slots[i]] + 1 > e->max_context) return kContextFull;
    for (int64_t j = 0; j < i; ++j)
      if (slots[j] == slots[i]) return kDuplicateSlot;
  }
  if (int s = check_isas(isa, qisa)) return s;
  for (int64_t i = 0; i < batch; ++i)
    if (!ensure_slot(*e, slots[i])) return kNoMemory;
  threads = resolve_threads(threads);
  if (!ensure_scores(*e, threads)) return kNoMemory;
  std::vector<int64_t> pos(batch);
  std::vector<unsigned char> want(batch, 1);
  for (int64_t i = 0; i < batch; ++i) pos[i] = e->length[slots[i]];
  const int s = forward(*e, tokens, slots, pos.data(), batch, logits, want.data(), isa, qisa, threads);
  if (s) return s;
  for (int64_t i = 0; i < batch; ++i) e->length[slots[i]] += 1;
  return kOk;
}
