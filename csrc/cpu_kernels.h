// The CPU kernels' raw entry points, shared between the op files (no checks: the
// pybind11 wrappers and decoder_cpu.cpp validate before calling).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace specrt {

// y[M, N] (row stride ldy) = x[M, K] (row stride ldx) @ W^T, W packed as [ceil(N/32), K, 32]
// (gemm_cpu.cpp). The best SIMD path of this CPU; OpenMP over output panels.
void skinny_mm_raw(const float* x, int64_t ldx, const float* wp, float* y, int64_t ldy,
                   int64_t M, int64_t K, int64_t N, int threads);

// The same product from bf16 weights packed as VNNI panels [ceil(N/32), ceil(K/32), 16, 2, 32]
// (gemm_bf16_cpu.cpp): x rounded to bf16, fp32 accumulation and y. AMX, AVX-512 BF16,
// AVX-512F or scalar, the best this CPU has.
void skinny_mm_bf16_raw(const float* x, int64_t ldx, const uint16_t* wq, float* y, int64_t ldy,
                        int64_t M, int64_t K, int64_t N, int threads);

// bf16x3 from fp32 weights packed as high and low bf16 parts [ceil(N/32), ceil(K/32), 2, 16,
// 2, 32] (gemm_bf16_cpu.cpp): y = xh Wh + xh Wl + xl Wh, fp32 accumulation.
void skinny_mm_bf16x3_raw(const float* x, int64_t ldx, const uint16_t* wq, float* y,
                          int64_t ldy, int64_t M, int64_t K, int64_t N, int threads);
// Whether this CPU and OS let a thread use AMX tiles (gemm_bf16_cpu.cpp; asks Linux for
// the tile state once per process).
bool amx_tiles_usable();
// This thread's tile configuration: all 8 tiles 16 rows of 64 bytes (on: before the
// first tile instruction; off: releases the tile state).
void amx_tiles_on();
void amx_tiles_off();

// Tree attention with bf16 products on AMX tiles (attention_amx.cpp), the arguments of
// tree_attention_raw; only where amx_attention_usable(D) (AMX, AVX512-BF16, D 32 / 64 / 128).
bool amx_attention_usable(int64_t D);
// Throws std::invalid_argument naming ``op`` unless amx_attention_usable(D).
void require_amx_attention(const char* op, int64_t D);
void tree_attention_amx_raw(const float* Q, const float* C, const int32_t* BT, int64_t maxb,
                            const int64_t* P, const int64_t* L, const uint8_t* M, float* O,
                            int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t bs, double scale, int threads);

// Tree attention over the paged cache (attention_cpu.cpp): Q, O [B, T, Hq, D], cache
// [NB, 2, bs, Hkv, D], BT [B, maxb], P / L [B] prefix and tree lengths, M [B, T, T] or
// nullptr (causal).
void tree_attention_raw(const float* Q, const float* C, const int32_t* BT, int64_t maxb,
                        const int64_t* P, const int64_t* L, const uint8_t* M, float* O,
                        int64_t B, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                        double scale, int threads);

// Checks a paged plan before any work, so that an error leaves outputs and the cache
// untouched: per sequence 0 <= L[b] <= T, P[b] >= 0, enough table entries for
// P[b] + L[b] positions, block ids in [0, NB). Throws naming ``op`` (attention_cpu.cpp).
void check_paged_plan(const char* op, const int32_t* BT, int64_t maxb, int64_t NB,
                      const int64_t* P, const int64_t* L, int64_t B, int64_t T, int64_t bs);

// e^x on 16 lanes (AVX-512F).
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  // e^x (Cephes expf: x = n ln2 + r, e^r by a degree-6 polynomial, 2^n by scalef);
  // x below -87 (and -inf) gives 0
  const __m512 lo = _mm512_set1_ps(-87.f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// e^x on 8 lanes (AVX2+FMA): the same Cephes polynomial, 2^n built in the exponent
// bits; x below -87 (and -inf) gives 0, x above 88 is clamped.
__attribute__((target("avx2,fma"))) inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.f));
  // 2^n for n in [-126, 127]: (n + 127) << 23 as the bits of a float
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

}  // namespace specrt
