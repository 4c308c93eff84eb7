// The decoder layers of a Llama-family model in one call (CPU, fp32 activations; weights
// streamed as fp32 or bf16): per layer
//   h = rmsnorm(x) ; q, k, v = h @ Wqkv^T (+ b) ; rope(q, k) ; k, v -> paged cache
//   x += attention(q, cache) @ Wo^T
//   h = rmsnorm(x) ; g, u = h @ Wgu^T ; x += (silu(g) * u) @ Wd^T
// with the skinny GEMM (gemm_cpu.cpp, gemm_bf16_cpu.cpp) and the tree attention kernel
// (attention_cpu.cpp; attention_amx.cpp with attn_bf16) called directly. It is the same
// arithmetic as specrt.model.llama's op-by-op path; what it removes is ~30 dispatched
// torch ops per layer (a third of a decode step's time at batch 1 on a 2-core CPU).
// Every row's result depends on that row (and the cache) only, never on how many other
// rows share the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace py = pybind11;

namespace {

using f32 = py::array_t<float, py::array::c_style>;
using i32 = py::array_t<int32_t, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;
using u8 = py::array_t<uint8_t, py::array::c_style>;

constexpr int64_t NR = 32;       // the packed weights' panel width (gemm_cpu.cpp)
constexpr int64_t ROWS = 512;    // GEMM row blocks that keep x and y in cache (prefill)
constexpr int64_t PAR_ROWS = 16; // elementwise work goes parallel from this many rows

// Weights of one layer, as the addresses of contiguous tensors held by Python: fp32, the
// four matrices packed as fp32 or (bf16 = true) bf16 panels.
struct LayerW {
  const float *attn_norm, *wqkv, *bqkv, *wo, *mlp_norm, *wgu, *wd;
};

// wp: fp32 panels [ceil(N/32), K, 32], or with bf16 the VNNI panels of gemm_bf16_cpu.cpp,
// or with x3 its bf16x3 panels (high and low parts of fp32 weights)
void gemm(const float* x, int64_t M, int64_t K, const float* wp, int64_t N, float* y,
          int threads, bool bf16, bool x3 = false) {
  for (int64_t m = 0; m < M; m += ROWS) {
    const int64_t rows = std::min(ROWS, M - m);
    if (x3)
      specrt::skinny_mm_bf16x3_raw(x + m * K, K, reinterpret_cast<const uint16_t*>(wp),
                                   y + m * N, N, rows, K, N, threads);
    else if (bf16)
      specrt::skinny_mm_bf16_raw(x + m * K, K, reinterpret_cast<const uint16_t*>(wp), y + m * N,
                                 N, rows, K, N, threads);
    else
      specrt::skinny_mm_raw(x + m * K, K, wp, y + m * N, N, rows, K, N, threads);
  }
}

// y = w * (x * rsqrt(mean(x^2) + eps)), as the torch path computes it
void rms_row(const float* __restrict x, const float* __restrict w, float* __restrict y,
             int64_t H, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < H; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = w[i] * (x[i] * r);
}

// rotate-half RoPE of one head: out = x * cos + rot(x) * sin, rot(x) = [-x2, x1]
void rope_head(const float* __restrict x, const float* __restrict c, const float* __restrict s,
               float* __restrict out, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i] * c[i], b = -x[i + h] * s[i];
    out[i] = a + b;
  }
  for (int64_t i = h; i < D; ++i) {
    const float a = x[i] * c[i], b = x[i - h] * s[i];
    out[i] = a + b;
  }
}

void silu_mul_scalar(const float* g, const float* u, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

__attribute__((target("avx512f"))) void silu_mul_avx512(const float* g, const float* u,
                                                        float* y, int64_t n) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 gv = _mm512_loadu_ps(g + i);
    const __m512 e = specrt::exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 sg = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_storeu_ps(y + i, _mm512_mul_ps(sg, _mm512_loadu_ps(u + i)));
  }
  silu_mul_scalar(g + i, u + i, y + i, n - i);  // the last n % width
}

__attribute__((target("avx2,fma"))) void silu_mul_avx2(const float* g, const float* u, float* y,
                                                      int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = specrt::exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    const __m256 sg = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(sg, _mm256_loadu_ps(u + i)));
  }
  silu_mul_scalar(g + i, u + i, y + i, n - i);  // the last n % width
}

template <typename F>
void rows_loop(int64_t N, int threads, F&& f) {
  const bool par = threads > 1 && N >= PAR_ROWS;
#pragma omp parallel for schedule(static) num_threads(std::max(1, threads)) if (par)
  for (int64_t r = 0; r < N; ++r) f(r);
}

