// CPU tree attention with bf16 products on AMX tiles (Intel Sapphire Rapids and later):
// the attention of a model whose weights stream as bf16 (Llama.use_weight_dtype).
//
// The same visibility and output contract as attention_cpu.cpp (prefix visible to every
// query, tree nodes by the mask or causally, rows t >= tree_lens[b] written as 0, K/V read
// straight from the paged cache), with other arithmetic:
//   S = bf16(q) . bf16(k)          (AMX, fp32 accumulation over d in one fixed order)
//   p = exp(S * scale - max * scale)   (fp32, max and sum over the visible keys)
//   o = (bf16(p) @ bf16(V)) / sum(p)   (AMX, fp32 accumulation over keys in order)
// For one sequence b and KV head h the G = H_q / H_kv heads' T queries go in tiles of 16
// rows; every key of the item is converted once into the tiles' layouts:
//   K:  [16-key chunk][d / 32][pair r < 16][key n < 16] dwords (bf16 d = 2r, 2r + 1),
//       a B tile of S = Q K^T;
//   V:  [32-key chunk][d / 16][key pair r < 16][d' < 16] dwords (keys 2r, 2r + 1), a B
//       tile of O = P V.
// A query's result depends on its own row and the cache only: an AMX tile computes each
// output from its row and column, keys past what a query sees add exact zeros (its mask
// gives p = 0), and chunk boundaries sit at fixed multiples of 16 / 32 positions, so a
// token's bits do not depend on its tree's size, its tile-mates or the thread count. They
// do depend on the slots its ancestors take (as in attention_cpu.cpp): the sums group
// keys by position, and a branch's ancestors are not where they sit once committed.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_paged.h"
#include "cpu_kernels.h"

