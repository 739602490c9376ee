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
//   sd_set_spin_us(us); sd_wait_stats(counts, n, reset): what the team threads' phase waits did (docs/kernels.md)
#include <atomic>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "dense_kernels.h"
#include "quant_kernels.h"
#include "team_kernels.h"
#if SP_X86
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
extern "C" int sq_linear_blocks(const float* x, int64_t tokens, const uint16_t* masks, const int32_t* offsets,
                                const uint8_t* codes, const float* scales, const uint8_t* zeros, const uint8_t* blocks,
                                int64_t rows, int64_t cols, int bits, int64_t group, const float* bias, float* y, int isa,
                                int threads);
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
  std::vector<uint8_t> blocks;  // kQuantized: the 1x4 block index when the mask is 1x4 blocked (derive_block_index), else empty
  const uint8_t* block_index() const { return blocks.empty() ? nullptr : blocks.data(); }
};

struct Layer {
  Linear lin[kLinearsPerLayer];
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
};

// ---- Waiting: sleep (after an optional spin) ----
// A thread that waits for the others sleeps on a futex until woken; before that it may spin. Sleeping, not yielding
// or spinning, on a machine shared with other jobs: a thread that stays runnable spends its share of the core, so the
// scheduler runs it (and the team thread that holds the last block) later; a sleeper costs nothing and is run
// promptly when woken. Measured on the 2-core machine under load 3-5
// (benchmarks/results/decode-threads-20261206T110457Z.md, SmolLM2 int4): spin 0 16.1 ms/token wall, 10.6 ms CPU;
// spin 50 us 21.7 ms wall, 12.2 ms CPU. On an idle machine a short spin hides the futex wake-up, which a decode step
// pays at every phase (5 per layer): 2 threads 6.34 ms/token sleeping at once, 4.93 spinning 50 us
// (decode-threads-20261206T144710Z.md). So the default (kAdaptiveSpin, sd_set_spin_us(-2)) adapts per thread, as
// adaptive mutexes do: it spins up to kAdaptiveSpinUs while this thread's recent phase waits were shorter than that
// (the others are running), and sleeps at once when they were longer (someone was descheduled: spinning would only
// take their core); every kProbeEvery-th wait spins anyway, so that a machine that became idle is noticed. Idle:
// 5.02 ms/token. Where futexes are missing the sleep is a yield.
constexpr int kAdaptiveSpin = -2;
constexpr int kAdaptiveSpinUs = 50;
constexpr int kProbeEvery = 64;
constexpr int kDefaultSpinUs = kAdaptiveSpin;
std::atomic<int> g_spin_us{kDefaultSpinUs};

// A thread's recent waits: a running mean (weight 1/8 per wait) of how long they lasted.
struct WaitHistory {
  double mean_us = 0.0;
  uint32_t waits = 0;
};
thread_local WaitHistory t_wait_history;

// What a team thread's phase waits did (not the caller's wait for the workers to leave a step, nor a worker's for the
// next step): the phase was done on arrival (or before a spin or a sleep began), it finished while the thread spun,
// the spin ran out and the thread slept, or the thread slept at once; `probes` counts the adaptive waits that spun
// only because they were the probe (a subset of the spinning ones). Each team thread counts its own (its own cache
// line) and the step adds them to the process's totals once it is over, so a wait pays no shared-memory traffic for
// being counted (sd_wait_stats reads them; docs/kernels.md).
enum WaitKind { kWaitReady, kWaitSpun, kWaitSpunThenSlept, kWaitSleptAtOnce, kWaitProbes, kWaitKinds };
struct alignas(64) WaitCounts {
  uint64_t n[kWaitKinds] = {};
};
std::atomic<uint64_t> g_wait_counts[kWaitKinds];

void add_to_process_counts(WaitCounts& counts) {
  for (int k = 0; k < kWaitKinds; ++k) {
    if (counts.n[k]) g_wait_counts[k].fetch_add(counts.n[k], std::memory_order_relaxed);
    counts.n[k] = 0;
  }
}

// Test hook (sd_set_test_phase_delay_us): the thread that claims a phase's first block sleeps this long
// (microseconds) before running it, so that the others' waits for that phase last about as long; 0: off.
std::atomic<int> g_test_phase_delay_us{0};

inline void cpu_relax() {
#if SP_X86
  _mm_pause();
#endif
}

void futex_wait(std::atomic<uint32_t>& word, uint32_t seen) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
  (void)word;
  (void)seen;
  std::this_thread::yield();
#endif
}

