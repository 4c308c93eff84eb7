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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

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

using f32 = py::array_t<float, py::array::c_style>;
using i32 = py::array_t<int32_t, py::array::c_style>;
using i64 = py::array_t<int64_t, py::array::c_style>;
using u8 = py::array_t<uint8_t, py::array::c_style>;

// q, out [B, T, Hq, D]; cache [NB, 2, bs, Hkv, D]; bt [B, maxb]; prefix, lens [B];
// mask [B, T, T] (uint8) or an empty array for causal.
void tree_attention_cpu(f32 q, f32 cache, i32 bt, i64 prefix, u8 mask, i64 lens, double scale,
                        f32 out, int threads) {
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
  // validate block ids and lengths before any work (an error leaves out untouched)
  for (int64_t b = 0; b < B; ++b) {
    if (P[b] < 0 || L[b] < 0 || L[b] > T)
      throw std::invalid_argument("tree_attention_cpu: bad prefix_lens / tree_lens");
    const int64_t need = (P[b] + L[b] + bs - 1) / bs;
    if (need > maxb)
      throw std::out_of_range("tree_attention_cpu: sequence " + std::to_string(b) +
                              " needs " + std::to_string(need) + " blocks, its table has " +
                              std::to_string(maxb));
    for (int64_t i = 0; i < need; ++i)
      if (BT[b * maxb + i] < 0 || BT[b * maxb + i] >= NB)
        throw std::out_of_range("tree_attention_cpu: block id out of range");
  }
  const float sc = static_cast<float>(scale);
  py::gil_scoped_release nogil;
  const int64_t work = B * Hkv;
  const bool par = threads > 1 && work > 1;
#pragma omp parallel num_threads(std::max(1, threads)) if (par)
  {
    // per query: running max, running sum, accumulator [D]; scores of one chunk of keys
    constexpr int64_t CH = 64;
    const int64_t nq = T * G;
    std::vector<float> m(nq), l(nq), acc(nq * D), s(nq * CH);
    std::vector<const float*> vrow(CH);
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t b = w / Hkv, h = w % Hkv;
      const int64_t pre = P[b], tl = L[b], nql = tl * G;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* qb = Q + (b * T * Hq + h * G) * D;  // query (t, g) at qb + (t Hq + g) D
      for (int64_t c0 = 0; c0 < pre + tl; c0 += CH) {
        const int64_t n = std::min(CH, pre + tl - c0);
        // scores of every query against the chunk's keys (-inf where not visible)
        for (int64_t x = 0; x < n; ++x) {
          const int64_t pos = c0 + x, j = pos - pre;
          const int64_t blk = BT[b * maxb + pos / bs], off = pos % bs;
          const float* k = C + (((blk * 2 + 0) * bs + off) * Hkv + h) * D;
          vrow[x] = C + (((blk * 2 + 1) * bs + off) * Hkv + h) * D;
          for (int64_t t = 0; t < tl; ++t) {
            const bool vis = j < 0 || (has_mask ? M[(b * T + t) * T + j] != 0 : j <= t);
            for (int64_t g = 0; g < G; ++g)
              s[(t * G + g) * CH + x] =
                  vis ? dot(qb + (t * Hq + g) * D, k, D) * sc
                      : -std::numeric_limits<float>::infinity();
          }
        }
        // online softmax over the chunk, one rescale per query
        for (int64_t qi = 0; qi < nql; ++qi) {
          float* sr = s.data() + qi * CH;
          float mc = m[qi];
          for (int64_t x = 0; x < n; ++x) mc = std::max(mc, sr[x]);
          if (mc == -std::numeric_limits<float>::infinity()) continue;  // nothing visible yet
          float* a = acc.data() + qi * D;
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
          float* o = O + ((b * T + t) * Hq + h * G + g) * D;
          const int64_t qi = t * G + g;
          if (t >= tl || l[qi] == 0.f) {
            std::memset(o, 0, sizeof(float) * D);
          } else {
            const float inv = 1.f / l[qi];
            const float* a = acc.data() + qi * D;
            for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
          }
        }
    }
  }
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("tree_attention_cpu", &tree_attention_cpu,
        "fp32 tree attention over a paged cache without gathering K/V (CPU)", py::arg("q"),
        py::arg("cache"), py::arg("block_tables"), py::arg("prefix_lens"), py::arg("mask"),
        py::arg("tree_lens"), py::arg("scale"), py::arg("out"), py::arg("threads"));
}