namespace {

using specrt::attn::Ctx;
using specrt::attn::chunk_rows;
using specrt::attn::item_end;
using specrt::attn::visible_bits;

#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define UNROLL _Pragma("GCC unroll 16")

// One thread's scratch, grown as needed and kept between calls.
struct Scratch {
  std::vector<uint32_t> kt, vt;  // converted K and V (layouts above)
  std::vector<float> s;          // [16, ld] scores, then p
  std::vector<uint16_t> pa;      // [ld / 32][16][32] bf16 p: A tiles of P V
  std::vector<uint16_t> qa;      // [D / 32][16][32] bf16 q: A tiles of Q K^T
  std::vector<float> ob;         // [16, D] P V
  std::vector<uint16_t> vis;     // visible keys of a token, 16-key chunks past the prefix
  template <typename V>
  static auto* at_least(V& v, size_t n) {
    if (v.size() < n + 64) v.resize(n + 64);
    // 64-byte aligned (tile loads and stores do not need it; the vector stores do)
    auto p = reinterpret_cast<uintptr_t>(v.data());
    return reinterpret_cast<typename V::value_type*>((p + 63) & ~uintptr_t(63));
  }
};

// 32 floats (lo = x[0..15], hi = x[16..31]) as 32 bf16, round to nearest even
AMX_TARGET inline __m512i bf16x32(__m512 lo, __m512 hi) {
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

// K and V of positions [0, npos) of (b, h) into kt / vt (zeros past npos).
template <int DK>
AMX_TARGET void convert_kv(const Ctx& c, int64_t b, int64_t h, int64_t npos, uint32_t* kt,
                           uint32_t* vt) {
  constexpr int64_t D = 32 * DK, DT = 2 * DK;
  const float* krow[32];
  const float* vrow[32];
  alignas(64) static const float zeros[D] = {0};
  // interleave the bf16 of a (lanes 0..15) and b (lanes 16..31): dword d = (a[d], b[d])
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  const int64_t n32 = (npos + 31) / 32;
  for (int64_t ch = 0; ch < n32; ++ch) {
    const int64_t c0 = ch * 32, n = std::min<int64_t>(32, npos - c0);
    chunk_rows(c, b, h, c0, n, D, krow, vrow);
    for (int64_t x = n; x < 32; ++x) krow[x] = vrow[x] = zeros;
    // K: two 16-key chunks, each DK tiles [pair][key]
    for (int half = 0; half < 2; ++half) {
      uint32_t* dst = kt + (ch * 2 + half) * DK * 256;
      UNROLL for (int kk = 0; kk < DK; ++kk) {
        __m512 r[16];
        UNROLL for (int i = 0; i < 16; ++i) {
          const float* k = krow[half * 16 + i] + kk * 32;
          r[i] = _mm512_castsi512_ps(bf16x32(_mm512_loadu_ps(k), _mm512_loadu_ps(k + 16)));
        }
        specrt::attn::transpose16(r);
        UNROLL for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + kk * 256 + i * 16, r[i]);
      }
    }
    // V: DT tiles [key pair][d]
    uint32_t* dst = vt + ch * DT * 256;
    for (int r = 0; r < 16; ++r) {
      const float *a = vrow[2 * r], *bb = vrow[2 * r + 1];
      UNROLL for (int dt = 0; dt < DT; ++dt) {
        const __m512i ab = bf16x32(_mm512_loadu_ps(a + dt * 16), _mm512_loadu_ps(bb + dt * 16));
        _mm512_store_si512(dst + dt * 256 + r * 16, _mm512_permutexvar_epi16(inter, ab));
      }
    }
  }
}

// Queries [q0, q1) of (b, h), valid ones only (q1 <= tree_lens[b] * G), in 16-row tiles.
template <int DK>
AMX_TARGET void amx_item(const Ctx& c, int64_t b, int64_t h, int64_t q0, int64_t q1,
                         Scratch& w) {
  constexpr int64_t D = 32 * DK, DT = 2 * DK;
  const int64_t pre = c.P[b], tl = c.L[b];
  const int64_t npos = item_end(c, q1, pre, tl);
  const int64_t n32 = (npos + 31) / 32, ld = n32 * 32;
  uint32_t* kt = Scratch::at_least(w.kt, n32 * 2 * DK * 256);
  uint32_t* vt = Scratch::at_least(w.vt, n32 * DT * 256);
  float* s = Scratch::at_least(w.s, 16 * ld);
  uint16_t* pa = Scratch::at_least(w.pa, 16 * ld);
  uint16_t* qa = Scratch::at_least(w.qa, DK * 512);
  float* ob = Scratch::at_least(w.ob, 16 * D);
  convert_kv<DK>(c, b, h, npos, kt, vt);
  const __m512 scv = _mm512_set1_ps(c.sc);
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t0 = q0; t0 < q1; t0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, q1 - t0));
    const int64_t tnpos = item_end(c, t0 + rows, pre, tl);
    const int64_t n16 = (tnpos + 15) / 16, m32 = (tnpos + 31) / 32;
    // A tiles of Q K^T: the tile's query rows as bf16 (zero rows past the item)
    for (int r = 0; r < 16; ++r) {
      uint16_t* dst = qa + r * 32;
      if (r >= rows) {
        UNROLL for (int kk = 0; kk < DK; ++kk) _mm512_store_si512(dst + kk * 512, _mm512_setzero_si512());
        continue;
      }
      const int64_t qi = t0 + r, t = qi / c.G, g = qi % c.G;
      const float* q = c.Q + ((b * c.T + t) * c.Hq + h * c.G + g) * D;
      UNROLL for (int kk = 0; kk < DK; ++kk)
        _mm512_store_si512(dst + kk * 512, bf16x32(_mm512_loadu_ps(q + kk * 32),
                                                   _mm512_loadu_ps(q + kk * 32 + 16)));
    }
    // S = Q K^T, 16 keys per tile (A: the tile's queries, resident; two accumulators
    // taking turns measured no faster)
    _tile_loadd(2, qa, 64);
    if constexpr (DK >= 2) _tile_loadd(3, qa + 512, 64);
    if constexpr (DK >= 3) _tile_loadd(4, qa + 1024, 64);
    if constexpr (DK >= 4) _tile_loadd(5, qa + 1536, 64);
    for (int64_t k16 = 0; k16 < n16; ++k16) {
      const uint32_t* kb = kt + k16 * DK * 256;
      _tile_zero(0);
      _tile_loadd(6, kb, 64);
      _tile_dpbf16ps(0, 2, 6);
      if constexpr (DK >= 2) { _tile_loadd(7, kb + 256, 64); _tile_dpbf16ps(0, 3, 7); }
      if constexpr (DK >= 3) { _tile_loadd(6, kb + 512, 64); _tile_dpbf16ps(0, 4, 6); }
      if constexpr (DK >= 4) { _tile_loadd(7, kb + 768, 64); _tile_dpbf16ps(0, 5, 7); }
      _tile_stored(0, s + k16 * 16, ld * 4);
    }
    // softmax of each valid row over its visible keys, written as the bf16 A tiles of
    // P V: the max over the raw scores (scale > 0), then p = exp(s scale - max scale)
    // summed in fp32, 0 for keys the row does not see (prefix chunks: every key)
    float lsum[16];
    const int64_t full16 = std::min(pre, tnpos) / 16;  // chunks wholly in the prefix
    // vis[k16 - full16]: visible keys of chunk k16 for query token vis_tok (the G heads
    // of a token are adjacent rows and share them)
    uint16_t* vis = Scratch::at_least(w.vis, n16 - full16);
    int64_t vis_tok = -1;
    for (int r = 0; r < 16; ++r) {
      const float* sr = s + r * ld;
      uint16_t* pr = pa + r * 32;
      lsum[r] = 0.f;
      if (r >= rows) {
        for (int64_t k32 = 0; k32 < m32; ++k32) _mm512_store_si512(pr + k32 * 512, _mm512_setzero_si512());
        continue;
      }
      const int64_t t = (t0 + r) / c.G;
      if (t != vis_tok) {
        for (int64_t k16 = full16; k16 < n16; ++k16) {
          const int64_t c0 = k16 * 16;
          vis[k16 - full16] = static_cast<uint16_t>(
              visible_bits(c, b, t, c0, std::min<int64_t>(16, tnpos - c0), pre, tl));
        }
        vis_tok = t;
      }
      __m512 mv = ninf;
      for (int64_t k16 = 0; k16 < full16; ++k16) mv = _mm512_max_ps(mv, _mm512_load_ps(sr + k16 * 16));
      for (int64_t k16 = full16; k16 < n16; ++k16)
        mv = _mm512_mask_max_ps(mv, vis[k16 - full16], mv, _mm512_load_ps(sr + k16 * 16));
      const float mx = _mm512_reduce_max_ps(mv);
      if (mx == -std::numeric_limits<float>::infinity()) {  // sees nothing: p = 0
        for (int64_t k32 = 0; k32 < m32; ++k32) _mm512_store_si512(pr + k32 * 512, _mm512_setzero_si512());
        continue;
      }
      const __m512 msc = _mm512_set1_ps(mx * c.sc);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k32 = 0; k32 < m32; ++k32) {
        __m512 p[2];
        UNROLL for (int u = 0; u < 2; ++u) {
          const int64_t j = 2 * k32 + u;
          const __mmask16 keep = j < full16 ? 0xffff : j < n16 ? vis[j - full16] : 0;
          p[u] = _mm512_maskz_mov_ps(keep, specrt::exp512(_mm512_fmsub_ps(
                                                _mm512_load_ps(sr + j * 16), scv, msc)));
          sum = _mm512_add_ps(sum, p[u]);
        }
        _mm512_store_si512(pr + k32 * 512, bf16x32(p[0], p[1]));
      }
      lsum[r] = _mm512_reduce_add_ps(sum);
    }
    // O = P V, up to 4 column tiles of 16 at a time
    for (int64_t d0 = 0; d0 < DT; d0 += 4) {
      const int nd = static_cast<int>(std::min<int64_t>(4, DT - d0));
      _tile_zero(0);
      _tile_zero(1);
      if (nd > 2) { _tile_zero(2); _tile_zero(3); }
      for (int64_t k32 = 0; k32 < m32; ++k32) {
        const uint32_t* vb = vt + (k32 * DT + d0) * 256;
        _tile_loadd(4, pa + k32 * 512, 64);
        _tile_loadd(6, vb, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, vb + 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        if (nd > 2) {
          _tile_loadd(6, vb + 512, 64);
          _tile_dpbf16ps(2, 4, 6);
          _tile_loadd(7, vb + 768, 64);
          _tile_dpbf16ps(3, 4, 7);
        }
      }
      _tile_stored(0, ob + d0 * 16, D * 4);
      _tile_stored(1, ob + d0 * 16 + 16, D * 4);
      if (nd > 2) {
        _tile_stored(2, ob + d0 * 16 + 32, D * 4);
        _tile_stored(3, ob + d0 * 16 + 48, D * 4);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t qi = t0 + r, t = qi / c.G, g = qi % c.G;
      float* o = c.O + ((b * c.T + t) * c.Hq + h * c.G + g) * D;
      if (lsum[r] == 0.f) {
        std::memset(o, 0, sizeof(float) * D);
        continue;
      }
      const __m512 inv = _mm512_set1_ps(1.f / lsum[r]);
      UNROLL for (int dt = 0; dt < DT; ++dt)
        _mm512_storeu_ps(o + dt * 16, _mm512_mul_ps(_mm512_load_ps(ob + r * D + dt * 16), inv));
    }
  }
}

