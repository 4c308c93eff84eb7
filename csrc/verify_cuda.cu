// CUDA rejection sampling over draft trees: the algorithm of verify_cpu.cpp (read its
// header for the exact acceptance rules and which uniform each decision uses), one
// thread block per batch row.
//
// Every thread of a block runs the same scalar control flow (node, child loop, Z,
// acceptance tests read the same global values); the O(V) parts are block-wide:
//   * argmax (greedy) - strided loads, warp-shuffle + shared reduction, first index wins;
//   * residual update max(r / Z - q, 0) into the [B, V] fp32 workspace row of this batch
//     element, with a block sum for the new mass;
//   * the inverse-CDF draw of next_token: the row is cut into blockDim contiguous tiles;
//     each warp sums whole tiles (coalesced), the block scans the tile sums, the tile
//     holding u * Z is found by a block min-reduction and warp 0 scans inside it.
// No host synchronisation; launched on the caller's stream. Pointers arrive as integers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float ldf(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}

struct Shared {
  float red[kWarps];
  float tile[kThreads];
  float fval[kWarps];
  int64_t ival[kWarps];
  int64_t result;
};

// Sum over the block; every thread gets the same value (fixed order).
__device__ float block_sum(float v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < kWarps; ++w) t += sh.red[w];
  return t;
}

// Min / max of an int64 over the block; every thread gets the result.
__device__ int64_t block_min_i64(int64_t v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) {
    int64_t x = __shfl_xor_sync(kFull, v, o);
    v = x < v ? x : v;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sh.ival[threadIdx.x >> 5] = v;
  __syncthreads();
  int64_t t = sh.ival[0];
  for (int w = 1; w < kWarps; ++w) t = sh.ival[w] < t ? sh.ival[w] : t;
  return t;
}

__device__ int64_t block_max_i64(int64_t v, Shared& sh) {
  return -block_min_i64(-v, sh);
}

// First index of the maximum of row[0..V).
template <typename E>
__device__ int64_t block_argmax(const E* row, int64_t V, Shared& sh) {
  float best = -INFINITY;
  int64_t idx = INT64_MAX;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
    float x = ldf(row, v);
    if (x > best) {  // strided in increasing v: keeps the first max of this thread
      best = x;
      idx = v;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    float b2 = __shfl_xor_sync(kFull, best, o);
    int64_t i2 = __shfl_xor_sync(kFull, idx, o);
    if (b2 > best || (b2 == best && i2 < idx)) {
      best = b2;
      idx = i2;
    }
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    sh.fval[threadIdx.x >> 5] = best;
    sh.ival[threadIdx.x >> 5] = idx;
  }
  __syncthreads();
  best = sh.fval[0];
  idx = sh.ival[0];
  for (int w = 1; w < kWarps; ++w)
    if (sh.fval[w] > best || (sh.fval[w] == best && sh.ival[w] < idx)) {
      best = sh.fval[w];
      idx = sh.ival[w];
    }
  return idx == INT64_MAX ? 0 : idx;
}

// Value of the residual at v: workspace (sampled mode after a rejection) or the target
// row, minus excluded tokens (deterministic mode); `raw` ignores both.
template <typename E>
struct Resid {
  const E* row;
  const float* ws;
  const int64_t* excl;  // shared memory
  int nexcl;
  bool raw;
  __device__ float operator()(int64_t v) const {
    if (raw) return ldf(row, v);
    if (ws) return ws[v];
    float x = ldf(row, v);
    for (int i = 0; i < nexcl; ++i)
      if (excl[i] == v) return 0.f;
    return x;
  }
};

