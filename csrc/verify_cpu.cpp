// CPU rejection sampling over draft trees (verify_tree / chain_verify).
//
// One call verifies B independent draft trees. Python (specrt/ops/verify.py) validates
// shapes and values, draws the uniform random numbers from the caller's
// torch.Generator, and passes numpy views; this file only runs the algorithm.
//
// Per batch row b (n = tree_lens[b] valid nodes, node 0 = root):
//   node = 0; path = [0]
//   repeat:
//     visit the children c of `node` (parents[c] == node, c < n) in index order
//       greedy:        accept the first c with tokens[c] == argmax P[node]
//       sampled:       accept c iff u[c] * q_c(x_c) * Z < r(x_c), r the (unnormalised)
//                      residual, Z its mass (r = P[node], Z = 1 at first); on rejection
//                      r <- max(r / Z - q_c, 0), Z <- sum r   (SpecInfer recursive rejection)
//       deterministic: (q_c = one-hot(x_c)) accept c iff u[c] * Z < r(x_c) with
//                      r = P[node] minus the tokens of already rejected siblings,
//                      Z = its mass; on rejection remove x_c from r (a sibling that
//                      repeats a rejected token is rejected without a draw)
//     if a child is accepted: path += [c], node = c (residual reset to P[c])
//   next_token: greedy -> argmax P[node]; otherwise inverse-CDF sample with u[0]
//   from the final residual r (mass recomputed; if it vanished numerically, from P[node]).
//
// Random numbers: u is [B, T] fp32 in [0, 1). u[b, c] (c >= 1) is used only for the
// acceptance test of node c (every node is tested at most once), u[b, 0] only for
// next_token. Greedy mode reads none of them.
//
// Probabilities may be fp32, fp16 or bf16 (dtype code 0, 1, 2; half types arrive as
// uint16 views) and are converted element by element: no fp32 copy of the inputs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

using i64arr = py::array_t<int64_t, py::array::c_style>;
using f32arr = py::array_t<float, py::array::c_style>;

enum Mode : int64_t { kGreedy = 0, kSampled = 1, kDeterministic = 2 };

struct F32 {
  using E = float;
  static float ld(const E* p, int64_t i) { return p[i]; }
};
struct F16 {
  using E = uint16_t;
  static float ld(const E* p, int64_t i) {
    uint16_t h = p[i];
    uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, f;
    if (exp == 0) {
      if (man == 0) {
        f = sign;
      } else {  // subnormal: renormalise
        exp = 113;
        while (!(man & 0x400u)) {
          man <<= 1;
          --exp;
        }
        f = sign | (exp << 23) | ((man & 0x3ffu) << 13);
      }
    } else if (exp == 31) {
      f = sign | 0x7f800000u | (man << 13);
    } else {
      f = sign | ((exp + 112) << 23) | (man << 13);
    }
    float out;
    std::memcpy(&out, &f, 4);
    return out;
  }
};
struct BF16 {
  using E = uint16_t;
  static float ld(const E* p, int64_t i) {
    uint32_t f = uint32_t(p[i]) << 16;
    float out;
    std::memcpy(&out, &f, 4);
    return out;
  }
};

template <class L>
int64_t argmax_row(const typename L::E* row, int64_t V) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t idx = 0;
  for (int64_t v = 0; v < V; ++v) {
    float x = L::ld(row, v);
    if (x > best) {
      best = x;
      idx = v;
    }
  }
  return idx;
}

// Inverse-CDF draw from the non-negative vector w[0..V) with uniform u: the first v with
// w[v] > 0 and cumsum(w)[v] > u * sum(w). Returns -1 when w has no mass.
int64_t sample_vec(const float* w, int64_t V, float u) {
  double Z = 0.0;
  for (int64_t v = 0; v < V; ++v) Z += w[v];
  if (!(Z > 0.0)) return -1;
  const double target = double(u) * Z;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t v = 0; v < V; ++v) {
    if (w[v] > 0.f) {
      cum += w[v];
      last = v;
      if (cum > target) return v;
    }
  }
  return last;  // rounding: u * Z landed beyond the summed mass
}