void futex_wake_all(std::atomic<uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

// A futex word with a count of its sleepers: signal() after making a condition true wakes whoever sleeps on it.
struct Signal {
  std::atomic<uint32_t> word{0};
  std::atomic<int> sleepers{0};
  void signal() {
    word.fetch_add(1);
    if (sleepers.load() > 0) futex_wake_all(word);
  }
  // Returns once ready() holds: spins (spin_us > 0: that long; kAdaptiveSpin: as the thread's history says), then
  // sleeps (ready() must become true before the matching signal()).
  // `counts` (may be null) records what the wait did.
  template <class Ready>
  void wait(Ready ready, int spin_us, WaitCounts* counts = nullptr) {
    if (ready()) {
      if (counts) ++counts->n[kWaitReady];
      return;
    }
    using Clock = std::chrono::steady_clock;
    const Clock::time_point start = Clock::now();
    const bool adaptive = spin_us == kAdaptiveSpin;
    WaitHistory& history = t_wait_history;
    bool probe = false;
    if (adaptive) {
      probe = history.mean_us >= kAdaptiveSpinUs && ++history.waits % kProbeEvery == 0;
      spin_us = history.mean_us < kAdaptiveSpinUs || probe ? kAdaptiveSpinUs : 0;
    }
    const Clock::time_point until = start + std::chrono::microseconds(spin_us);
    bool slept = false;
    while (spin_us > 0) {
      for (int i = 0; i < 32; ++i) cpu_relax();
      if (ready()) break;
      if (Clock::now() >= until) break;
    }
    while (!ready()) {
      sleepers.fetch_add(1);
      const uint32_t seen = word.load();
      if (!ready()) {  // counted as a sleep only when the thread really goes to the futex
        slept = true;
        futex_wait(word, seen);
      }
      sleepers.fetch_sub(1);
    }
    if (adaptive) {
      const double waited_us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
      // a spin that succeeded restarts the history: the others are running again (a wait that ended before a
      // spin or a sleep began says nothing about spinning and takes the running mean)
      history.mean_us = spin_us > 0 && !slept ? waited_us : history.mean_us + (waited_us - history.mean_us) / 8;
    }
    if (counts) {
      ++counts->n[slept ? (spin_us > 0 ? kWaitSpunThenSlept : kWaitSleptAtOnce) : (spin_us > 0 ? kWaitSpun : kWaitReady)];
      counts->n[kWaitProbes] += probe;
    }
  }
};

// The engine's own worker threads for decode steps (not OpenMP's: its waits follow OMP_WAIT_POLICY/GOMP_SPINCOUNT,
// whose default spins ~300k times at every barrier and between regions, which on a loaded machine costs a 2-thread
// step 10-100x its work). run(n, job) runs job(0) on the caller and job(1..n-1) on workers; workers sleep between
// runs after the spin above.
class TeamPool {
 public:
  ~TeamPool() {
    stop_.store(true);
    start_.signal();
    for (std::thread& t : workers_) t.join();
  }
  // Returns the members that ran (fewer than `threads` only where a thread could not be started).
  template <class Job>
  int run(int threads, Job& job) {
    while (static_cast<int>(workers_.size()) < threads - 1) {
      try {
        const int member = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, member] { loop(member); });
      } catch (...) {
        break;
      }
    }
    const int members = 1 + (threads - 1 < static_cast<int>(workers_.size()) ? threads - 1 : static_cast<int>(workers_.size()));
    const int spin_us = g_spin_us.load(std::memory_order_relaxed);
    call_ = [](void* j, int m) { (*static_cast<Job*>(j))(m); };
    job_ = &job;
    left_.store(members - 1);
    // one store publishes the step's generation with its member count: a worker reading them apart could pair the
    // last step's generation with this step's count, run this job twice and miscount left_
    ++generation_;
    ticket_.store((generation_ << kMemberBits) | static_cast<uint64_t>(members), std::memory_order_release);
    start_.signal();
    job(0);
    finish_.wait([this] { return left_.load(std::memory_order_acquire) == 0; }, spin_us);
    return members;
  }

 private:
  void loop(int member) {
    uint64_t seen = 0;
    for (;;) {
      // the gap between steps is the caller's (sampling, Python): adaptive spinning is for phases, not for it
      const int spin_us = g_spin_us.load(std::memory_order_relaxed);
      start_.wait([&] { return stop_.load() || (ticket_.load(std::memory_order_acquire) >> kMemberBits) != seen; },
                  spin_us == kAdaptiveSpin ? 0 : spin_us);
      if (stop_.load()) return;
      const uint64_t ticket = ticket_.load(std::memory_order_acquire);
      seen = ticket >> kMemberBits;
      if (static_cast<uint64_t>(member) < (ticket & ((uint64_t{1} << kMemberBits) - 1))) {
        call_(job_, member);
        if (left_.fetch_sub(1, std::memory_order_acq_rel) == 1) finish_.signal();
      }
    }
  }
  static constexpr int kMemberBits = 16;  // threads are capped far below 2^16 (kMaxThreads)
  std::vector<std::thread> workers_;
  Signal start_, finish_;
  uint64_t generation_ = 0;            // written by the calling thread only
  std::atomic<uint64_t> ticket_{0};   // (generation << kMemberBits) | members of the current step
  std::atomic<int> left_{0};
  std::atomic<bool> stop_{false};
  void (*call_)(void*, int) = nullptr;
  void* job_ = nullptr;
};

