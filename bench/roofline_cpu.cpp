// The two numbers that bound a CPU decode step: multiply-add rate and weight-streaming
// bandwidth. Built and run by bench/bench_roofline.py (g++ -O2 -fopenmp); not part of the
// extension. Prints one JSON object:
//   {"threads": T, "gmac_s": {"fp32_fma": .., "bf16_dp": .., "int8_vnni": ..},
//    "read_gb_s": ..}
// gmac_s: register-only chains of 12 independent accumulators per thread, all threads
// together (vfmadd231ps zmm: 16 MACs, vdpbf16ps zmm: 32, vpdpbusd zmm: 64 per instruction);
// an ISA the CPU lacks reports 0. read_gb_s: every thread summing its share of a buffer
// larger than the caches (the best of several passes), as a decode step streams weights.
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double rate(F body, double macs_per_iter, long iters) {
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = 0, t1 = 0;
#pragma omp parallel
    {
#pragma omp barrier
#pragma omp master
      t0 = now();
      body(iters);
#pragma omp barrier
#pragma omp master
      t1 = now();
    }
    const double r = omp_get_max_threads() * macs_per_iter * iters / (t1 - t0) / 1e9;
    best = r > best ? r : best;
  }
  return best;
}

volatile float sink_f;
volatile int sink_i;

__attribute__((target("avx512f"))) void fma_body(long n) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i * 1e-9f);
  __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(0.999f);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], y, x);
    __asm__ volatile("" : "+v"(x));
  }
  float r = 0;
  for (int i = 0; i < 12; ++i) r += _mm512_reduce_add_ps(a[i]);
  sink_f = r;
}

__attribute__((target("avx512f,avx512bf16"))) void bf16_body(long n) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(i * 1e-9f);
  __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = x;
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], x, y);
    __asm__ volatile("" : "+v"(x));
  }
  float r = 0;
  for (int i = 0; i < 12; ++i) r += _mm512_reduce_add_ps(a[i]);
  sink_f = r;
}

__attribute__((target("avx512f,avx512vnni"))) void vnni_body(long n) {
  __m512i a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_epi32(i);
  __m512i x = _mm512_set1_epi32(0x01010101), y = x;
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbusd_epi32(a[i], x, y);
    __asm__ volatile("" : "+v"(x));
  }
  int r = 0;
  for (int i = 0; i < 12; ++i) r += _mm512_reduce_add_epi32(a[i]);
  sink_i = r;
}

__attribute__((target("avx512f"))) double read_bw(int64_t bytes) {
  const int64_t n = bytes / 4 / 128 * 128;
  std::vector<float> buf(n);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) buf[i] = 1e-6f * static_cast<float>(i & 1023);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      __m512 s[8];
      for (auto& v : s) v = _mm512_setzero_ps();
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; i += 128) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) s[j] = _mm512_add_ps(s[j], _mm512_loadu_ps(&buf[i + 16 * j]));
      }
      for (int j = 1; j < 8; ++j) s[0] = _mm512_add_ps(s[0], s[j]);
      total += _mm512_reduce_add_ps(s[0]);
    }
    const double dt = now() - t0;
    sink_f = total;
    best = n * 4.0 / dt / 1e9 > best ? n * 4.0 / dt / 1e9 : best;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const long iters = argc > 1 ? std::atol(argv[1]) : 20000000;
  const int64_t bytes = (argc > 2 ? std::atol(argv[2]) : 512) * (int64_t(1) << 20);
  __builtin_cpu_init();
  const bool f = __builtin_cpu_supports("avx512f");
  const double fp32 = f ? rate(fma_body, 12 * 16, iters) : 0;
  const double bf16 = f && __builtin_cpu_supports("avx512bf16") ? rate(bf16_body, 12 * 32, iters) : 0;
  const double vnni = f && __builtin_cpu_supports("avx512vnni") ? rate(vnni_body, 12 * 64, iters) : 0;
  const double bw = f ? read_bw(bytes) : 0;
  std::printf("{\"threads\": %d, \"gmac_s\": {\"fp32_fma\": %.1f, \"bf16_dp\": %.1f, "
              "\"int8_vnni\": %.1f}, \"read_gb_s\": %.1f}\n",
              omp_get_max_threads(), fp32, bf16, vnni, bw);
  return 0;
}