// Inverse-CDF draw from the residual: the first v with r(v) > 0 and cumsum > u * Z.
// Returns -1 when the residual has no mass.
template <typename E>
__device__ int64_t block_sample(const Resid<E>& r, int64_t V, float u, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t S = (V + kThreads - 1) / kThreads;  // tile length
  // 1. tile sums, one warp per tile (coalesced inside a tile)
  for (int k = warp; k < kThreads; k += kWarps) {
    float s = 0.f;
    const int64_t lo = k * S, hi = lo + S < V ? lo + S : V;
    for (int64_t v = lo + lane; v < hi; v += 32) {
      float x = r(v);
      s += x > 0.f ? x : 0.f;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
    if (lane == 0) sh.tile[k] = s;
  }
  __syncthreads();
  // 2. inclusive scan of the tile sums (thread t owns tile t)
  const float mine = sh.tile[threadIdx.x];
  float incl = mine;
  for (int o = 1; o < 32; o <<= 1) {
    float y = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) sh.red[warp] = incl;
  __syncthreads();
  float before = 0.f, Z = 0.f;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += sh.red[w];
    Z += sh.red[w];
  }
  incl += before;
  if (!(Z > 0.f)) return -1;
  const float target = u * Z;
  int64_t k = block_min_i64((incl > target && mine > 0.f) ? threadIdx.x : INT64_MAX, sh);
  if (k == INT64_MAX) k = block_max_i64(mine > 0.f ? threadIdx.x : -1, sh);  // rounding
  // 3. warp 0 scans tile k
  if (warp == 0) {
    float base = 0.f;
    for (int w = 0; w < k; ++w) base += sh.tile[w];  // same order for every lane
    const int64_t lo = k * S, hi = lo + S < V ? lo + S : V;
    int64_t found = -1, last = -1;
    for (int64_t v0 = lo; v0 < hi && found < 0; v0 += 32) {
      const int64_t v = v0 + lane;
      float x = v < hi ? r(v) : 0.f;
      x = x > 0.f ? x : 0.f;
      float c = x;
      for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_up_sync(kFull, c, o);
        if (lane >= o) c += y;
      }
      unsigned hit = __ballot_sync(kFull, x > 0.f && base + c > target);
      unsigned pos = __ballot_sync(kFull, x > 0.f);
      if (hit) found = v0 + __ffs(hit) - 1;
      if (pos) last = v0 + 31 - __clz(pos);
      base += __shfl_sync(kFull, c, 31);
    }
    if (lane == 0) sh.result = found >= 0 ? found : last;
  }
  __syncthreads();
  const int64_t res = sh.result;
  __syncthreads();
  return res;
}

template <typename E>
__global__ void __launch_bounds__(kThreads)
    verify_tree_kernel(const E* __restrict__ P, const E* __restrict__ Q,
                       const int64_t* __restrict__ tok, const int64_t* __restrict__ par,
                       const int64_t* __restrict__ lens, const float* __restrict__ U,
                       float* __restrict__ WS, int64_t* __restrict__ path,
                       int64_t* __restrict__ plen, int64_t* __restrict__ next, int64_t T,
                       int64_t V, int64_t Tq, int64_t q_shift, int mode) {
  extern __shared__ int64_t excl[];  // [T]: rejected sibling tokens (deterministic mode)
  __shared__ Shared sh;
  const int64_t b = blockIdx.x;
  const int64_t* tk = tok + b * T;
  const int64_t* pr = par + b * T;
  const float* u = U + b * T;
  float* ws = WS ? WS + b * V : nullptr;
  int64_t n = lens[b];
  n = n < 1 ? 1 : (n > T ? T : n);
  for (int64_t i = threadIdx.x; i < T; i += blockDim.x) path[b * T + i] = i == 0 ? 0 : -1;
  __syncthreads();
  int64_t node = 0, pl = 1;
  for (;;) {
    const E* row = P + (b * T + node) * V;
    bool has_ws = false;
    float Z = 1.f;
    int nexcl = 0;
    const int64_t am = mode == 0 ? block_argmax(row, V, sh) : -1;
    int64_t acc = -1;
    for (int64_t c = node + 1; c < n && acc < 0; ++c) {
      if (pr[c] != node) continue;
      const int64_t x = tk[c];
      if (x < 0 || x >= V) continue;
      if (mode == 0) {
        if (x == am) acc = c;
        continue;
      }
      const float uc = u[c];
      if (mode == 1) {
        const E* q = Q + (b * Tq + c - q_shift) * V;
        const float qx = ldf(q, x), px = has_ws ? ws[x] : ldf(row, x);
        if (uc * qx * Z < px) {
          acc = c;
          continue;
        }
        if (!(Z > 0.f)) continue;
        __syncthreads();  // everyone has read ws[x] before it is overwritten
        float s = 0.f;
        for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
          float r = (has_ws ? ws[v] : ldf(row, v)) / Z - ldf(q, v);
          r = r > 0.f ? r : 0.f;
          ws[v] = r;
          s += r;
        }
        Z = block_sum(s, sh);  // its barriers also publish the ws writes
        has_ws = true;
      } else {
        bool dup = false;
        for (int i = 0; i < nexcl; ++i) dup |= excl[i] == x;
        if (dup) continue;
        const float px = ldf(row, x);
        if (uc * Z < px) {
          acc = c;
          continue;
        }
        __syncthreads();
        if (threadIdx.x == 0) excl[nexcl] = x;
        __syncthreads();
        ++nexcl;
        Z -= px;
      }
    }
    if (acc >= 0) {
      if (threadIdx.x == 0) path[b * T + pl] = acc;
      ++pl;
      node = acc;
      continue;
    }
    int64_t t;
    if (mode == 0) {
      t = am;
    } else {
      Resid<E> r{row, has_ws ? ws : nullptr, excl, nexcl, false};
      t = block_sample(r, V, u[0], sh);
      if (t < 0) {
        r.raw = true;
        t = block_sample(r, V, u[0], sh);
        if (t < 0) t = block_argmax(row, V, sh);
      }
    }
    if (threadIdx.x == 0) {
      next[b] = t;
      plen[b] = pl;
    }
    break;
  }
}