// A Linear's kernel chosen for the step's (isa, qisa), so that any thread of the team can compute any rows of it.
struct Planned {
  int kind = kUnset;
  TeamSparse sparse{};
  TeamQuant quant{};  // kQuantized, and kDenseInt8 off AVX-512 (the quantized kernel over the head's codes)
  DenseFn dense = nullptr;
  void (*int8_rows)(const Int8Args&, int64_t, int64_t) = nullptr;  // kDenseInt8 on a dense int8 head kernel
};

// One phase of a decode step (e.g. layer 3's q/k/v): `blocks` pieces of work that any thread may claim. A thread
// moves on once every block is done, not once every thread has arrived, so a thread descheduled mid-step holds the
// others up only while it holds a claimed block (tens of microseconds of work). The step ends when every member has
// woken and found no block left (TeamPool::run), so a worker not yet running when the step starts delays the end.
struct alignas(64) Phase {
  std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
  int64_t blocks = 0;
};

// A team thread's own copy of a phase's input (normed, quantized), made by the thread the first time it claims a
// block of the phase: O(hidden) work, cheaper than a barrier behind one thread that makes it for all.
struct TeamThread {
  std::vector<float> h;            // [tokens][hidden]: the normed residual of the phase
  std::vector<uint8_t> qin;        // the quantized input of the phase (team_input_bytes, + 64 to align)
  std::vector<uint8_t> head_xu;    // the int8 head's input
  std::vector<float> head_sx;
  std::vector<char> sparse_mem;    // the fp32 bitmask GEMM's packed input and output tile (team_sparse_gemm_bytes, + 64)
  QInput in{};
  int64_t normed_phase = -1, quantized_phase = -1, packed_phase = -1;
  WaitCounts waits;  // this thread's phase waits in the current step (a cache line of its own)
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
  // the decode step's thread team (see team_forward): the kernels chosen for (isa, qisa), per-thread inputs, phases
  std::vector<Planned> plan;  // layers * kLinearsPerLayer + 1 (the head)
  int plan_isa = -2, plan_qisa = -2;
  int plan_gemm = -1;  // which GEMM kernels the plan holds (plan_step's gemm_kinds)
  bool team_threads = true;  // decode steps on the thread team (sd_set_team; off: one OpenMP region per kernel call)
  std::vector<TeamThread> team;
  std::unique_ptr<Phase[]> phases;
  int64_t phase_count = 0;
  Signal phase_done;  // signalled when a phase's last block is done
  std::unique_ptr<TeamPool> pool;
  long pool_pid = 0;  // the process that started the pool's workers
  int64_t slot_floats() const { return layers * 2 * kv_heads * max_context * head_dim; }
  float* cache(int64_t slot, int64_t l, int kv_index, int64_t kvh) {
    return kv[slot] + (((l * 2 + kv_index) * kv_heads + kvh) * max_context) * head_dim;
  }
};

constexpr int kMaxThreads = 1024;  // as strataprune.kernels._library.MAX_THREADS

int resolve_threads(int threads) {
#ifdef _OPENMP
  const int wanted = threads > 0 ? threads : omp_get_max_threads();
  return wanted < kMaxThreads ? wanted : kMaxThreads;
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
      return sq_linear_blocks(x, tokens, static_cast<const uint16_t*>(lin.p[0]), static_cast<const int32_t*>(lin.p[1]),
                              static_cast<const uint8_t*>(lin.p[2]), static_cast<const float*>(lin.p[3]),
                              static_cast<const uint8_t*>(lin.p[4]), lin.block_index(), lin.rows, lin.cols, lin.bits,
                              lin.group, lin.bias, y, qisa, threads);
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

// x [tokens][cols] quantized for the int8 head's kernel (Int8Args): per 128-column block, offset by 128.
void quantize_head_input(const float* x, int64_t tokens, int64_t cols, uint8_t* xu, float* sx) {
  const int64_t blocks = (cols + kActBlock - 1) / kActBlock, pad = blocks * kActBlock;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* src = x + t * cols;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * kActBlock, k1 = k0 + kActBlock < cols ? k0 + kActBlock : cols;
      int8_t codes[kActBlock];
      sx[t * blocks + b] = quantize_act_block(src, k0, k1, codes);
      for (int64_t k = 0; k < kActBlock; ++k) xu[t * pad + k0 + k] = static_cast<uint8_t>(codes[k] + 128);
    }
  }
}