template <class L>
void verify_row(const typename L::E* P, const typename L::E* Q, int64_t T, int64_t V,
                int64_t q_shift, const int64_t* tok, const int64_t* par, int64_t n,
                const float* u, int64_t mode, float* ws, std::vector<int64_t>& excl,
                int64_t* path, int64_t* plen, int64_t* next) {
  n = std::min(std::max<int64_t>(n, 1), T);
  path[0] = 0;
  for (int64_t i = 1; i < T; ++i) path[i] = -1;
  int64_t node = 0, pl = 1;
  for (;;) {
    const typename L::E* row = P + node * V;
    bool has_ws = false;  // residual lives in ws (sampled mode, after a rejection)
    float Z = 1.f;        // mass of the current residual
    excl.clear();
    const int64_t am = mode == kGreedy ? argmax_row<L>(row, V) : -1;
    int64_t acc = -1;
    for (int64_t c = node + 1; c < n && acc < 0; ++c) {
      if (par[c] != node) continue;
      const int64_t x = tok[c];
      if (x < 0 || x >= V) continue;  // cannot match (Python rejects such input)
      if (mode == kGreedy) {
        if (x == am) acc = c;
        continue;
      }
      const float uc = u[c];
      if (mode == kSampled) {
        const typename L::E* q = Q + (c - q_shift) * V;
        const float qx = L::ld(q, x), px = has_ws ? ws[x] : L::ld(row, x);
        if (uc * qx * Z < px) {
          acc = c;
          continue;
        }
        if (!(Z > 0.f)) continue;  // residual vanished numerically: stays empty
        double s = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          float r = (has_ws ? ws[v] : L::ld(row, v)) / Z - L::ld(q, v);
          r = r > 0.f ? r : 0.f;
          ws[v] = r;
          s += r;
        }
        Z = float(s);
        has_ws = true;
      } else {  // deterministic children
        if (std::find(excl.begin(), excl.end(), x) != excl.end()) continue;
        const float px = L::ld(row, x);
        if (uc * Z < px) {
          acc = c;
          continue;
        }
        excl.push_back(x);
        Z -= px;
      }
    }
    if (acc >= 0) {
      path[pl++] = acc;
      node = acc;
      continue;
    }
    if (mode == kGreedy) {
      *next = am;
    } else {
      if (!has_ws) {
        for (int64_t v = 0; v < V; ++v) ws[v] = L::ld(row, v);
        for (int64_t x : excl) ws[x] = 0.f;
      }
      int64_t t = sample_vec(ws, V, u[0]);
      if (t < 0) {  // residual without mass (rounding): fall back to the target row
        for (int64_t v = 0; v < V; ++v) ws[v] = L::ld(row, v);
        t = sample_vec(ws, V, u[0]);
        if (t < 0) t = argmax_row<L>(row, V);
      }
      *next = t;
    }
    break;
  }
  *plen = pl;
}