void check(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA: ") + cudaGetErrorString(e));
}

// dtype_code 0 fp32, 1 fp16, 2 bf16. P [B, T, V], Q [B, Tq, V] (node j's q is row
// j - q_shift; may be 0 unless mode == 1), tok/par [B, T] int64, lens [B] int64,
// U [B, T] fp32 (may be 0 when mode == 0), WS [B, V] fp32 (mode 1 only), outputs
// path [B, T], plen [B], next [B] int64. mode 0 greedy, 1 sampled, 2 deterministic.
void verify_tree_cuda(uintptr_t P, uintptr_t Q, int64_t dtype_code, uintptr_t tok, uintptr_t par,
                      uintptr_t lens, uintptr_t U, uintptr_t WS, uintptr_t path, uintptr_t plen,
                      uintptr_t next, int64_t B, int64_t T, int64_t V, int64_t Tq,
                      int64_t q_shift, int64_t mode, uintptr_t stream) {
  if (B == 0) return;
  if (mode < 0 || mode > 2) throw std::invalid_argument("bad mode");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const size_t smem = sizeof(int64_t) * static_cast<size_t>(T);
  auto launch = [&](auto tag) {
    using E = decltype(tag);
    verify_tree_kernel<E><<<static_cast<unsigned>(B), kThreads, smem, s>>>(
        reinterpret_cast<const E*>(P), reinterpret_cast<const E*>(Q),
        reinterpret_cast<const int64_t*>(tok), reinterpret_cast<const int64_t*>(par),
        reinterpret_cast<const int64_t*>(lens), reinterpret_cast<const float*>(U),
        reinterpret_cast<float*>(WS), reinterpret_cast<int64_t*>(path),
        reinterpret_cast<int64_t*>(plen), reinterpret_cast<int64_t*>(next), T, V, Tq, q_shift,
        static_cast<int>(mode));
  };
  switch (dtype_code) {
    case 0: launch(float{}); break;
    case 1: launch(__half{}); break;
    case 2: launch(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("dtype_code must be 0, 1 or 2");
  }
  check(cudaGetLastError());
}

}  // namespace

void bind_verify_cuda(py::module_& m) {
  m.def("verify_tree_cuda", &verify_tree_cuda,
        "CUDA verify_tree over raw device pointers (see csrc/verify_cuda.cu)");
}