using Int8RowsFn = void (*)(const Int8Args&, int64_t, int64_t);

// The dense int8 head kernel for the quantized path qisa (-1: best), or nullptr (portable: the bitmask kernel).
Int8RowsFn int8_head_rows_for(int qisa) {
#if SP_X86
  const int path = qisa < 0 ? sq_best_isa() : qisa;
  if (path == 2 && sq_isa_supported(2)) return int8_rows_avx512vnni;
  if (path == 1 && sq_isa_supported(1)) return sq_has_avx_vnni() ? int8_rows_avx2vnni : int8_rows_avx2;
  if (path == 3 && sq_isa_supported(3)) return int8_rows_avx2;
#else
  (void)qisa;
#endif
  return nullptr;
}

// The int8 lm_head (kDenseInt8: p0 codes, p1 scales, p2 wsum, p3 masks, p4 offsets): a dense kernel on the
// quantized kernels' path (qisa as in quant_api.cpp: 2 AVX-512 VNNI, 1 AVX2 with AVX-VNNI where the CPU has it,
// 3 AVX2 without), else (portable) the quantized bitmask kernel over the same codes (the masks are all ones, so the
// codes are row-major).
int run_int8_head(Engine& e, const Linear& lin, const float* x, int64_t tokens, float* y, int qisa, int threads) {
#if SP_X86
  const Int8RowsFn rows_fn = int8_head_rows_for(qisa);
  if (rows_fn) {
    const int64_t blocks = (lin.cols + kActBlock - 1) / kActBlock, pad = blocks * kActBlock;
    try {
      if (static_cast<int64_t>(e.head_xu.size()) < tokens * pad) e.head_xu.resize(tokens * pad);
      if (static_cast<int64_t>(e.head_sx.size()) < tokens * blocks) e.head_sx.resize(tokens * blocks);
    } catch (const std::bad_alloc&) {
      return kNoMemory;
    }
    quantize_head_input(x, tokens, lin.cols, e.head_xu.data(), e.head_sx.data());
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

// ---- The decode step's thread team ----
// A decode step with one OpenMP region per kernel call opens ~7 regions per layer (a fork and a join barrier
// each, ~240 per step on SmolLM2); a thread the OS deschedules, on a machine shared with other jobs, stalls every
// one of them for up to a time slice. team_forward wakes the engine's team once per step: the step is a list of
// phases (per layer: q/k/v, attention, o, gate/up, down; then the head), each cut into blocks that threads claim
// from an atomic counter, and a thread waits only where the data requires it (the next phase reads the whole output
// of this one). The blocks compute exactly what forward() computes, with the same kernels, row for row.
enum StepPhase : int64_t { kPhaseQkv = 0, kPhaseAttend = 1, kPhaseO = 2, kPhaseGateUp = 3, kPhaseDown = 4, kPhasesPerLayer = 5 };
constexpr int64_t kResidualRows = 32;  // rows per block of o and down (their outputs feed the residual)
constexpr int64_t kGateUpRows = 64;    // rows of gate and of up per block (SiLU(gate) * up needs both)
constexpr int64_t kHeadRows = 512;     // lm_head rows per block

// The kernels of every Linear for (isa, qisa) and `tokens` tokens through the layers, head_tokens through the head:
// GEMV or GEMM kernels, as sp_linear / sq_linear choose by token count; kUnsupportedIsa when one of them has no
// kernel on this CPU.
int plan_step(Engine& e, int isa, int qisa, int64_t tokens, int64_t head_tokens) {
  const bool gemm = tokens > kQuantGemvTokens, head_gemm = head_tokens > kQuantGemvTokens;
  const bool sparse_gemm = tokens > kMaxGemvTokens, head_sparse_gemm = head_tokens > kMaxGemvTokens;
  const int gemm_kinds = gemm | head_gemm << 1 | sparse_gemm << 2 | head_sparse_gemm << 3;
  if (e.plan_isa == isa && e.plan_qisa == qisa && e.plan_gemm == gemm_kinds) return kOk;
  const int64_t count = e.layers * kLinearsPerLayer + 1;
  e.plan.assign(count, Planned{});
  for (int64_t i = 0; i < count; ++i) {
    const Linear& lin = i == count - 1 ? e.head : e.layer[i / kLinearsPerLayer].lin[i % kLinearsPerLayer];
    Planned& pl = e.plan[i];
    pl.kind = lin.kind;
    bool ok = false;
    if (lin.kind == kDense) {
      pl.dense = dense_for(isa);
      ok = pl.dense != nullptr;
    } else if (lin.kind == kSparse) {
      pl.sparse = team_sparse(static_cast<const uint16_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]),
                              static_cast<const int32_t*>(lin.p[2]), lin.rows, lin.cols, isa,
                              i == count - 1 ? head_sparse_gemm : sparse_gemm);
      ok = pl.sparse.kernel != nullptr && (!(i == count - 1 ? head_sparse_gemm : sparse_gemm) || pl.sparse.tile != nullptr);
    } else if (lin.kind == kQuantized) {
      pl.quant = team_quant(static_cast<const uint16_t*>(lin.p[0]), static_cast<const int32_t*>(lin.p[1]),
                            static_cast<const uint8_t*>(lin.p[2]), static_cast<const float*>(lin.p[3]),
                            static_cast<const uint8_t*>(lin.p[4]), lin.rows, lin.cols, lin.bits, lin.group, qisa,
                            i == count - 1 ? head_gemm : gemm, lin.block_index());
      ok = pl.quant.kernel != nullptr;
    } else if (lin.kind == kDenseInt8) {  // as run_int8_head chooses
      pl.int8_rows = int8_head_rows_for(qisa);
      if (!pl.int8_rows)
        pl.quant = team_quant(static_cast<const uint16_t*>(lin.p[3]), static_cast<const int32_t*>(lin.p[4]),
                              static_cast<const uint8_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]), nullptr, lin.rows,
                              lin.cols, 8, lin.cols, qisa, head_gemm);
      ok = pl.int8_rows != nullptr || pl.quant.kernel != nullptr;
    }
    if (!ok) {
      e.plan_isa = e.plan_qisa = -2;
      return kUnsupportedIsa;
    }
  }
  e.plan_isa = isa;
  e.plan_qisa = qisa;
  e.plan_gemm = gemm_kinds;
  return kOk;
}

