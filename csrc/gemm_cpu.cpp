// CPU skinny GEMM: y[M, N] = x[M, K] @ W[N, K]^T for few rows M (decode, draft trees,
// small batches), fp32.
//
// W is packed once at load into column panels of NR = 32 outputs:
//   wp[p, k, j] = W[p * 32 + j, k]      (rows past N are zero)
// so that one panel is one contiguous stream. Each thread takes whole panels (OpenMP
// over output columns) and, for every tile of MR rows of x, keeps MR x 32 accumulators
// in registers: per k it loads the panel's 32 weights once and broadcasts one x value
// per row (outer-product form, no horizontal sums). The weights are streamed from
// memory once per call (later row tiles of the same panel read it from cache), which
// is the floor for M up to a few dozen rows.
//
// Paths: AVX-512F (MR = 8: 16 zmm accumulators), AVX2+FMA (MR = 3: 12 ymm
// accumulators), scalar; chosen at run time from what the CPU supports.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

// Unroll the row and column loops of a tile before GCC's scalar replacement runs. Left
// to its later complete unrolling, GCC 12 keeps the accumulator array in memory as well
// as in registers and stores every accumulator once per k step: one store per FMA,
// which capped every compute-bound call (trees, batches, prefill) at about half speed.
#define UNROLL _Pragma("GCC unroll 16")

namespace {

constexpr int NR = 32;
constexpr int64_t PF = 64;  // prefetch distance in k-steps (128 bytes each)

struct Args {
  const float* x;  // [M, ldx]
  int64_t ldx;
  const float* wp;  // [P, K, NR]
  float* y;         // [M, ldy]
  int64_t ldy;
  int64_t M, K, N;
};

// Store a tile's panel row: 32 values, or fewer for the last panel.
inline void store_row(float* dst, const float* src, int64_t ncols) {
  std::memcpy(dst, src, sizeof(float) * ncols);
}

template <int MR>
__attribute__((target("avx512f"))) void tile_avx512(const Args& a, int64_t p, int64_t m0) {
  const float* w = a.wp + p * a.K * NR;
  const int64_t K = a.K;
  __m512 acc[MR][2];
  UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const float* xr[MR];
  UNROLL for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.ldx;
  for (int64_t k = 0; k < K; ++k) {
    // the panel streams from memory once: fetch ~8 KB ahead (both lines of a k-step)
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NR + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w + k * NR);
    const __m512 w1 = _mm512_loadu_ps(w + k * NR + 16);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(xr[i][k]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
    }
  }
  const int64_t n0 = p * NR, ncols = std::min<int64_t>(NR, a.N - n0);
  UNROLL for (int i = 0; i < MR; ++i) {
    float* dst = a.y + (m0 + i) * a.ldy + n0;
    if (ncols == NR) {
      _mm512_storeu_ps(dst, acc[i][0]);
      _mm512_storeu_ps(dst + 16, acc[i][1]);
    } else {
      alignas(64) float buf[NR];
      _mm512_store_ps(buf, acc[i][0]);
      _mm512_store_ps(buf + 16, acc[i][1]);
      store_row(dst, buf, ncols);
    }
  }
}

template <int MR>
__attribute__((target("avx2,fma"))) void tile_avx2(const Args& a, int64_t p, int64_t m0) {
  const float* w = a.wp + p * a.K * NR;
  const int64_t K = a.K;
  const int64_t n0 = p * NR, ncols = std::min<int64_t>(NR, a.N - n0);
  __m256 acc[MR][4];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* xr[MR];
  UNROLL for (int i = 0; i < MR; ++i) xr[i] = a.x + (m0 + i) * a.ldx;
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + PF) * NR + 16), _MM_HINT_T0);
    __m256 wv[4];
    UNROLL for (int j = 0; j < 4; ++j) wv[j] = _mm256_loadu_ps(w + k * NR + 8 * j);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_broadcast_ss(xr[i] + k);
      UNROLL for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    alignas(32) float buf[NR];
    UNROLL for (int j = 0; j < 4; ++j) _mm256_store_ps(buf + 8 * j, acc[i][j]);
    store_row(a.y + (m0 + i) * a.ldy + n0, buf, ncols);
  }
}

