// CPU tree attention straight from the paged cache (fp32): no gather of K/V.
//
// For every sequence b and KV head h, the G = H_q / H_kv query heads of its group and
// all T tree queries are served together: each cached key/value row is read once from
// its block and scored against every query that may see it (online softmax, one
// running max / sum / accumulator per query). Visibility: the whole prefix
// (positions < prefix_lens[b]); tree node j (position prefix + j) iff j < tree_lens[b]
// and mask[b, i, j] (or j <= i when there is no mask). Query rows i >= tree_lens[b]
// are written as 0. OpenMP over (b, kv head).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_paged.h"
#include "cpu_kernels.h"

namespace py = pybind11;

// Unroll register-array loops before GCC's scalar replacement (see gemm_cpu.cpp).
#define UNROLL _Pragma("GCC unroll 16")

namespace {

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}


// ---------------------------------------------------------------- AVX-512 fast path
// Work item: one sequence b, one KV head h, a block of at most QB of its G*T queries
// (query qi = t * G + g). Keys go in chunks of CH; a query's scores against a chunk are
// one outer-product pass over the chunk's K transposed once ([D][CH]) and shared by the
// block's queries, summed over d in order whatever the block holds: a query's result
// does not depend on how many queries share its item (batch and tree invariance; a
// dot-product form for few queries was faster but summed in another order). The softmax
// weights come from a vectorised exp; P V accumulates in registers.
constexpr int QB = 48, CH = 32;

// kt[d * CH + x] = krow[x][d] for x < n (0 past n), D a multiple of 16: 16 x 16 blocks
// transposed in registers (unpack, shuffle, then 128-bit lane shuffles; no arithmetic, so
// the keys keep their bits). The AVX-512 twin of transpose_chunk_avx2 below.
__attribute__((target("avx512f"))) void transpose_chunk_avx512(const float* const* krow,
                                                               int64_t n, int64_t D, float* kt) {
  alignas(64) static const float zeros[16] = {0};  // the row of every key past n
  for (int64_t x0 = 0; x0 < CH; x0 += 16)
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16];
      UNROLL for (int i = 0; i < 16; ++i)
        r[i] = x0 + i < n ? _mm512_loadu_ps(krow[x0 + i] + d0) : _mm512_load_ps(zeros);
      specrt::attn::transpose16(r);
      UNROLL for (int i = 0; i < 16; ++i) _mm512_store_ps(kt + (d0 + i) * CH + x0, r[i]);
    }
}

using specrt::attn::Ctx;
using specrt::attn::chunk_rows;
using specrt::attn::item_end;
using specrt::attn::visible_bits;

