// Portable kernels: plain C++ loops over the set bits of each mask, for CPUs without AVX2 (and the
// reference the vector paths are tested against, beside dense matmul). Built with the compiler's
// baseline flags only, so this file runs on any CPU the package installs on.
#include "sparse_kernels.h"

namespace sp {

void gemv_portable(const Packed& w, const float* x, int64_t tokens, const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t n = r0; n < r1; ++n) {
    float acc[kMaxGemvTokens] = {0};
    const float* v = w.values + w.offsets[n * w.chunks];
    const uint16_t* masks = w.masks + n * w.groups;
    for (int64_t g = 0; g < w.groups; ++g) {
      for (uint32_t m = masks[g]; m; m &= m - 1) {
        const int64_t k = g * kGroup + lowest_bit(m);
        const float weight = *v++;
        for (int64_t t = 0; t < tokens; ++t) acc[t] += weight * x[t * w.cols + k];
      }
    }
    const float b = bias ? bias[n] : 0.0f;
    for (int64_t t = 0; t < tokens; ++t) y[t * w.rows + n] = acc[t] + b;
  }
}

void gemm_tile_portable(const GemmTile& tile) {
  const Packed& w = *tile.w;
  const int64_t subs = tile.segments();
  int32_t count = 0;
  for (int64_t n = tile.r0; n < tile.r1; ++n) {
    const uint16_t* masks = w.masks + n * w.groups;
    for (int64_t s = 0; s < subs; ++s) {
      tile.starts[(n - tile.r0) * subs + s] = count;
      const int64_t ga = tile.g0 + s * tile.sub, gb = ga + tile.sub < tile.g1 ? ga + tile.sub : tile.g1;
      for (int64_t g = ga; g < gb; ++g)
        for (uint32_t m = masks[g]; m; m &= m - 1)
          tile.idx[count++] = static_cast<uint16_t>(((g - tile.g0) * kGroup + lowest_bit(m)) * kTokenBlock);
    }
  }
  tile.starts[(tile.r1 - tile.r0) * subs] = count;
  const int64_t width = tile.blocks * kTokenBlock, chunk = tile.g0 / kGroupsPerChunk;
  for (int64_t b = 0; b < tile.blocks; ++b) {
    const float* xb = tile.xp + (b * w.cols + tile.g0 * kGroup) * kTokenBlock;
    for (int64_t s = 0; s < subs; ++s)
      for (int64_t n = tile.r0; n < tile.r1; ++n) {
        const int32_t* seg = tile.starts + (n - tile.r0) * subs;
        const int32_t first = seg[s], end = seg[s + 1];
        if (first == end) continue;
        const float* v = w.values + w.offsets[n * w.chunks + chunk] + (first - seg[0]);
        float acc[kTokenBlock];
        float* out = tile.yt + n * width + b * kTokenBlock;
        for (int j = 0; j < kTokenBlock; ++j) acc[j] = out[j];
        for (int32_t i = first; i < end; ++i) {
          const float weight = v[i - first];
          const float* xk = xb + tile.idx[i];
          for (int j = 0; j < kTokenBlock; ++j) acc[j] += weight * xk[j];
        }
        for (int j = 0; j < kTokenBlock; ++j) out[j] = acc[j];
      }
  }
}

}  // namespace sp