// x [N, H] (updated in place: the residual stream after the last layer, pre-norm);
// weights [L, 7] addresses (attn_norm [H], Wqkv packed, qkv bias [Nqkv] or 0, Wo packed,
// mlp_norm [H], Wgu packed, Wd packed); cos, sin [N, D]; kv [L, NB, 2, bs, Hkv, D];
// bt [B, maxb]; prefix, lens [B]; mask [B, T, T] or empty (causal); rows [N] = b T + t
// of each row (t < lens[b]); taps ascending layer ids, tapped [N, len(taps), H]; bf16:
// the weights are bf16 panels; x3: bf16x3 panels of fp32 weights; attn_bf16: attention's
// products on AMX tiles.
void decoder_layers_cpu(f32 x, i64 weights, int64_t Hq, int64_t Hkv, int64_t I, f32 cos,
                        f32 sin, f32 kv, i32 bt, i64 prefix, u8 mask, i64 lens, i64 rows,
                        int64_t T, double eps, double scale, i64 taps, f32 tapped,
                        int threads, bool bf16, bool attn_bf16, bool x3) {
  if (bf16 && x3) throw std::invalid_argument("decoder_layers_cpu: bf16 and x3 exclude each other");
  if (x.ndim() != 2 || weights.ndim() != 2 || weights.shape(1) != 7 || cos.ndim() != 2 ||
      sin.ndim() != 2 || kv.ndim() != 6 || kv.shape(2) != 2 || bt.ndim() != 2)
    throw std::invalid_argument("decoder_layers_cpu: bad ranks");
  const int64_t N = x.shape(0), H = x.shape(1), L = weights.shape(0), D = cos.shape(1);
  const int64_t NB = kv.shape(1), bs = kv.shape(3), B = bt.shape(0), maxb = bt.shape(1);
  if (kv.shape(0) != L || kv.shape(4) != Hkv || kv.shape(5) != D || Hq % Hkv || D % 2 ||
      cos.shape(0) != N || sin.shape(0) != N || sin.shape(1) != D || rows.size() != N ||
      prefix.size() != B || lens.size() != B || T <= 0)
    throw std::invalid_argument("decoder_layers_cpu: shapes do not agree");
  const bool has_mask = mask.size() > 0;
  if (has_mask && (mask.ndim() != 3 || mask.shape(0) != B || mask.shape(1) != T ||
                   mask.shape(2) != T))
    throw std::invalid_argument("decoder_layers_cpu: mask must be [B, T, T]");
  const int64_t ntap = taps.size();
  if (tapped.ndim() != 3 || tapped.shape(0) != (ntap ? N : 0) || tapped.shape(1) != ntap ||
      tapped.shape(2) != (ntap ? H : 0))
    if (ntap || tapped.size() != 0)
      throw std::invalid_argument("decoder_layers_cpu: tapped must be [N, len(taps), H]");
  const int64_t* TP = taps.data();
  for (int64_t j = 0; j < ntap; ++j)
    if (TP[j] < 0 || TP[j] >= L || (j && TP[j] <= TP[j - 1]))
      throw std::invalid_argument("decoder_layers_cpu: taps must be ascending layer ids");
  const int32_t* BT = bt.data();
  const int64_t *P = prefix.data(), *LN = lens.data(), *R = rows.data();
  specrt::check_paged_plan("decoder_layers_cpu", BT, maxb, NB, P, LN, B, T, bs);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t b = R[r] / T, t = R[r] % T;
    if (R[r] < 0 || b >= B || t >= LN[b])
      throw std::invalid_argument("decoder_layers_cpu: a row outside its sequence's tree");
  }
  std::vector<LayerW> W(L);
  const int64_t* WA = weights.data();
  for (int64_t l = 0; l < L; ++l) {
    auto p = [&](int j) { return reinterpret_cast<const float*>(WA[l * 7 + j]); };
    W[l] = {p(0), p(1), p(2), p(3), p(4), p(5), p(6)};
    if (!W[l].attn_norm || !W[l].wqkv || !W[l].wo || !W[l].mlp_norm || !W[l].wgu || !W[l].wd)
      throw std::invalid_argument("decoder_layers_cpu: a null weight");
  }
  float* X = x.mutable_data();
  const float *CS = cos.data(), *SN = sin.data();
  float* KV = kv.mutable_data();
  const uint8_t* M = has_mask ? mask.data() : nullptr;
  float* TAP = ntap ? tapped.mutable_data() : nullptr;
  const int64_t qd = Hq * D, kvd = Hkv * D, nqkv = qd + 2 * kvd;
  const float feps = static_cast<float>(eps);
  // rows in [B, T] order without padding: attention reads and writes them in place
  bool dense = N == B * T;
  for (int64_t r = 0; dense && r < N; ++r) dense = R[r] == r;
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (attn_bf16) specrt::require_amx_attention("decoder_layers_cpu", D);

  py::gil_scoped_release nogil;
  std::vector<float> h(N * H), qkv(N * nqkv), tmp(N * H), gu(N * 2 * I), act(N * I);
  std::vector<float> qb(B * T * qd, 0.f), ob(B * T * qd), orow(dense ? 0 : N * qd);
  const int64_t layer_kv = NB * 2 * bs * kvd;
  int64_t tap_j = 0;
  for (int64_t l = 0; l < L; ++l) {
    const LayerW& w = W[l];
    float* cache = KV + l * layer_kv;
    rows_loop(N, threads, [&](int64_t r) {
      rms_row(X + r * H, w.attn_norm, h.data() + r * H, H, feps);
    });
    gemm(h.data(), N, H, w.wqkv, nqkv, qkv.data(), threads, bf16, x3);
    rows_loop(N, threads, [&](int64_t r) {
      float* row = qkv.data() + r * nqkv;
      if (w.bqkv)
        for (int64_t i = 0; i < nqkv; ++i) row[i] += w.bqkv[i];
      const int64_t b = R[r] / T, t = R[r] % T, pos = P[b] + t;
      const int64_t blk = BT[b * maxb + pos / bs], off = pos % bs;
      const float *c = CS + r * D, *s = SN + r * D;
      for (int64_t hq = 0; hq < Hq; ++hq)
        rope_head(row + hq * D, c, s, qb.data() + R[r] * qd + hq * D, D);
      float* kdst = cache + ((blk * 2 + 0) * bs + off) * kvd;
      float* vdst = cache + ((blk * 2 + 1) * bs + off) * kvd;
      for (int64_t hk = 0; hk < Hkv; ++hk) rope_head(row + qd + hk * D, c, s, kdst + hk * D, D);
      std::memcpy(vdst, row + qd + kvd, sizeof(float) * kvd);
    });
    (attn_bf16 ? specrt::tree_attention_amx_raw : specrt::tree_attention_raw)(
        qb.data(), cache, BT, maxb, P, LN, M, ob.data(), B, T, Hq, Hkv, D, bs, scale, threads);
    const float* o = ob.data();
    if (!dense) {
      for (int64_t r = 0; r < N; ++r)
        std::memcpy(orow.data() + r * qd, ob.data() + R[r] * qd, sizeof(float) * qd);
      o = orow.data();
    }
    gemm(o, N, qd, w.wo, H, tmp.data(), threads, bf16, x3);
    rows_loop(N, threads, [&](int64_t r) {
      float* xr = X + r * H;
      const float* tr = tmp.data() + r * H;
      for (int64_t i = 0; i < H; ++i) xr[i] += tr[i];
      rms_row(xr, w.mlp_norm, h.data() + r * H, H, feps);
    });
    gemm(h.data(), N, H, w.wgu, 2 * I, gu.data(), threads, bf16, x3);
    rows_loop(N, threads, [&](int64_t r) {
      const float* g = gu.data() + r * 2 * I;
      if (avx512)
        silu_mul_avx512(g, g + I, act.data() + r * I, I);
      else if (avx2)
        silu_mul_avx2(g, g + I, act.data() + r * I, I);
      else
        silu_mul_scalar(g, g + I, act.data() + r * I, I);
    });
    gemm(act.data(), N, I, w.wd, H, tmp.data(), threads, bf16, x3);
    rows_loop(N, threads, [&](int64_t r) {
      float* xr = X + r * H;
      const float* tr = tmp.data() + r * H;
      for (int64_t i = 0; i < H; ++i) xr[i] += tr[i];
      if (tap_j < ntap && TP[tap_j] == l)
        std::memcpy(TAP + (r * ntap + tap_j) * H, xr, sizeof(float) * H);
    });
    if (tap_j < ntap && TP[tap_j] == l) ++tap_j;
  }
}

}  // namespace

void bind_decoder(py::module_& m) {
  m.def("decoder_layers_cpu", &decoder_layers_cpu,
        "every decoder layer of a Llama-family model in one call (fp32, CPU): x updated in "
        "place, K/V written to the paged cache",
        py::arg("x").noconvert(), py::arg("weights"), py::arg("Hq"), py::arg("Hkv"), py::arg("I"),
        py::arg("cos"), py::arg("sin"), py::arg("kv").noconvert(), py::arg("bt"), py::arg("prefix"),
        py::arg("mask"), py::arg("lens"), py::arg("rows"), py::arg("T"), py::arg("eps"),
        py::arg("scale"), py::arg("taps"), py::arg("tapped").noconvert(), py::arg("threads"), py::arg("bf16") = false,
        py::arg("attn_bf16") = false, py::arg("x3") = false);
}