// NG queries of one item against one chunk of keys (kt: the chunk's K transposed, vrow:
// its V rows), each query's online-softmax state updated in place. The NG queries share
// every load of K and V and run NG independent FMA chains (one query alone is bound by
// FMA latency), while each query's own arithmetic is the one-query loop's, step for step:
// scores summed over d in order, P V over the chunk's visible keys in order (a masked
// key leaves the accumulator untouched), so the grouping changes no bit of any result.
template <int DV, int NG>
__attribute__((target("avx512f"))) inline void group_chunk_avx512(
    const float* const* qs, const uint32_t* bits, float* const* accs, float* m, float* l,
    const float* kt, const float* const* vrow, int64_t n, __m512 scv) {
  constexpr int64_t D = DV * 16;
  alignas(64) float pbuf[NG][CH];
  __m512 s0[NG], s1[NG];
  UNROLL for (int j = 0; j < NG; ++j) s0[j] = s1[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m512 k0 = _mm512_load_ps(kt + d * CH), k1 = _mm512_load_ps(kt + d * CH + 16);
    UNROLL for (int j = 0; j < NG; ++j) {
      const __m512 qd = _mm512_set1_ps(qs[j][d]);
      s0[j] = _mm512_fmadd_ps(qd, k0, s0[j]);
      s1[j] = _mm512_fmadd_ps(qd, k1, s1[j]);
    }
  }
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 a[NG][DV];
  float corr[NG];
  UNROLL for (int j = 0; j < NG; ++j) {
    s0[j] = _mm512_mask_mul_ps(ninf, static_cast<__mmask16>(bits[j] & 0xffff), s0[j], scv);
    s1[j] = _mm512_mask_mul_ps(ninf, static_cast<__mmask16>(bits[j] >> 16), s1[j], scv);
    const float mc = std::max(m[j], _mm512_reduce_max_ps(_mm512_max_ps(s0[j], s1[j])));
    corr[j] = std::exp(m[j] - mc);  // 0 when m was -inf
    const __m512 mcv = _mm512_set1_ps(mc);
    const __m512 p0 = specrt::exp512(_mm512_sub_ps(s0[j], mcv));
    const __m512 p1 = specrt::exp512(_mm512_sub_ps(s1[j], mcv));
    l[j] = l[j] * corr[j] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
    _mm512_store_ps(pbuf[j], p0);
    _mm512_store_ps(pbuf[j] + 16, p1);
    m[j] = mc;
    const __m512 cv = _mm512_set1_ps(corr[j]);
    UNROLL for (int v = 0; v < DV; ++v) a[j][v] = _mm512_mul_ps(_mm512_load_ps(accs[j] + 16 * v), cv);
  }
  for (int64_t x = 0; x < n; ++x) {
    __m512 vv[DV];
    UNROLL for (int v = 0; v < DV; ++v) vv[v] = _mm512_loadu_ps(vrow[x] + 16 * v);
    UNROLL for (int j = 0; j < NG; ++j) {
      const __mmask16 k = ((bits[j] >> x) & 1u) ? 0xffff : 0;
      const __m512 px = _mm512_set1_ps(pbuf[j][x]);
      UNROLL for (int v = 0; v < DV; ++v) a[j][v] = _mm512_mask3_fmadd_ps(px, vv[v], a[j][v], k);
    }
  }
  UNROLL for (int j = 0; j < NG; ++j)
    UNROLL for (int v = 0; v < DV; ++v) _mm512_store_ps(accs[j] + 16 * v, a[j][v]);
}

template <int DV>
__attribute__((target("avx512f"))) void item_avx512(const Ctx& c, int64_t b, int64_t h,
                                                     int64_t q0, int64_t q1, float* kt) {
  constexpr int64_t D = DV * 16;
  constexpr int NG = DV >= 8 ? 2 : 4;  // queries per group: NG * DV accumulators <= 16
  const int64_t pre = c.P[b], tl = c.L[b], npos = item_end(c, q1, pre, tl);
  const int64_t nq = q1 - q0;
  float m[QB], l[QB];
  alignas(64) float acc[QB * D];
  const float* vrow[CH];
  const float* krow[CH];
  const float* qs[QB];
  float* accs[QB];
  uint32_t bits[QB];
  int act[QB];
  for (int64_t i = 0; i < nq; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  std::memset(acc, 0, sizeof(float) * nq * D);
  const __m512 scv = _mm512_set1_ps(c.sc);
  for (int64_t c0 = 0; c0 < npos; c0 += CH) {
    const int64_t n = std::min<int64_t>(CH, npos - c0);
    chunk_rows(c, b, h, c0, n, D, krow, vrow);
    transpose_chunk_avx512(krow, n, D, kt);
    // the queries that see some key of this chunk, packed for the groups
    int na = 0;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t qi = q0 + i, t = qi / c.G, g = qi % c.G;
      if (t >= tl) continue;
      const uint32_t bi = visible_bits(c, b, t, c0, n, pre, tl);
      if (!bi) continue;
      act[na] = static_cast<int>(i);
      bits[na] = bi;
      qs[na] = c.Q + ((b * c.T + t) * c.Hq + h * c.G + g) * D;
      accs[na] = acc + i * D;
      ++na;
    }
    int j = 0;
    for (; j < na; j += NG) {
      const int ng = std::min(NG, na - j);
      float mg[NG], lg[NG];
      for (int u = 0; u < ng; ++u) {
        mg[u] = m[act[j + u]];
        lg[u] = l[act[j + u]];
      }
      if (ng == NG) group_chunk_avx512<DV, NG>(qs + j, bits + j, accs + j, mg, lg, kt, vrow, n, scv);
      else if (ng == 3) group_chunk_avx512<DV, 3>(qs + j, bits + j, accs + j, mg, lg, kt, vrow, n, scv);
      else if (ng == 2) group_chunk_avx512<DV, 2>(qs + j, bits + j, accs + j, mg, lg, kt, vrow, n, scv);
      else group_chunk_avx512<DV, 1>(qs + j, bits + j, accs + j, mg, lg, kt, vrow, n, scv);
      for (int u = 0; u < ng; ++u) {
        m[act[j + u]] = mg[u];
        l[act[j + u]] = lg[u];
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t qi = q0 + i, t = qi / c.G, g = qi % c.G;
    float* o = c.O + ((b * c.T + t) * c.Hq + h * c.G + g) * D;
    if (t >= tl || l[i] == 0.f) {
      std::memset(o, 0, sizeof(float) * D);
    } else {
      const float inv = 1.f / l[i];
      for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv;
    }
  }
}

// ------------------------------------------------------------------ AVX2 fast path
// The AVX-512 item above on 8-lane registers: the same work split (one sequence, one KV
// head, a block of at most QB queries), K transposed once per chunk for many queries,
// a vectorised exp, P V accumulated in registers.
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) inline float hmax256(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// lanes of an 8-bit visibility mask as an all-ones / zero float mask
__attribute__((target("avx2,fma"))) inline __m256 lane_mask(uint32_t bits8) {
  const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i b = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits8)), lanes);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(b, lanes));
}