// Few rows (M <= 2) on AVX2: two adjacent panels at once (two weight streams in flight
// per thread, the weights used straight from memory operands).
template <int MR>
__attribute__((target("avx2,fma"))) void tile2_avx2(const Args& a, int64_t p) {
  const float* wa = a.wp + p * a.K * NR;
  const float* wb = wa + a.K * NR;
  const int64_t K = a.K;
  __m256 acc[MR][8];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int j = 0; j < 8; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(wa + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wa + (k + PF) * NR + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + (k + PF) * NR + 16), _MM_HINT_T0);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_broadcast_ss(a.x + i * a.ldx + k);
      UNROLL for (int j = 0; j < 4; ++j) {
        acc[i][j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wa + k * NR + 8 * j), acc[i][j]);
        acc[i][4 + j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wb + k * NR + 8 * j), acc[i][4 + j]);
      }
    }
  }
  UNROLL for (int q = 0; q < 2; ++q) {
    const int64_t n0 = (p + q) * NR, ncols = std::min<int64_t>(NR, a.N - n0);
    UNROLL for (int i = 0; i < MR; ++i) {
      alignas(32) float buf[NR];
      UNROLL for (int j = 0; j < 4; ++j) _mm256_store_ps(buf + 8 * j, acc[i][4 * q + j]);
      store_row(a.y + i * a.ldy + n0, buf, ncols);
    }
  }
}

void tile_scalar(const Args& a, int64_t p, int64_t m0, int mr) {
  const float* w = a.wp + p * a.K * NR;
  const int64_t K = a.K;
  const int64_t n0 = p * NR, ncols = std::min<int64_t>(NR, a.N - n0);
  for (int i = 0; i < mr; ++i) {
    float acc[NR] = {0};
    const float* xr = a.x + (m0 + i) * a.ldx;
    for (int64_t k = 0; k < K; ++k)
      UNROLL for (int j = 0; j < NR; ++j) acc[j] += xr[k] * w[k * NR + j];
    store_row(a.y + (m0 + i) * a.ldy + n0, acc, ncols);
  }
}

void run_avx512(const Args& a, int64_t p) {
  int64_t m = 0;
  for (; m + 8 <= a.M; m += 8) tile_avx512<8>(a, p, m);
  switch (a.M - m) {
    case 7: tile_avx512<7>(a, p, m); break;
    case 6: tile_avx512<6>(a, p, m); break;
    case 5: tile_avx512<5>(a, p, m); break;
    case 4: tile_avx512<4>(a, p, m); break;
    case 3: tile_avx512<3>(a, p, m); break;
    case 2: tile_avx512<2>(a, p, m); break;
    case 1: tile_avx512<1>(a, p, m); break;
    default: break;
  }
}

// Few rows (M <= 4) are bound by the weight stream: two adjacent panels at once keep two
// streams in flight per thread.
template <int MR>
__attribute__((target("avx512f"))) void tile2_avx512(const Args& a, int64_t p) {
  const float* wa = a.wp + p * a.K * NR;
  const float* wb = wa + a.K * NR;
  const int64_t K = a.K;
  __m512 acc[MR][4];
  UNROLL for (int i = 0; i < MR; ++i)
    UNROLL for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(wa + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wa + (k + PF) * NR + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + (k + PF) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wb + (k + PF) * NR + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(wa + k * NR), w1 = _mm512_loadu_ps(wa + k * NR + 16);
    const __m512 w2 = _mm512_loadu_ps(wb + k * NR), w3 = _mm512_loadu_ps(wb + k * NR + 16);
    UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(a.x[i * a.ldx + k]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
    }
  }
  UNROLL for (int q = 0; q < 2; ++q) {
    const int64_t n0 = (p + q) * NR, ncols = std::min<int64_t>(NR, a.N - n0);
    UNROLL for (int i = 0; i < MR; ++i) {
      alignas(64) float buf[NR];
      _mm512_store_ps(buf, acc[i][2 * q]);
      _mm512_store_ps(buf + 16, acc[i][2 * q + 1]);
      store_row(a.y + i * a.ldy + n0, buf, ncols);
    }
  }
}