using AmxItem = void (*)(const Ctx&, int64_t, int64_t, int64_t, int64_t, Scratch&);

AmxItem amx_item_for(int64_t D) {
  switch (D) {
    case 32: return amx_item<1>;
    case 64: return amx_item<2>;
    case 128: return amx_item<4>;
    default: return nullptr;
  }
}

}  // namespace

namespace specrt {

bool amx_attention_usable(int64_t D) {
  static const bool cpu = [] {
    __builtin_cpu_init();
    return amx_tiles_usable() && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return cpu && amx_item_for(D) != nullptr;
}

void require_amx_attention(const char* op, int64_t D) {
  if (!amx_attention_usable(D))
    throw std::invalid_argument(std::string(op) + ": bf16 attention needs AMX tiles and "
                                "AVX512-BF16 and head dim 32, 64 or 128 (head dim " +
                                std::to_string(D) + ")");
}


void tree_attention_amx_raw(const float* Q, const float* C, const int32_t* BT, int64_t maxb,
                            const int64_t* P, const int64_t* L, const uint8_t* M, float* O,
                            int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t bs, double scale, int threads) {
  const AmxItem fn = amx_item_for(D);
  const int64_t G = Hq / Hkv;
  const Ctx c{Q, C, BT, P, L, M, O, T, Hq, Hkv, G, bs, maxb, static_cast<float>(scale)};
  // rows past a sequence's tree: 0
  for (int64_t b = 0; b < B; ++b)
    if (L[b] < T) std::memset(O + (b * T + L[b]) * Hq * D, 0, sizeof(float) * (T - L[b]) * Hq * D);
  // items: (b, KV head, a run of 16-query tiles); a step with few (b, head) pairs splits
  // each pair's tiles so that every thread gets a share (each item converts the pair's
  // K/V again: cheap beside its tiles)
  const int64_t tiles = (T * G + 15) / 16, pairs = B * Hkv;
  int64_t per = tiles;
  if (threads > 1 && pairs < 2 * threads) {
    const int64_t split = std::min(tiles, (2 * threads + pairs - 1) / pairs);
    per = (tiles + split - 1) / split;
  }
  const int64_t nqb = (tiles + per - 1) / per, items = pairs * nqb;
#pragma omp parallel num_threads(std::max(1, threads)) if (threads > 1 && items > 1)
  {
    thread_local Scratch w;
    specrt::amx_tiles_on();  // every tile 16 rows of 64 bytes
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / (Hkv * nqb), h = (it / nqb) % Hkv, qb = it % nqb;
      const int64_t nq = L[b] * G, q0 = qb * per * 16, q1 = std::min(nq, (qb + 1) * per * 16);
      if (q0 < q1) fn(c, b, h, q0, q1, w);
    }
    specrt::amx_tiles_off();
  }
}

}  // namespace specrt