template <class L>
void verify_all(const py::array& target, const py::array& draft, const i64arr& tokens,
                const i64arr& parents, const i64arr& lens, const f32arr& uniforms, int64_t mode,
                int64_t q_shift, i64arr& path, i64arr& plen, i64arr& next) {
  const int64_t B = target.shape(0), T = target.shape(1), V = target.shape(2);
  const int64_t Tq = draft.ndim() == 3 ? draft.shape(1) : 0;
  if (mode == kSampled && (draft.ndim() != 3 || draft.shape(0) != B || draft.shape(2) != V ||
                           Tq + q_shift < T))
    throw std::invalid_argument("draft_probs shape does not match target_probs");
  const auto* P = static_cast<const typename L::E*>(target.data());
  const auto* Q = mode == kSampled ? static_cast<const typename L::E*>(draft.data()) : nullptr;
  const int64_t* tk = tokens.data();
  const int64_t* pr = parents.data();
  const int64_t* ln = lens.data();
  const float* U = uniforms.data();
  const int64_t u_stride = uniforms.ndim() == 2 && uniforms.shape(1) >= T ? uniforms.shape(1) : 0;
  if (mode != kGreedy && (uniforms.ndim() != 2 || uniforms.shape(0) != B || u_stride < T))
    throw std::invalid_argument("uniforms must be [B, T] fp32");
  int64_t* pa = path.mutable_data();
  int64_t* pl = plen.mutable_data();
  int64_t* nx = next.mutable_data();
  py::gil_scoped_release nogil;
#pragma omp parallel if (B > 1)
  {
    std::vector<float> ws(mode == kGreedy ? 0 : V);
    std::vector<int64_t> excl;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      verify_row<L>(P + b * T * V, Q ? Q + b * Tq * V : nullptr, T, V, q_shift, tk + b * T,
                    pr + b * T, ln[b], mode == kGreedy ? nullptr : U + b * u_stride, mode,
                    ws.data(), excl, pa + b * T, pl + b, nx + b);
    }
  }
}

void verify_tree_cpu(py::array target, py::array draft, int64_t dtype_code, i64arr tokens,
                     i64arr parents, i64arr lens, f32arr uniforms, int64_t mode, int64_t q_shift,
                     i64arr path, i64arr path_lens, i64arr next_token) {
  if (target.ndim() != 3) throw std::invalid_argument("target_probs must be [B, T, V]");
  const int64_t B = target.shape(0), T = target.shape(1);
  if (tokens.ndim() != 2 || tokens.shape(0) != B || tokens.shape(1) != T ||
      parents.ndim() != 2 || parents.shape(0) != B || parents.shape(1) != T ||
      lens.ndim() != 1 || lens.shape(0) != B || path.ndim() != 2 || path.shape(0) != B ||
      path.shape(1) != T || path_lens.shape(0) != B || next_token.shape(0) != B)
    throw std::invalid_argument("verify_tree_cpu: shape mismatch");
  if (mode < kGreedy || mode > kDeterministic) throw std::invalid_argument("bad mode");
  const auto need = [&](const py::array& a, size_t item) {
    if (a.itemsize() != static_cast<py::ssize_t>(item) ||
        !(a.flags() & py::array::c_style))
      throw std::invalid_argument("probabilities must be contiguous and match dtype_code");
  };
  switch (dtype_code) {
    case 0:
      need(target, 4);
      if (mode == kSampled) need(draft, 4);
      verify_all<F32>(target, draft, tokens, parents, lens, uniforms, mode, q_shift, path,
                      path_lens, next_token);
      break;
    case 1:
      need(target, 2);
      if (mode == kSampled) need(draft, 2);
      verify_all<F16>(target, draft, tokens, parents, lens, uniforms, mode, q_shift, path,
                      path_lens, next_token);
      break;
    case 2:
      need(target, 2);
      if (mode == kSampled) need(draft, 2);
      verify_all<BF16>(target, draft, tokens, parents, lens, uniforms, mode, q_shift, path,
                       path_lens, next_token);
      break;
    default:
      throw std::invalid_argument("dtype_code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  }
}

}  // namespace

void bind_verify(py::module_& m) {
  m.def("verify_tree", &verify_tree_cpu,
        "CPU verify_tree. target [B,T,V] and draft [B,Tq,V] (node j's q is draft row "
        "j - q_shift) as fp32 or uint16 views of fp16/bf16 (dtype_code 0/1/2); tokens, "
        "parents [B,T] int64; lens [B] int64; uniforms [B,T] fp32; mode 0 greedy, 1 sampled "
        "children, 2 deterministic children; outputs path [B,T], path_lens [B], next [B] int64.",
        py::arg("target"), py::arg("draft"), py::arg("dtype_code"), py::arg("tokens"),
        py::arg("parents"), py::arg("lens"), py::arg("uniforms"), py::arg("mode"),
        py::arg("q_shift"), py::arg("path"), py::arg("path_lens"), py::arg("next_token"));
}