// kt[d * CH + x] = krow[x][d] for x < n (0 past n), D a multiple of 8: 8 x 8 blocks
// transposed in registers.
__attribute__((target("avx2,fma"))) void transpose_chunk_avx2(const float* const* krow,
                                                             int64_t n, int64_t D, float* kt) {
  alignas(32) static const float zeros[8] = {0};  // the row of every key past n
  for (int64_t x0 = 0; x0 < CH; x0 += 8) {
    const float* r[8];
    for (int i = 0; i < 8; ++i) r[i] = x0 + i < n ? krow[x0 + i] : zeros;
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(r[i] + (r[i] == zeros ? 0 : d0));
      const __m256 t0 = _mm256_unpacklo_ps(a[0], a[1]), t1 = _mm256_unpackhi_ps(a[0], a[1]);
      const __m256 t2 = _mm256_unpacklo_ps(a[2], a[3]), t3 = _mm256_unpackhi_ps(a[2], a[3]);
      const __m256 t4 = _mm256_unpacklo_ps(a[4], a[5]), t5 = _mm256_unpackhi_ps(a[4], a[5]);
      const __m256 t6 = _mm256_unpacklo_ps(a[6], a[7]), t7 = _mm256_unpackhi_ps(a[6], a[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* o = kt + d0 * CH + x0;
      _mm256_store_ps(o + 0 * CH, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_store_ps(o + 1 * CH, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_store_ps(o + 2 * CH, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_store_ps(o + 3 * CH, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_store_ps(o + 4 * CH, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_store_ps(o + 5 * CH, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_store_ps(o + 6 * CH, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_store_ps(o + 7 * CH, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
}

// s[r][x] = sum_d q[r][d] kt[d * CH + x] for NQ queries and the CH keys of a chunk, each
// summed over d in order (one FMA chain per lane): the same bits whether a query is
// scored alone or beside another; two queries keep 8 FMA chains in flight.
template <int NQ>
__attribute__((target("avx2,fma"))) inline void scores_avx2(const float* const* q,
                                                            const float* kt, int64_t D,
                                                            float* const* s) {
  __m256 a[NQ][4];
  UNROLL for (int r = 0; r < NQ; ++r)
    UNROLL for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m256 x[NQ];
    UNROLL for (int r = 0; r < NQ; ++r) x[r] = _mm256_set1_ps(q[r][d]);
    UNROLL for (int j = 0; j < 4; ++j) {
      const __m256 k = _mm256_load_ps(kt + d * CH + 8 * j);
      UNROLL for (int r = 0; r < NQ; ++r) a[r][j] = _mm256_fmadd_ps(x[r], k, a[r][j]);
    }
  }
  UNROLL for (int r = 0; r < NQ; ++r)
    UNROLL for (int j = 0; j < 4; ++j) _mm256_store_ps(s[r] + 8 * j, a[r][j]);
}

template <int DV>
__attribute__((target("avx2,fma"))) void item_avx2(const Ctx& c, int64_t b, int64_t h,
                                                  int64_t q0, int64_t q1, float* kt) {
  constexpr int64_t D = DV * 8;
  const int64_t pre = c.P[b], tl = c.L[b], npos = item_end(c, q1, pre, tl);
  const int64_t nq = q1 - q0;
  float m[QB], l[QB];
  alignas(64) float acc[QB * D];
  alignas(64) float pbuf[CH];
  alignas(32) float sbuf[QB * CH];
  uint32_t bits[QB];
  int live[QB];
  const float* qrow[QB];
  const float* vrow[CH];
  const float* krow[CH];
  for (int64_t i = 0; i < nq; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
    const int64_t qi = q0 + i, t = qi / c.G, g = qi % c.G;
    qrow[i] = c.Q + ((b * c.T + t) * c.Hq + h * c.G + g) * D;  // read only for t < tl
  }
  std::memset(acc, 0, sizeof(float) * nq * D);
  const __m256 scv = _mm256_set1_ps(c.sc);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c0 = 0; c0 < npos; c0 += CH) {
    const int64_t n = std::min<int64_t>(CH, npos - c0);
    chunk_rows(c, b, h, c0, n, D, krow, vrow);
    transpose_chunk_avx2(krow, n, D, kt);
    // the chunk's scores of every query that sees some of it, two queries at a time
    // (8 independent FMA chains; one query's 4 leave the FMA units half idle)
    int nl = 0;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t t = (q0 + i) / c.G;
      if (t >= tl) continue;
      bits[i] = visible_bits(c, b, t, c0, n, pre, tl);
      if (bits[i]) live[nl++] = static_cast<int>(i);
    }
    int u = 0;
    for (; u + 1 < nl; u += 2) {
      const float* q2[2] = {qrow[live[u]], qrow[live[u + 1]]};
      float* s2[2] = {sbuf + live[u] * CH, sbuf + live[u + 1] * CH};
      scores_avx2<2>(q2, kt, D, s2);
    }
    if (u < nl) {
      float* s1 = sbuf + live[u] * CH;
      scores_avx2<1>(&qrow[live[u]], kt, D, &s1);
    }
    for (int li = 0; li < nl; ++li) {
      const int64_t i = live[li];
      const uint32_t bits_i = bits[i];
      __m256 sv[4];
      UNROLL for (int j = 0; j < 4; ++j) sv[j] = _mm256_load_ps(sbuf + i * CH + 8 * j);
      __m256 mx = ninf;
      UNROLL for (int j = 0; j < 4; ++j) {
        sv[j] = _mm256_blendv_ps(ninf, _mm256_mul_ps(sv[j], scv), lane_mask((bits_i >> (8 * j)) & 0xff));
        mx = _mm256_max_ps(mx, sv[j]);
      }
      const float mc = std::max(m[i], hmax256(mx));
      const float corr = std::exp(m[i] - mc);  // 0 when m was -inf
      const __m256 mcv = _mm256_set1_ps(mc);
      __m256 ps = _mm256_setzero_ps();
      UNROLL for (int j = 0; j < 4; ++j) {
        const __m256 pj = specrt::exp256(_mm256_sub_ps(sv[j], mcv));
        ps = _mm256_add_ps(ps, pj);
        _mm256_store_ps(pbuf + 8 * j, pj);
      }
      l[i] = l[i] * corr + hsum256(ps);
      float* ai = acc + i * D;
      __m256 a[DV];
      const __m256 cv = _mm256_set1_ps(corr);
      UNROLL for (int v = 0; v < DV; ++v) a[v] = _mm256_mul_ps(_mm256_load_ps(ai + 8 * v), cv);
      for (int64_t x = 0; x < n; ++x) {
        if (!((bits_i >> x) & 1u)) continue;
        const __m256 px = _mm256_set1_ps(pbuf[x]);
        UNROLL for (int v = 0; v < DV; ++v)
          a[v] = _mm256_fmadd_ps(px, _mm256_loadu_ps(vrow[x] + 8 * v), a[v]);
      }
      UNROLL for (int v = 0; v < DV; ++v) _mm256_store_ps(ai + 8 * v, a[v]);
      m[i] = mc;
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t qi = q0 + i, t = qi / c.G, g = qi % c.G;
    float* o = c.O + ((b * c.T + t) * c.Hq + h * c.G + g) * D;
    if (t >= tl || l[i] == 0.f) {
      std::memset(o, 0, sizeof(float) * D);
    } else {
      const float inv = 1.f / l[i];
      for (int64_t d = 0; d < D; ++d) o[d] = acc[i * D + d] * inv;
    }
  }
}

// The portable path (any D; AVX2+FMA code where the CPU has it, baseline x86-64
// otherwise): per query: running max, running sum, accumulator [D]; scores of one chunk
// of keys.
constexpr int64_t GCH = 64;

__attribute__((target_clones("arch=haswell", "default")))
void generic_item(const Ctx& c, int64_t D, int64_t b, int64_t h, float* m, float* l,
                  float* acc, float* s, const float** vrow) {
  const int64_t T = c.T, Hq = c.Hq, Hkv = c.Hkv, G = c.G, bs = c.bs, maxb = c.maxb;
  const int64_t pre = c.P[b], tl = c.L[b], nql = tl * G, nq = T * G;
  const bool has_mask = c.M != nullptr;
  std::fill(m, m + nq, -std::numeric_limits<float>::infinity());
  std::fill(l, l + nq, 0.f);
  std::fill(acc, acc + nq * D, 0.f);
  const float* qb = c.Q + (b * T * Hq + h * G) * D;  // query (t, g) at qb + (t Hq + g) D
  for (int64_t c0 = 0; c0 < pre + tl; c0 += GCH) {
    const int64_t n = std::min(GCH, pre + tl - c0);
    // scores of every query against the chunk's keys (-inf where not visible)
    for (int64_t x = 0; x < n; ++x) {
      const int64_t pos = c0 + x, j = pos - pre;
      const int64_t blk = c.BT[b * maxb + pos / bs], off = pos % bs;
      const float* k = c.C + (((blk * 2 + 0) * bs + off) * Hkv + h) * D;
      vrow[x] = c.C + (((blk * 2 + 1) * bs + off) * Hkv + h) * D;
      for (int64_t t = 0; t < tl; ++t) {
        const bool vis = j < 0 || (has_mask ? c.M[(b * T + t) * T + j] != 0 : j <= t);
        for (int64_t g = 0; g < G; ++g)
          s[(t * G + g) * GCH + x] =
              vis ? dot(qb + (t * Hq + g) * D, k, D) * c.sc
                  : -std::numeric_limits<float>::infinity();
      }
    }
    // online softmax over the chunk, one rescale per query
    for (int64_t qi = 0; qi < nql; ++qi) {
      float* sr = s + qi * GCH;
      float mc = m[qi];
      for (int64_t x = 0; x < n; ++x) mc = std::max(mc, sr[x]);
      if (mc == -std::numeric_limits<float>::infinity()) continue;  // nothing visible yet
      float* a = acc + qi * D;
      const float corr = std::exp(m[qi] - mc);  // 0 when m was -inf
      float sum = 0.f;
      for (int64_t x = 0; x < n; ++x) {
        sr[x] = std::exp(sr[x] - mc);
        sum += sr[x];
      }
      l[qi] = l[qi] * corr + sum;
      for (int64_t d = 0; d < D; ++d) a[d] *= corr;
      for (int64_t x = 0; x < n; ++x)
        if (sr[x] != 0.f) axpy(a, sr[x], vrow[x], D);
      m[qi] = mc;
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float* o = c.O + ((b * T + t) * Hq + h * G + g) * D;
      const int64_t qi = t * G + g;
      if (t >= tl || l[qi] == 0.f) {
        std::memset(o, 0, sizeof(float) * D);
      } else {
        const float inv = 1.f / l[qi];
        const float* a = acc + qi * D;
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      }
    }
}

using ItemFn = void (*)(const Ctx&, int64_t, int64_t, int64_t, int64_t, float*);

// The vector item for head dim D on this CPU (AVX-512F, else AVX2+FMA), or nullptr: the
// portable path. SPECRT_ATTN_ISA=avx2|portable caps it (tests run every path).
ItemFn avx512_item_for(int64_t D) {
  __builtin_cpu_init();
  const char* cap = std::getenv("SPECRT_ATTN_ISA");
  const std::string want = cap ? cap : "";
  if (want == "portable") return nullptr;
  if (__builtin_cpu_supports("avx512f") && want != "avx2") {
    switch (D) {
      case 16: return item_avx512<1>;
      case 32: return item_avx512<2>;
      case 64: return item_avx512<4>;
      case 128: return item_avx512<8>;
      default: return nullptr;
    }
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    switch (D) {
      case 8: return item_avx2<1>;
      case 16: return item_avx2<2>;
      case 32: return item_avx2<4>;
      case 64: return item_avx2<8>;
      case 128: return item_avx2<16>;
      default: return nullptr;
    }
  }
  return nullptr;
}

using f32 = py::array_t<float, py::array::c_style>;
using i32 = py::array_t<int32_t, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;
using u8 = py::array_t<uint8_t, py::array::c_style>;

// q, out [B, T, Hq, D]; cache [NB, 2, bs, Hkv, D]; bt [B, maxb]; prefix, lens [B];
// mask [B, T, T] (uint8) or an empty array for causal.
void tree_attention_cpu(f32 q, f32 cache, i32 bt, i64 prefix, u8 mask, i64 lens, double scale,
                        f32 out, int threads, bool bf16) {
  if (q.ndim() != 4 || cache.ndim() != 5 || cache.shape(1) != 2 || bt.ndim() != 2 ||
      out.ndim() != 4)
    throw std::invalid_argument("tree_attention_cpu: bad ranks");
  const int64_t B = q.shape(0), T = q.shape(1), Hq = q.shape(2), D = q.shape(3);
  const int64_t NB = cache.shape(0), bs = cache.shape(2), Hkv = cache.shape(3);
  const int64_t maxb = bt.shape(1);
  if (cache.shape(4) != D || Hq % Hkv || bt.shape(0) != B || prefix.size() != B ||
      lens.size() != B)
    throw std::invalid_argument("tree_attention_cpu: shapes do not agree");
  for (int i = 0; i < 4; ++i)
    if (out.shape(i) != q.shape(i)) throw std::invalid_argument("tree_attention_cpu: out shape");
  const bool has_mask = mask.size() > 0;
  if (has_mask && (mask.ndim() != 3 || mask.shape(0) != B || mask.shape(1) != T ||
                   mask.shape(2) != T))
    throw std::invalid_argument("tree_attention_cpu: mask must be [B, T, T]");
  const float* Q = q.data();
  const float* C = cache.data();
  const int32_t* BT = bt.data();
  const int64_t* P = prefix.data();
  const int64_t* L = lens.data();
  const uint8_t* M = has_mask ? mask.data() : nullptr;
  float* O = out.mutable_data();
  const int64_t G = Hq / Hkv;
  specrt::check_paged_plan("tree_attention_cpu", BT, maxb, NB, P, L, B, T, bs);
  if (bf16) specrt::require_amx_attention("tree_attention_cpu", D);
  py::gil_scoped_release nogil;
  if (bf16)
    specrt::tree_attention_amx_raw(Q, C, BT, maxb, P, L, M, O, B, T, Hq, Hkv, D, bs, scale, threads);
  else
    specrt::tree_attention_raw(Q, C, BT, maxb, P, L, M, O, B, T, Hq, Hkv, D, bs, scale, threads);
}

}  // namespace

namespace specrt {
void check_paged_plan(const char* op, const int32_t* BT, int64_t maxb, int64_t NB,
                      const int64_t* P, const int64_t* L, int64_t B, int64_t T, int64_t bs) {
  const std::string name(op);
  for (int64_t b = 0; b < B; ++b) {
    if (P[b] < 0 || L[b] < 0 || L[b] > T)
      throw std::invalid_argument(name + ": bad prefix_lens / tree_lens");
    const int64_t need = (P[b] + L[b] + bs - 1) / bs;
    if (need > maxb)
      throw std::out_of_range(name + ": sequence " + std::to_string(b) + " needs " +
                              std::to_string(need) + " blocks, its table has " +
                              std::to_string(maxb));
    for (int64_t i = 0; i < need; ++i)
      if (BT[b * maxb + i] < 0 || BT[b * maxb + i] >= NB)
        throw std::out_of_range(name + ": block id out of range");
  }
}

// The kernel without checks (tree_attention_cpu validates; decoder_cpu.cpp calls this
// directly with a forward's plan).
void tree_attention_raw(const float* Q, const float* C, const int32_t* BT, int64_t maxb,
                        const int64_t* P, const int64_t* L, const uint8_t* M, float* O,
                        int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                        double scale, int threads) {
  const float sc = static_cast<float>(scale);
  const bool has_mask = M != nullptr;
  const int64_t G = Hq / Hkv;
  if (ItemFn fn = avx512_item_for(D)) {
    const Ctx c{Q, C, BT, P, L, M, O, T, Hq, Hkv, G, bs, maxb, sc};
    // queries per item: at most QB; a step with few (sequence, KV head) pairs (a decode
    // step, a small tree: 3 pairs for SmolLM2) splits each pair's queries so that every
    // thread gets an even share (a query's result does not depend on its item)
    const int64_t nq = T * G, pairs = B * Hkv;
    int64_t nqb = (nq + QB - 1) / QB;
    if (threads > 1 && pairs * nqb < 2 * threads)
      nqb = std::min(nq, (2 * threads + pairs - 1) / pairs);
    const int64_t qbs = (nq + nqb - 1) / nqb;
    nqb = (nq + qbs - 1) / qbs;
    const int64_t items = pairs * nqb;
#pragma omp parallel num_threads(std::max(1, threads)) if (threads > 1 && items > 1)
    {
      std::vector<float, std::allocator<float>> ktv(D * CH + 16);
      float* kt = reinterpret_cast<float*>(
          (reinterpret_cast<uintptr_t>(ktv.data()) + 63) & ~uintptr_t(63));
#pragma omp for schedule(dynamic, 1)
      for (int64_t w = 0; w < items; ++w) {
        const int64_t b = w / (Hkv * nqb), h = (w / nqb) % Hkv, qb = w % nqb;
        fn(c, b, h, qb * qbs, std::min<int64_t>(nq, (qb + 1) * qbs), kt);
      }
    }
    return;
  }
  const Ctx c{Q, C, BT, P, L, M, O, T, Hq, Hkv, G, bs, maxb, sc};
  const int64_t work = B * Hkv;
  const bool par = threads > 1 && work > 1;
#pragma omp parallel num_threads(std::max(1, threads)) if (par)
  {
    const int64_t nq = T * G;
    std::vector<float> m(nq), l(nq), acc(nq * D), s(nq * GCH);
    std::vector<const float*> vrow(GCH);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w)
      generic_item(c, D, w / Hkv, w % Hkv, m.data(), l.data(), acc.data(), s.data(), vrow.data());
  }
}

}  // namespace specrt

void bind_attention(py::module_& m) {
  m.def("tree_attention_cpu", &tree_attention_cpu,
        "tree attention over a paged cache without gathering K/V (CPU, fp32; bf16=True: "
        "bf16 products on AMX tiles)", py::arg("q"),
        py::arg("cache"), py::arg("block_tables"), py::arg("prefix_lens"), py::arg("mask"),
        py::arg("tree_lens"), py::arg("scale"), py::arg("out"), py::arg("threads"),
        py::arg("bf16") = false);
  m.def("amx_attention_usable", &specrt::amx_attention_usable,
        "whether tree_attention_cpu(bf16=True) runs here: AMX tiles, AVX512-BF16, head dim "
        "32, 64 or 128", py::arg("head_dim"));
}
