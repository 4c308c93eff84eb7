// What the CPU tree-attention paths share (attention_cpu.cpp: fp32 AVX-512 / AVX2 /
// portable; attention_amx.cpp: bf16 products on AMX tiles): one call's arguments and
// the paged cache's addressing and visibility rules.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace specrt::attn {

// Q, O [B, T, Hq, D]; C [NB, 2, bs, Hkv, D]; BT [B, maxb]; P / L [B] prefix and tree
// lengths; M [B, T, T] or nullptr (causal); sc the softmax scale. Query qi = t G + g of
// (b, KV head h) is head h G + g of token t.
struct Ctx {
  const float* Q;
  const float* C;
  const int32_t* BT;
  const int64_t* P;
  const int64_t* L;
  const uint8_t* M;
  float* O;
  int64_t T, Hq, Hkv, G, bs, maxb;
  float sc;
};

// Visible keys of query row t among chunk positions c0 .. c0+n-1, as bits.
inline uint32_t visible_bits(const Ctx& c, int64_t b, int64_t t, int64_t c0, int64_t n,
                             int64_t pre, int64_t tl) {
  uint32_t bits = n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  if (c0 + n <= pre) return bits;  // all prefix: visible to every query
  if (!c.M) {  // causal (t < tl): positions up to pre + t
    const int64_t lim = pre + t + 1 - c0;
    return lim <= 0 ? 0u : lim >= n ? bits : ((1u << lim) - 1u);
  }
  for (int64_t x = std::max<int64_t>(0, pre - c0); x < n; ++x) {
    const int64_t j = c0 + x - pre;
    const bool vis = j < tl && c.M[(b * c.T + t) * c.T + j] != 0;
    if (!vis) bits &= ~(1u << x);
  }
  return bits;
}

// The K and V rows of sequence b, KV head h at positions c0 .. c0 + n - 1 in the paged
// cache (one division per chunk, not per key).
inline void chunk_rows(const Ctx& c, int64_t b, int64_t h, int64_t c0, int64_t n, int64_t D,
                       const float** krow, const float** vrow) {
  int64_t bi = c0 / c.bs, off = c0 % c.bs;
  const int64_t stride = c.Hkv * D, vofs = c.bs * stride;
  const float* base = c.C + (int64_t(c.BT[b * c.maxb + bi]) * 2 * c.bs + off) * stride + h * D;
  for (int64_t x = 0; x < n; ++x) {
    if (off == c.bs) {
      off = 0;
      base = c.C + int64_t(c.BT[b * c.maxb + ++bi]) * 2 * c.bs * stride + h * D;
    }
    krow[x] = base;
    vrow[x] = base + vofs;
    base += stride;
    ++off;
  }
}

// Where an item's chunk loop can stop: causal queries see nothing past pre + t, so a
// block of queries up to row t_max ends there (a prefill's upper triangle is skipped);
// a tree mask may show any node, so all of it. Chunks start at multiples of CH whatever
// the item, and chunks a query cannot see never touch its state: stopping early changes
// no query's arithmetic.
inline int64_t item_end(const Ctx& c, int64_t q1, int64_t pre, int64_t tl) {
  return c.M ? pre + tl : pre + std::min(tl, (q1 - 1) / c.G + 1);
}

// r[0..15] (16 dwords each) transposed in place: r[j] lane i = the old r[i] lane j.
// Shuffles only, so every element keeps its bits.
__attribute__((target("avx512f"))) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

}  // namespace specrt::attn