// Panels p and p + 1 (p even) for M <= 4; a last odd panel alone.
void run_avx512_pair(const Args& a, int64_t p) {
  if ((p + 1) * NR >= a.N) return run_avx512(a, p);
  switch (a.M) {
    case 4: tile2_avx512<4>(a, p); break;
    case 3: tile2_avx512<3>(a, p); break;
    case 2: tile2_avx512<2>(a, p); break;
    case 1: tile2_avx512<1>(a, p); break;
    default: run_avx512(a, p); run_avx512(a, p + 1); break;
  }
}

// Tiles of 3 rows; a remainder of 1 after at least one tile goes as 2 + 2 instead of
// 3 + 1 (a 1-row tile keeps too few FMAs in flight).
void run_avx2(const Args& a, int64_t p) {
  const int64_t threes = a.M % 3 == 1 && a.M > 1 ? a.M / 3 - 1 : a.M / 3;
  int64_t m = 0;
  for (int64_t i = 0; i < threes; ++i, m += 3) tile_avx2<3>(a, p, m);
  for (; m + 2 <= a.M; m += 2) tile_avx2<2>(a, p, m);
  if (m < a.M) tile_avx2<1>(a, p, m);
}

// Panels p and p + 1 (p even) for M <= 2 on AVX2; a last odd panel alone.
void run_avx2_pair(const Args& a, int64_t p) {
  if ((p + 1) * NR >= a.N) return run_avx2(a, p);
  switch (a.M) {
    case 2: tile2_avx2<2>(a, p); break;
    case 1: tile2_avx2<1>(a, p); break;
    default: run_avx2(a, p); run_avx2(a, p + 1); break;
  }
}

void run_scalar(const Args& a, int64_t p) {
  for (int64_t m = 0; m < a.M; m += 4) tile_scalar(a, p, m, static_cast<int>(std::min<int64_t>(4, a.M - m)));
}

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::scalar;
}

const char* isa_name(Isa i) {
  return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "scalar";
}

Isa parse_isa(const std::string& s) {
  Isa have = best_isa();
  if (s.empty() || s == "auto") return have;
  Isa want = s == "avx512" ? Isa::avx512 : s == "avx2" ? Isa::avx2 : s == "scalar" ? Isa::scalar
                                                                                      : Isa(-1);
  if (static_cast<int>(want) < 0)
    throw std::invalid_argument("isa must be auto, avx512, avx2 or scalar, got '" + s + "'");
  if (static_cast<int>(want) > static_cast<int>(have))
    throw std::invalid_argument(std::string("this CPU lacks ") + s + " (best: " + isa_name(have) + ")");
  return want;
}

using f32arr = py::array_t<float, py::array::c_style>;

void run_gemm(const Args& a, int64_t P, Isa which, int threads) {
  void (*run)(const Args&, int64_t) =
      which == Isa::avx512 ? run_avx512 : which == Isa::avx2 ? run_avx2 : run_scalar;
  if (a.M == 0) return;
  // threads only pay when each gets a few hundred KB of weights to stream
  const bool par = threads > 1 && P * a.K * NR >= (int64_t(1) << 16);
  if ((which == Isa::avx512 && a.M <= 4) || (which == Isa::avx2 && a.M <= 2)) {
    void (*pair)(const Args&, int64_t) = which == Isa::avx512 ? run_avx512_pair : run_avx2_pair;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(std::max(1, threads)) if (par)
#endif
    for (int64_t p = 0; p < P; p += 2) pair(a, p);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 2) num_threads(std::max(1, threads)) if (par)
#endif
  for (int64_t p = 0; p < P; ++p) run(a, p);
}