// The most rows of a Linear in one block of a phase (a head of q/k/v, 32 or 64 rows, 512 of the head).
int64_t team_block_rows(const Engine& e) { return e.head_dim > kHeadRows ? e.head_dim : kHeadRows; }

// The team's per-thread memory and the step's phases, for `threads` threads and up to `tokens` tokens.
bool ensure_team(Engine& e, int threads, int64_t tokens) {
  const int64_t widest = e.hidden > e.inter ? (e.hidden > e.heads * e.head_dim ? e.hidden : e.heads * e.head_dim)
                                            : (e.inter > e.heads * e.head_dim ? e.inter : e.heads * e.head_dim);
  const int64_t head_blocks = (e.hidden + kActBlock - 1) / kActBlock;
  try {
    if (static_cast<int>(e.team.size()) < threads) e.team.resize(threads);
    for (int i = 0; i < threads; ++i) {
      TeamThread& me = e.team[i];
      if (static_cast<int64_t>(me.h.size()) < tokens * e.hidden) me.h.resize(tokens * e.hidden);
      const size_t qbytes = team_input_bytes(tokens, widest) + 64;
      if (me.qin.size() < qbytes) me.qin.resize(qbytes);
      const int64_t head_bytes = tokens * head_blocks * kActBlock;
      if (static_cast<int64_t>(me.head_xu.size()) < head_bytes) me.head_xu.resize(head_bytes);
      if (static_cast<int64_t>(me.head_sx.size()) < tokens * head_blocks) me.head_sx.resize(tokens * head_blocks);
      if (tokens > kMaxGemvTokens) {
        const size_t sbytes = team_sparse_gemm_bytes(tokens, widest, team_block_rows(e)) + 64;
        if (me.sparse_mem.size() < sbytes) me.sparse_mem.resize(sbytes);
      }
    }
    const int64_t count = e.layers * kPhasesPerLayer + 1;
    if (e.phase_count != count) {
      e.phases.reset(new Phase[count]);
      e.phase_count = count;
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

uint8_t* aligned64(std::vector<uint8_t>& v) {
  return v.data() + (64 - reinterpret_cast<uintptr_t>(v.data()) % 64) % 64;
}

// Rows [r0, r1) of `lin` for every token of x ([tokens][lin.cols]) into y ([tokens][lin.rows]). The thread
// quantizes the phase's input once, at its first block of a quantized Linear in the phase.
bool team_rows(TeamThread& me, int64_t phase, const Linear& lin, const Planned& pl, const float* x, int64_t tokens,
               float* y, int64_t r0, int64_t r1, int64_t block_rows) {
  switch (pl.kind) {
    case kDense: {
      const DenseArgs a{static_cast<const float*>(lin.p[0]), lin.bias, x, y, lin.rows, lin.cols, tokens, lin.cols, lin.rows};
      pl.dense(a, r0, r1);
      return true;
    }
    case kSparse:
      if (pl.sparse.tile) {
        char* mem = me.sparse_mem.data() + (64 - reinterpret_cast<uintptr_t>(me.sparse_mem.data()) % 64) % 64;
        if (me.packed_phase != phase) {
          team_sparse_pack(pl.sparse, x, tokens, mem);
          me.packed_phase = phase;
        }
        team_sparse_gemm_rows(pl.sparse, tokens, lin.bias, y, r0, r1, block_rows, mem);
      } else {
        team_sparse_rows(pl.sparse, x, tokens, lin.bias, y, r0, r1);
      }
      return true;
    case kQuantized:
    case kDenseInt8:
      if (pl.int8_rows) {
        const int64_t blocks = (lin.cols + kActBlock - 1) / kActBlock;
        if (me.quantized_phase != phase) {
          quantize_head_input(x, tokens, lin.cols, me.head_xu.data(), me.head_sx.data());
          me.quantized_phase = phase;
        }
        const Int8Args a{static_cast<const int8_t*>(lin.p[0]), static_cast<const float*>(lin.p[1]),
                         static_cast<const int32_t*>(lin.p[2]), lin.bias, me.head_xu.data(), me.head_sx.data(), y,
                         lin.rows, lin.cols, blocks, tokens, lin.rows};
        pl.int8_rows(a, r0, r1);
        return true;
      }
      if (me.quantized_phase != phase) {
        me.in = team_quantize_input(x, tokens, lin.cols, pl.quant.vector, aligned64(me.qin));
        me.quantized_phase = phase;
      }
      return team_quant_rows(pl.quant, me.in, lin.bias, y, r0, r1);
    default:
      return false;
  }
}

// The thread's normed copy of the residual for `phase` (norm weight w; the head's final norm when w is e.final_norm)
// of tokens [first, first + tokens).
const float* normed(Engine& e, TeamThread& me, int64_t phase, const float* w, int64_t tokens, int64_t first = 0) {
  if (me.normed_phase != phase) {
    for (int64_t t = 0; t < tokens; ++t)
      rmsnorm(e.x.data() + (first + t) * e.hidden, w, me.h.data() + t * e.hidden, e.hidden, e.eps);
    me.normed_phase = phase;
  }
  return me.h.data();
}

int64_t blocks_of(const Engine& e, int64_t kind, int64_t tokens) {
  switch (kind) {
    case kPhaseQkv: return e.heads + 2 * e.kv_heads;
    case kPhaseAttend: return tokens * e.heads;
    case kPhaseO:
    case kPhaseDown: return (e.hidden + kResidualRows - 1) / kResidualRows;
    case kPhaseGateUp: return (e.inter + kGateUpRows - 1) / kGateUpRows;
    default: return (e.vocab + kHeadRows - 1) / kHeadRows;  // the head
  }
}

// Block b of phase p; false when a kernel could not get its scratch memory. The head's phase computes the logits
// of tokens [head_first, head_first + head_tokens).
bool run_block(Engine& e, TeamThread& me, int member, int64_t p, int64_t b, const int64_t* slots, const int64_t* pos,
               int64_t tokens, int64_t head_first, int64_t head_tokens, float* logits, int isa) {
  const int64_t H = e.hidden, D = e.head_dim, QD = e.heads * D, KD = e.kv_heads * D, I = e.inter;
  const int64_t l = p / kPhasesPerLayer, kind = p % kPhasesPerLayer;
  if (l == e.layers) {  // the head, over the final norm of every token
    const float* h = normed(e, me, p, e.final_norm, head_tokens, head_first);
    const int64_t r0 = b * kHeadRows, r1 = r0 + kHeadRows < e.vocab ? r0 + kHeadRows : e.vocab;
    return team_rows(me, p, e.head, e.plan[e.layers * kLinearsPerLayer], h, head_tokens, logits, r0, r1, team_block_rows(e));
  }
  Layer& L = e.layer[l];
  const Planned* plan = e.plan.data() + l * kLinearsPerLayer;
  float *x = e.x.data(), *out = e.out.data();
  if (kind == kPhaseQkv) {  // one head of q, k or v; RoPE and the cache write follow for that head
    const float* h = normed(e, me, p, L.input_norm, tokens);
    const int which = b < e.heads ? kQ : (b < e.heads + e.kv_heads ? kK : kV);
    const int64_t hd = which == kQ ? b : (which == kK ? b - e.heads : b - e.heads - e.kv_heads);
    float* y = which == kQ ? e.q.data() : (which == kK ? e.k.data() : e.v.data());
    const int64_t width = which == kQ ? QD : KD;
    if (!team_rows(me, p, L.lin[which], plan[which], h, tokens, y, hd * D, hd * D + D, team_block_rows(e))) return false;
    for (int64_t t = 0; t < tokens; ++t) {
      float* head = y + t * width + hd * D;
      if (which != kV) rope(head, D, e.rope_table.data() + pos[t] * D);
      if (which != kQ) std::memcpy(e.cache(slots[t], l, which == kK ? 0 : 1, hd) + pos[t] * D, head, D * sizeof(float));
    }
    return true;
  }
  if (kind == kPhaseAttend) {
    const int64_t t = b / e.heads, hd = b % e.heads, kvh = hd / (e.heads / e.kv_heads);
    float* sc = e.scores.data() + static_cast<int64_t>(member) * e.max_context;
    attend_for(isa)(e.q.data() + t * QD + hd * D, e.cache(slots[t], l, 0, kvh), e.cache(slots[t], l, 1, kvh), pos[t], D,
                    sc, e.attn.data() + t * QD + hd * D);
    return true;
  }
  if (kind == kPhaseGateUp) {
    const float* h = normed(e, me, p, L.post_norm, tokens);
    const int64_t r0 = b * kGateUpRows, r1 = r0 + kGateUpRows < I ? r0 + kGateUpRows : I;
    float *g = e.g.data(), *u = e.u.data();
    if (!team_rows(me, p, L.lin[kGate], plan[kGate], h, tokens, g, r0, r1, team_block_rows(e))) return false;
    if (!team_rows(me, p, L.lin[kUp], plan[kUp], h, tokens, u, r0, r1, team_block_rows(e))) return false;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t i = t * I + r0; i < t * I + r1; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    return true;
  }
  // o or down, then this block's rows of the residual
  const int which = kind == kPhaseO ? kO : kDown;
  const float* in = kind == kPhaseO ? e.attn.data() : e.g.data();
  const int64_t r0 = b * kResidualRows, r1 = r0 + kResidualRows < H ? r0 + kResidualRows : H;
  if (!team_rows(me, p, L.lin[which], plan[which], in, tokens, out, r0, r1, team_block_rows(e))) return false;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = t * H + r0; i < t * H + r1; ++i) x[i] += out[i];
  return true;
}

// forward() on the engine's thread team of `threads` threads: a decode step, or a chunk of a prefill. Writes the
// logits of tokens [head_first, head_first + head_tokens) (none when head_tokens is 0).
int team_forward(Engine& e, const int64_t* ids, const int64_t* slots, const int64_t* pos, int64_t tokens, int64_t head_first,
                 int64_t head_tokens, float* logits, int isa, int qisa, int threads) {
  if (int s = plan_step(e, isa, qisa, tokens, head_tokens)) return s;
  if (!ensure_team(e, threads, tokens)) return kNoMemory;
  for (int64_t t = 0; t < tokens; ++t)
    std::memcpy(e.x.data() + t * e.hidden, e.embedding + ids[t] * e.hidden, e.hidden * sizeof(float));
  for (int64_t p = 0; p < e.phase_count; ++p) {
    e.phases[p].next.store(0, std::memory_order_relaxed);
    e.phases[p].done.store(0, std::memory_order_relaxed);
    const bool head = p / kPhasesPerLayer == e.layers;
    e.phases[p].blocks = head && head_tokens == 0 ? 0 : blocks_of(e, head ? -1 : p % kPhasesPerLayer, tokens);
  }
  std::atomic<int> failed{0};
  const int spin_us = g_spin_us.load(std::memory_order_relaxed);
  const int test_delay_us = g_test_phase_delay_us.load(std::memory_order_relaxed);
  auto member_job = [&](int member) {
    TeamThread& me = e.team[member];
    me.normed_phase = me.quantized_phase = me.packed_phase = -1;
    for (int64_t p = 0; p < e.phase_count; ++p) {
      Phase& ph = e.phases[p];
      for (int64_t b; (b = ph.next.fetch_add(1, std::memory_order_relaxed)) < ph.blocks;) {
        if (test_delay_us > 0 && b == 0) std::this_thread::sleep_for(std::chrono::microseconds(test_delay_us));
        if (!failed.load(std::memory_order_relaxed) &&
            !run_block(e, me, member, p, b, slots, pos, tokens, head_first, head_tokens, logits, isa))
          failed.store(1, std::memory_order_relaxed);
        if (ph.done.fetch_add(1, std::memory_order_acq_rel) == ph.blocks - 1) e.phase_done.signal();
      }
      e.phase_done.wait([&ph] { return ph.done.load(std::memory_order_acquire) >= ph.blocks; }, spin_us, &me.waits);
    }
  };
  if (threads <= 1) {
    member_job(0);
  } else {
#if defined(__linux__)
    // a forked child has none of the parent's workers: it starts its own (the parent's are not joinable here)
    if (e.pool && e.pool_pid != getpid()) (void)e.pool.release();
#endif
    if (!e.pool) {
      try {
        e.pool.reset(new TeamPool());
      } catch (const std::bad_alloc&) {
        return kNoMemory;
      }
#if defined(__linux__)
      e.pool_pid = getpid();
#endif
    }
    e.pool->run(threads, member_job);
  }
  // every member has left the step (run() returned after the last one's release): their counts are readable
  for (int m = 0; m < threads; ++m) add_to_process_counts(e.team[m].waits);
  return failed.load() ? kNoMemory : kOk;
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
  e->plan_isa = e->plan_qisa = -2;  // the team's kernels are chosen again
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
  lin.blocks.clear();
  if (kind == sp::kQuantized && sp::derive_block_index(static_cast<const uint16_t*>(p0), rows, cols, nullptr)) {
    try {  // without the memory the Linear keeps the bitmask path (the same results)
      lin.blocks.assign(static_cast<size_t>(rows * sp::block_index_stride(cols)), 0);
      sp::derive_block_index(static_cast<const uint16_t*>(p0), rows, cols, lin.blocks.data());
    } catch (const std::bad_alloc&) {
      lin.blocks.clear();
    }
  }
  return 0;
}

// How many quantized Linears (the head included) carry a 1x4 block index
SD_API int64_t sd_block_linears(void* handle) {
  const sp::Engine* e = static_cast<const sp::Engine*>(handle);
  int64_t count = e->head.blocks.empty() ? 0 : 1;
  for (const sp::Layer& L : e->layer)
    for (const sp::Linear& lin : L.lin) count += lin.blocks.empty() ? 0 : 1;
  return count;
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

// Decode steps and prefill chunks at 2+ threads: 1 (default) on the engine's thread team, 0 one OpenMP region per
// kernel call (the scheme before the team; kept to compare against).
SD_API int sd_set_team(void* handle, int enabled) {
  static_cast<Engine*>(handle)->team_threads = enabled != 0;
  return 0;
}

// Microseconds a team thread spins on an unfinished phase, or a worker for the next step, before it sleeps until
// woken (all engines of the process); -2 (kAdaptiveSpin): adaptive spinning; other negative values restore the
// default (adaptive). Returns the value now in force.
SD_API int sd_set_spin_us(int microseconds) {
  sp::g_spin_us.store(microseconds == sp::kAdaptiveSpin || microseconds >= 0 ? microseconds : sp::kDefaultSpinUs);
  return sp::g_spin_us.load();
}

SD_API int sd_get_spin_us() { return sp::g_spin_us.load(); }

// The process's counts of phase waits (all engines) into out[0..n): ready on arrival, satisfied while spinning,
// spun then slept, slept at once, probes (see WaitCounts); reset != 0 zeroes what it read. Returns how many kinds
// there are (5).
SD_API int sd_wait_stats(int64_t* out, int n, int reset) {
  for (int k = 0; k < sp::kWaitKinds && k < n; ++k) {
    const uint64_t v = reset ? sp::g_wait_counts[k].exchange(0, std::memory_order_relaxed)
                             : sp::g_wait_counts[k].load(std::memory_order_relaxed);
    out[k] = static_cast<int64_t>(v);
  }
  return sp::kWaitKinds;
}

// Test hook: the team thread that claims a phase's first block sleeps `microseconds` (0 to 1000000; 0: off) before
// running it, so that the others wait about that long for the phase. Returns the setting in force.
SD_API int sd_set_test_phase_delay_us(int microseconds) {
  if (microseconds >= 0 && microseconds <= 1000000) sp::g_test_phase_delay_us.store(microseconds);
  return sp::g_test_phase_delay_us.load();
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
    // 2+ threads: on the thread team, as a decode step (one OpenMP region per kernel call spins at its barriers and
    // waits a time slice behind a thread the OS has descheduled: 14x 1 thread's wall time under load, see
    // docs/kernels.md "Threads")
    const int64_t head_tokens = all_logits ? m : (c0 + m == n ? 1 : 0);
    const int s = e->team_threads && threads > 1
                      ? team_forward(*e, tokens + c0, slots.data(), pos.data(), m, all_logits ? 0 : m - 1, head_tokens, dst,
                                     isa, qisa, threads)
                      : forward(*e, tokens + c0, slots.data(), pos.data(), m, dst, want.data(), isa, qisa, threads);
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
  // 1 thread: the kernel calls in order (no waits to save; the team's smaller blocks measured up to 4% slower there)
  const int s = e->team_threads && threads > 1
                    ? team_forward(*e, tokens, slots, pos.data(), batch, 0, batch, logits, isa, qisa, threads)
                    : forward(*e, tokens, slots, pos.data(), batch, logits, want.data(), isa, qisa, threads);
  if (s) return s;
  for (int64_t i = 0; i < batch; ++i) e->length[slots[i]] += 1;
  return kOk;
}