// x [M, K] (row stride ldx given by the array), wp [P, K, 32], y [M, N] written in full.
void skinny_mm(py::array x, f32arr wp, py::array y, int64_t n, int threads,
               const std::string& isa) {
  if (x.ndim() != 2 || y.ndim() != 2 || wp.ndim() != 3 || wp.shape(2) != NR)
    throw std::invalid_argument("skinny_mm: need x [M, K], wp [P, K, 32], y [M, N]");
  if (!py::isinstance<py::array_t<float>>(x) || !py::isinstance<py::array_t<float>>(y))
    throw std::invalid_argument("skinny_mm: x and y must be float32");
  if (x.strides(1) != 4 || y.strides(1) != 4 || x.strides(0) % 4 || y.strides(0) % 4)
    throw std::invalid_argument("skinny_mm: x and y rows must be contiguous");
  if (!y.writeable()) throw std::invalid_argument("skinny_mm: y is read-only");
  Args a{static_cast<const float*>(x.data()), x.strides(0) / 4, wp.data(),
         static_cast<float*>(y.mutable_data()), y.strides(0) / 4, x.shape(0), x.shape(1), n};
  const int64_t P = wp.shape(0);
  if (wp.shape(1) != a.K) throw std::invalid_argument("skinny_mm: wp's K differs from x's");
  if (y.shape(0) != a.M || y.shape(1) != n || P * NR < n || (P - 1) * NR >= n)
    throw std::invalid_argument("skinny_mm: y must be [M, N] with N in (32 (P-1), 32 P]");
  const Isa which = parse_isa(isa);
  py::gil_scoped_release nogil;
  run_gemm(a, P, which, threads);
}

}  // namespace

namespace specrt {
void skinny_mm_raw(const float* x, int64_t ldx, const float* wp, float* y, int64_t ldy,
                   int64_t M, int64_t K, int64_t N, int threads) {
  static const Isa which = best_isa();
  const Args a{x, ldx, wp, y, ldy, M, K, N};
  run_gemm(a, (N + NR - 1) / NR, which, threads);
}
}  // namespace specrt

namespace {
// Ask the kernel for transparent huge pages (2 MB) over the 2 MB-aligned interior of
// [addr, addr + nbytes): packed weights are streamed whole every step, and with 4 KB
// pages each 4 KB costs a TLB miss (a nested page walk in a VM). Takes effect for pages
// touched after the call, so call it on fresh, untouched memory. False when nothing
// was advised (too small, or the kernel refused: THP off).
bool advise_hugepages(uintptr_t addr, int64_t nbytes) {
  constexpr uintptr_t HP = uintptr_t(1) << 21;
  const uintptr_t lo = (addr + HP - 1) & ~(HP - 1), hi = (addr + nbytes) & ~(HP - 1);
  if (nbytes <= 0 || hi <= lo) return false;
#ifdef MADV_HUGEPAGE
  return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  return false;
#endif
}
}  // namespace

void bind_gemm(py::module_& m) {
  m.def("advise_hugepages", &advise_hugepages,
        "madvise(MADV_HUGEPAGE) over the 2 MB-aligned interior of [addr, addr + nbytes); "
        "for memory not yet touched; False when nothing was advised",
        py::arg("addr"), py::arg("nbytes"));
  m.def("skinny_mm", &skinny_mm,
        "y[M, N] = x[M, K] @ W^T from W packed as [ceil(N/32), K, 32] (fp32, CPU)",
        py::arg("x"), py::arg("wp"), py::arg("y"), py::arg("n"), py::arg("threads"),
        py::arg("isa") = "auto");
  m.def("gemm_isa", []() { return std::string(isa_name(best_isa())); },
        "the best SIMD path of this CPU for skinny_mm: avx512, avx2 or scalar");
}
