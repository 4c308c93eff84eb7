// CPU skinny GEMM with bf16 weights: y[M, N] = bf16(x)[M, K] @ W[N, K]^T, fp32 accumulation
// and output. Half the weight bytes of the fp32 kernel (gemm_cpu.cpp), and on CPUs with
// AMX (Intel Sapphire Rapids and later) the tile unit does the multiply-adds, so a few
// dozen rows cost about what one row does.
//
// W is packed once at load into VNNI panels of 32 outputs (specrt/ops/gemm.py,
// pack_weight_bf16), K padded to a multiple of 32:
//   wq[p, kb, r, h, 2 c + e] = W[32 p + 16 h + c, 32 kb + 2 r + e]
// (p: panel, kb: block of 32 k, r < 16, h: half panel, c < 16, e < 2; zeros past N and K).
// wq[p, kb, r, h] (64 bytes) is one zmm for vdpbf16ps, and wq[p, kb, :, h] one AMX B tile
// (16 rows of 64 bytes at a stride of 128). Every path reads a panel, one contiguous
// stream of K / 32 * 2 KB, strictly in address order: with the two halves in separate
// 1 KB tiles (the layout before), the two interleaved streams held one core to ~10 GB/s
// on a 2-core EPYC (Zen 4) against ~25 GB/s for the same bytes read in order.
//
// x is rounded to bf16 (round to nearest even, NaN kept quiet) into a buffer zero-padded to
// [Kp] columns (and, for AMX, to a multiple of 16 rows) once per call, by the same code on
// every path.
//
// Paths, chosen at run time (or forced, for tests):
//   amx         tiles: C 2 x 2 of [16, 16] fp32, A 2 of [16, 32] bf16, B 2 (tdpbf16ps)
//   avx512bf16  vdpbf16ps, MR = 8 rows x 32 columns in 16 zmm accumulators
//   avx512      bf16 -> fp32 by shifts, two FMAs per pair (AVX-512F without BF16)
//   scalar
// Each output is a function of its own row of x and its column of W only: never of M, the
// row's place in a tile or the thread count (rows are padded, not packed differently), so
// a token's logits do not depend on how many tokens share the forward.
//
// bf16x3 (fp32 weights, "high" fp32 precision): W = Wh + Wl and x = xh + xl, each part
// bf16 (Wh = bf16(W), Wl = bf16(W - Wh), the same for x), and y = xh Wh + xh Wl + xl Wh
// with fp32 accumulation: about 16 significant bits of each operand and the dropped
// xl Wl term below 2^-18 of a product, against bf16's 8 bits (the scheme PyTorch names
// float32 matmul precision "high"). The packed weight holds both parts, block by block:
//   wq3[p, kb, s, r, h, 2 c + e], s = 0: Wh, s = 1: Wl (4 KB per k block of a panel),
// the same bytes as fp32 weights, read in address order. Paths: amx (one 16-row m-tile
// at a time: C 2, A 2 (xh, xl), B 4), avx512bf16, scalar (also where AVX-512F lacks
// BF16).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#define UNROLL _Pragma("GCC unroll 16")

namespace {

constexpr int NR = 32;          // outputs per panel
constexpr int KB = 32;          // k per block (one AMX tile row: 32 bf16)
constexpr int64_t BLOCK = 16 * 2 * 32;  // bf16 elements of one k block of a panel (2 KB)
constexpr int64_t PF_BLOCKS = 2;         // software prefetch distance, in k blocks

struct Args {
  const uint16_t* xb;  // [Mp, Kp] bf16, zeros past M (AMX: Mp = M rounded up to 16) and K
  int64_t Kp;
  const uint16_t* wq;  // [P, Kp / 32, 16, 2, 32]; x3: [P, Kp / 32, 2, 16, 2, 32]
  float* y;            // [M, ldy]
  int64_t ldy;
  int64_t M, N;
  const uint16_t* xl = nullptr;  // x3: the low parts of x, laid out as xb
  bool x3 = false;
};

inline const uint16_t* panel(const Args& a, int64_t p) {
  return a.wq + p * a.Kp * NR * (a.x3 ? 2 : 1);
}

// y rows m0 .. m0 + rows, panel p's columns, from a [rows, 32] fp32 buffer
inline void store_block(const Args& a, int64_t p, int64_t m0, int64_t rows, const float* buf) {
  const int64_t n0 = p * NR, ncols = std::min<int64_t>(NR, a.N - n0);
  rows = std::min(rows, a.M - m0);
  for (int64_t i = 0; i < rows; ++i)
    std::memcpy(a.y + (m0 + i) * a.ldy + n0, buf + i * NR, sizeof(float) * ncols);
}

// ---- AMX ------------------------------------------------------------------------------

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0-3: C (m-tile i, half h) = tmm(2 i + h); tmm4-5: A (m-tile i); tmm6-7: B (half h).
// Every tile is 16 rows of 64 bytes. The config lives in static memory: GCC's
// _tile_loadconfig names only 8 bytes of its operand, so a config built on the stack can
// lose its other stores to dead-store elimination (ldtilecfg then faults).
constexpr TileConfig make_config() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  return c;
}
alignas(64) constexpr TileConfig kTileConfig = make_config();

__attribute__((target("amx-tile"))) void amx_configure() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// C tiles tmm0-1 (and tmm2-3 with two m-tiles) to zero
template <int MT>
__attribute__((target("amx-tile"))) inline void amx_zero() {
  _tile_zero(0);
  _tile_zero(1);
  if (MT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

// C tiles of rows m0 .. m0 + 16 * MT of panel p to y: a whole block (every row and column
// inside y) straight, an edge block through buf, trimmed by store_block
template <int MT>
__attribute__((target("amx-tile"))) inline void amx_store(const Args& a, int64_t p, int64_t m0,
                                                         float* buf) {
  const bool whole = m0 + 16 * MT <= a.M && (p + 1) * NR <= a.N;
  float* dst = whole ? a.y + m0 * a.ldy + p * NR : buf;
  const int64_t ld = whole ? a.ldy : NR;
  _tile_stored(0, dst, ld * 4);
  _tile_stored(1, dst + 16, ld * 4);
  if (MT == 2) {
    _tile_stored(2, dst + 16 * ld, ld * 4);
    _tile_stored(3, dst + 16 * ld + 16, ld * 4);
  }
  if (!whole) store_block(a, p, m0, 16 * MT, buf);
}

// Rows m0 .. m0 + 16 * MT of panel p (the panel read once for both m-tiles).
template <int MT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block(const Args& a, int64_t p,
                                                             int64_t m0, float* buf) {
  const uint16_t* w = panel(a, p);
  const uint16_t* x = a.xb + m0 * a.Kp;
  const int64_t nkb = a.Kp / KB, sx = a.Kp * 2;
  amx_zero<MT>();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint16_t* wk = w + kb * BLOCK;
    const char* pf = reinterpret_cast<const char*>(wk + PF_BLOCKS * BLOCK);
    if (MT == 2)  // 32-row blocks: the tile unit paces the loads (M = 64: 32 -> 25 ms a forward)
      UNROLL for (int r = 0; r < 32; ++r) _mm_prefetch(pf + 64 * r, _MM_HINT_T0);
    _tile_loadd(6, wk, 128);
    _tile_loadd(7, wk + 32, 128);
    _tile_loadd(4, x + kb * KB, sx);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (MT == 2) {
      _tile_loadd(5, x + 16 * a.Kp + kb * KB, sx);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  amx_store<MT>(a, p, m0, buf);
}

// bf16x3: rows m0 .. m0 + 16 * MT of panel p (the panel read once for both m-tiles).
// tmm0-3: C (m-tile i, half h) = tmm(2 i + h); tmm4-5: A; tmm6-7: B. Every C tile adds,
// per k block, xl Wh, then xh Wl, then xh Wh (the small terms first), whatever MT is:
// a row's bits do not depend on the rows beside it. With two m-tiles the high parts are
// loaded twice per k block (from L1), the tiles being too few to hold both parts.
template <int MT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_block_x3(const Args& a, int64_t p,
                                                                int64_t m0, float* buf) {
  const uint16_t* w = panel(a, p);
  const int64_t nkb = a.Kp / KB, sx = a.Kp * 2;
  const uint16_t* xh0 = a.xb + m0 * a.Kp;
  const uint16_t* xl0 = a.xl + m0 * a.Kp;
  const uint16_t* xh1 = xh0 + 16 * a.Kp;
  const uint16_t* xl1 = xl0 + 16 * a.Kp;
  amx_zero<MT>();
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint16_t* wk = w + kb * 2 * BLOCK;
    // 2 blocks (8 KB) ahead: on the AMX Xeon 1 / 4 / 8 gave a 1-row forward 0.5-3.5 ms
    // slower (bench_verify_cost, 2026-12-06)
    const char* pf = reinterpret_cast<const char*>(wk + PF_BLOCKS * 2 * BLOCK);
    UNROLL for (int r = 0; r < 64; ++r) _mm_prefetch(pf + 64 * r, _MM_HINT_T0);
    const int64_t k = kb * KB;
    if (MT == 1) {
      _tile_loadd(4, xh0 + k, sx);
      _tile_loadd(5, xl0 + k, sx);
      _tile_loadd(6, wk, 128);
      _tile_loadd(7, wk + 32, 128);
      _tile_dpbf16ps(0, 5, 6);
      _tile_dpbf16ps(1, 5, 7);
      _tile_loadd(2, wk + BLOCK, 128);
      _tile_loadd(3, wk + BLOCK + 32, 128);
      _tile_dpbf16ps(0, 4, 2);
      _tile_dpbf16ps(1, 4, 3);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    } else {
      _tile_loadd(6, wk, 128);           // Wh
      _tile_loadd(7, wk + 32, 128);
      _tile_loadd(4, xl0 + k, sx);       // xl Wh
      _tile_loadd(5, xl1 + k, sx);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(6, wk + BLOCK, 128);   // Wl
      _tile_loadd(7, wk + BLOCK + 32, 128);
      _tile_loadd(4, xh0 + k, sx);       // xh Wl
      _tile_loadd(5, xh1 + k, sx);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(6, wk, 128);           // xh Wh
      _tile_loadd(7, wk + 32, 128);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  amx_store<MT>(a, p, m0, buf);
}

void amx_panel(const Args& a, int64_t p, float* buf) {
  if (a.x3) {
    int64_t m = 0;
    for (; m + 16 < a.M; m += 32) amx_block_x3<2>(a, p, m, buf);
    if (m < a.M) amx_block_x3<1>(a, p, m, buf);
    return;
  }
  int64_t m = 0;
  for (; m + 16 < a.M; m += 32) amx_block<2>(a, p, m, buf);
  if (m < a.M) amx_block<1>(a, p, m, buf);
}

// ---- AVX-512 BF16 ---------------------------------------------------------------------

template <int MR, bool X3 = false>
__attribute__((target("avx512f,avx512bf16"))) void bf16_tile(const Args& a, int64_t p,
                                                             int64_t m0, float* buf) {
  const uint16_t* w = panel(a, p);
  const int64_t nkb = a.Kp / KB, kstep = X3 ? 2 * BLOCK : BLOCK;
  __m512 acc[MR][2];
  UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const uint16_t* xr = a.xb + m0 * a.Kp;
  const uint16_t* xlr = X3 ? a.xl + m0 * a.Kp : nullptr;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint16_t* wk = w + kb * kstep;
    const char* pf = reinterpret_cast<const char*>(wk + PF_BLOCKS * kstep);
    for (int r = 0; r < 16; ++r) {
      if (MR >= 4) {  // the multiply-adds pace the loads: fetch ahead of them
        _mm_prefetch(pf + 128 * r, _MM_HINT_T0);
        _mm_prefetch(pf + 128 * r + 64, _MM_HINT_T0);
      }
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk + 64 * r);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 64 * r + 32);
      if constexpr (X3) {  // xl Wh, xh Wl, xh Wh (the order of the AMX path)
        if (MR >= 4) {
          _mm_prefetch(pf + 128 * r + BLOCK * 2, _MM_HINT_T0);
          _mm_prefetch(pf + 128 * r + BLOCK * 2 + 64, _MM_HINT_T0);
        }
        const __m512bh l0 = (__m512bh)_mm512_loadu_si512(wk + BLOCK + 64 * r);
        const __m512bh l1 = (__m512bh)_mm512_loadu_si512(wk + BLOCK + 64 * r + 32);
        UNROLL for (int i = 0; i < MR; ++i) {
          uint32_t ph, pl;
          std::memcpy(&ph, xr + i * a.Kp + kb * KB + 2 * r, 4);
          std::memcpy(&pl, xlr + i * a.Kp + kb * KB + 2 * r, 4);
          const __m512bh xh = (__m512bh)_mm512_set1_epi32(static_cast<int>(ph));
          const __m512bh xl = (__m512bh)_mm512_set1_epi32(static_cast<int>(pl));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xl, w0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xl, w1);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xh, l0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xh, l1);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xh, w0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xh, w1);
        }
        continue;
      }
      UNROLL for (int i = 0; i < MR; ++i) {
        uint32_t pair;
        std::memcpy(&pair, xr + i * a.Kp + kb * KB + 2 * r, 4);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
      }
    }
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(buf + i * NR, acc[i][0]);
    _mm512_storeu_ps(buf + i * NR + 16, acc[i][1]);
  }
  store_block(a, p, m0, MR, buf);
}

// ---- AVX-512F (bf16 widened to fp32) --------------------------------------------------

template <int MR>
__attribute__((target("avx512f"))) void f32_tile(const Args& a, int64_t p, int64_t m0,
                                                 float* buf) {
  const uint16_t* w = panel(a, p);
  const int64_t nkb = a.Kp / KB;
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 acc[MR][2];
  UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const uint16_t* xr = a.xb + m0 * a.Kp;
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint16_t* wk = w + kb * BLOCK;
    for (int r = 0; r < 16; ++r) {
      const __m512i v0 = _mm512_loadu_si512(wk + 64 * r);
      const __m512i v1 = _mm512_loadu_si512(wk + 64 * r + 32);
      // lane c: (even k, odd k) of column c as fp32
      const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16));
      const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(v0, hi));
      const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16));
      const __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(v1, hi));
      UNROLL for (int i = 0; i < MR; ++i) {
        const uint16_t* xp = xr + i * a.Kp + kb * KB + 2 * r;
        uint32_t be = uint32_t(xp[0]) << 16, bo = uint32_t(xp[1]) << 16;
        float fe, fo;
        std::memcpy(&fe, &be, 4);
        std::memcpy(&fo, &bo, 4);
        const __m512 xe = _mm512_set1_ps(fe), xo = _mm512_set1_ps(fo);
        acc[i][0] = _mm512_fmadd_ps(xe, e0, _mm512_fmadd_ps(xo, o0, acc[i][0]));
        acc[i][1] = _mm512_fmadd_ps(xe, e1, _mm512_fmadd_ps(xo, o1, acc[i][1]));
      }
    }
  }
  UNROLL for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(buf + i * NR, acc[i][0]);
    _mm512_storeu_ps(buf + i * NR + 16, acc[i][1]);
  }
  store_block(a, p, m0, MR, buf);
}

// Tiles of 8 rows, then one of the remaining 1-7 (every row's arithmetic is the same in
// any tile size).
template <template <int> class Tile>
void vec_panel(const Args& a, int64_t p, float* buf) {
  int64_t m = 0;
  for (; m + 8 <= a.M; m += 8) Tile<8>::run(a, p, m, buf);
  switch (a.M - m) {
    case 7: Tile<7>::run(a, p, m, buf); break;
    case 6: Tile<6>::run(a, p, m, buf); break;
    case 5: Tile<5>::run(a, p, m, buf); break;
    case 4: Tile<4>::run(a, p, m, buf); break;
    case 3: Tile<3>::run(a, p, m, buf); break;
    case 2: Tile<2>::run(a, p, m, buf); break;
    case 1: Tile<1>::run(a, p, m, buf); break;
    default: break;
  }
}
template <int MR>
struct Bf16Tile {
  static void run(const Args& a, int64_t p, int64_t m0, float* buf) {
    if (a.x3)
      bf16_tile<MR, true>(a, p, m0, buf);
    else
      bf16_tile<MR>(a, p, m0, buf);
  }
};
template <int MR>
struct F32Tile {
  static void run(const Args& a, int64_t p, int64_t m0, float* buf) { f32_tile<MR>(a, p, m0, buf); }
};
void bf16_panel(const Args& a, int64_t p, float* buf) { vec_panel<Bf16Tile>(a, p, buf); }
void f32_panel(const Args& a, int64_t p, float* buf) { vec_panel<F32Tile>(a, p, buf); }

// ---- scalar ---------------------------------------------------------------------------

inline float bf(uint16_t v) {
  const uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

void scalar_panel(const Args& a, int64_t p, float* buf) {
  const uint16_t* w = panel(a, p);
  const int64_t nkb = a.Kp / KB, kstep = a.x3 ? 2 * BLOCK : BLOCK;
  for (int64_t m = 0; m < a.M; ++m) {
    float acc[NR] = {0};
    const uint16_t* xr = a.xb + m * a.Kp;
    const uint16_t* xlr = a.x3 ? a.xl + m * a.Kp : nullptr;
    for (int64_t kb = 0; kb < nkb; ++kb)
      for (int r = 0; r < 16; ++r) {
        const float xe = bf(xr[kb * KB + 2 * r]), xo = bf(xr[kb * KB + 2 * r + 1]);
        for (int j = 0; j < NR; ++j) {
          const uint16_t* wr = w + kb * kstep + 64 * r + 32 * (j / 16) + 2 * (j % 16);
          if (a.x3) {  // xl Wh, xh Wl, xh Wh
            const uint16_t* lr = wr + BLOCK;
            const float le = bf(xlr[kb * KB + 2 * r]), lo = bf(xlr[kb * KB + 2 * r + 1]);
            acc[j] = le * bf(wr[0]) + (lo * bf(wr[1]) + acc[j]);
            acc[j] = xe * bf(lr[0]) + (xo * bf(lr[1]) + acc[j]);
          }
          acc[j] = xe * bf(wr[0]) + (xo * bf(wr[1]) + acc[j]);
        }
      }
    store_block(a, p, m, 1, acc);
  }
}

// ---- dispatch -------------------------------------------------------------------------

enum class Isa { scalar = 0, avx512 = 1, avx512bf16 = 2, amx = 3 };

const char* isa_name(Isa i) {
  return i == Isa::amx ? "amx" : i == Isa::avx512bf16 ? "avx512bf16"
                               : i == Isa::avx512 ? "avx512" : "scalar";
}

// AMX needs the CPU's flags, the OS's XSAVE support for tile data and this process's
// permission to use it (Linux >= 5.16: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)).
bool amx_usable() {
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
#ifdef SYS_arch_prctl
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

Isa best_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) return Isa::scalar;
    if (amx_usable()) return Isa::amx;
    if (__builtin_cpu_supports("avx512bf16")) return Isa::avx512bf16;
    return Isa::avx512;
  }();
  return best;
}

Isa parse_isa(const std::string& s) {
  const Isa have = best_isa();
  if (s.empty() || s == "auto") return have;
  const Isa want = s == "amx" ? Isa::amx : s == "avx512bf16" ? Isa::avx512bf16
                 : s == "avx512" ? Isa::avx512 : s == "scalar" ? Isa::scalar : Isa(-1);
  if (static_cast<int>(want) < 0)
    throw std::invalid_argument("isa must be auto, amx, avx512bf16, avx512 or scalar, got '" +
                                s + "'");
  __builtin_cpu_init();
  const bool ok = want == Isa::scalar ||
                  (want == Isa::avx512 && __builtin_cpu_supports("avx512f")) ||
                  (want == Isa::avx512bf16 && __builtin_cpu_supports("avx512bf16")) ||
                  (want == Isa::amx && have == Isa::amx);
  if (!ok)
    throw std::invalid_argument(std::string("this CPU (or OS) lacks ") + s + " (best: " +
                                isa_name(have) + ")");
  return want;
}

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN
inline uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b >> 16) | 0x40);
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// 16 lanes of to_bf16 (the same bits; AVX-512F)
__attribute__((target("avx512f"))) inline __m256i to_bf16_16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                                 _mm512_set1_epi32(0x7F800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

__attribute__((target("avx512f"))) int64_t round_row_avx512(const float* src, uint16_t* dst,
                                                            int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), to_bf16_16(_mm512_loadu_ps(src + k)));
  return k;
}

inline float widen(uint16_t v) { return bf(v); }

// x3: the low parts, xl = bf16(x - xh) of rows already rounded into xb (x - xh is exact)
__attribute__((target("avx512f"))) int64_t low_row_avx512(const float* src, const uint16_t* hi,
                                                          uint16_t* dst, int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512i h = _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + k))), 16);
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(src + k), _mm512_castsi512_ps(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), to_bf16_16(d));
  }
  return k;
}

void low_rows(const float* x, int64_t ldx, int64_t M, int64_t K, const uint16_t* xb,
              uint16_t* xl, int64_t Mp, int64_t Kp) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  for (int64_t m = 0; m < M; ++m) {
    const float* src = x + m * ldx;
    const uint16_t* hi = xb + m * Kp;
    uint16_t* dst = xl + m * Kp;
    int64_t k = avx512 ? low_row_avx512(src, hi, dst, K) : 0;
    for (; k < K; ++k) dst[k] = to_bf16(src[k] - widen(hi[k]));
    for (; k < Kp; ++k) dst[k] = 0;
  }
  if (Mp > M) std::memset(xl + M * Kp, 0, sizeof(uint16_t) * (Mp - M) * Kp);
}

// x [M, K] (row stride ldx) -> xb [Mp, Kp], zeros past M and K
void round_rows(const float* x, int64_t ldx, int64_t M, int64_t K, uint16_t* xb, int64_t Mp,
                int64_t Kp) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = xb + m * Kp;
    const float* src = x + m * ldx;
    int64_t k = avx512 ? round_row_avx512(src, dst, K) : 0;
    for (; k < K; ++k) dst[k] = to_bf16(src[k]);
    for (; k < Kp; ++k) dst[k] = 0;
  }
  if (Mp > M) std::memset(xb + M * Kp, 0, sizeof(uint16_t) * (Mp - M) * Kp);
}

void run_gemm(const float* x, int64_t ldx, int64_t K, const uint16_t* wq, float* y, int64_t ldy,
              int64_t M, int64_t N, Isa which, int threads, bool x3 = false) {
  if (M == 0) return;
  if (x3 && which == Isa::avx512) which = Isa::scalar;  // no widening x3 path
  // the AMX path reads whole 16-row tiles of x: zero rows up to a multiple of 16
  const int64_t Kp = (K + KB - 1) / KB * KB, P = (N + NR - 1) / NR;
  const int64_t Mp = which == Isa::amx ? (M + 15) / 16 * 16 : M;
  thread_local std::vector<uint16_t> xbuf;
  if (static_cast<int64_t>(xbuf.size()) < Mp * Kp) xbuf.resize(Mp * Kp);
  round_rows(x, ldx, M, K, xbuf.data(), Mp, Kp);
  thread_local std::vector<uint16_t> xlbuf;
  if (x3) {
    if (static_cast<int64_t>(xlbuf.size()) < Mp * Kp) xlbuf.resize(Mp * Kp);
    low_rows(x, ldx, M, K, xbuf.data(), xlbuf.data(), Mp, Kp);
  }
  const Args a{xbuf.data(), Kp, wq, y, ldy, M, N, x3 ? xlbuf.data() : nullptr, x3};
  void (*run)(const Args&, int64_t, float*) =
      which == Isa::amx ? amx_panel : which == Isa::avx512bf16 ? bf16_panel
      : which == Isa::avx512 ? f32_panel : scalar_panel;
  // threads pay when each gets a few hundred KB of weights to stream
  const bool par = threads > 1 && P * Kp * NR * (x3 ? 2 : 1) >= (int64_t(1) << 17);
#ifdef _OPENMP
#pragma omp parallel num_threads(std::max(1, threads)) if (par)
#endif
  {
    alignas(64) float buf[32 * NR];
    if (which == Isa::amx) amx_configure();  // tile state is per thread
#ifdef _OPENMP
// equal contiguous shares of panels: on the AMX Xeon a forward of 1 / 16 / 32 rows
// took ~0.5 / ~1 / ~2 ms less than with dynamic chunks of 2 panels (the threads stream at
// the same rate, and the last chunks of a dynamic schedule left one of them idle)
#pragma omp for schedule(static)
#endif
    for (int64_t p = 0; p < P; ++p) run(a, p, buf);
    if (which == Isa::amx) amx_release();
  }
}

using u16arr = py::array_t<uint16_t, py::array::c_style>;

// x [M, K] fp32 (row stride ldx given by the array), y [M, N] fp32 written in full; wq as
// uint16: [P, Kp / 32, 16, 2, 32] (bf16 weights) or, x3, [P, Kp / 32, 2, 16, 2, 32] (the
// high and low parts of fp32 weights).
void packed_mm(const char* op, bool x3, py::array x, u16arr wq, py::array y, int64_t n,
               int threads, const std::string& isa) {
  const std::string name(op);
  const int lead = x3 ? 3 : 2;  // wq's first dim of the [16, 2, 32] tail
  if (x.ndim() != 2 || y.ndim() != 2 || wq.ndim() != lead + 3 || (x3 && wq.shape(2) != 2) ||
      wq.shape(lead) != 16 || wq.shape(lead + 1) != 2 || wq.shape(lead + 2) != 32)
    throw std::invalid_argument(name + ": need x [M, K], wq [P, Kp / 32, " +
                                (x3 ? "2, " : "") + "16, 2, 32], y [M, N]");
  if (!py::isinstance<py::array_t<float>>(x) || !py::isinstance<py::array_t<float>>(y))
    throw std::invalid_argument(name + ": x and y must be float32");
  if (x.strides(1) != 4 || y.strides(1) != 4 || x.strides(0) % 4 || y.strides(0) % 4)
    throw std::invalid_argument(name + ": x and y rows must be contiguous");
  if (!y.writeable()) throw std::invalid_argument(name + ": y is read-only");
  const int64_t M = x.shape(0), K = x.shape(1), P = wq.shape(0);
  if (wq.shape(1) * KB < K || (wq.shape(1) - 1) * KB >= K)
    throw std::invalid_argument(name + ": wq's K blocks do not fit x's K");
  if (y.shape(0) != M || y.shape(1) != n || P * NR < n || (P - 1) * NR >= n)
    throw std::invalid_argument(name + ": y must be [M, N] with N in (32 (P-1), 32 P]");
  const Isa which = parse_isa(isa);
  py::gil_scoped_release nogil;
  run_gemm(static_cast<const float*>(x.data()), x.strides(0) / 4, K, wq.data(),
           static_cast<float*>(y.mutable_data()), y.strides(0) / 4, M, n, which, threads, x3);
}

void skinny_mm_bf16(py::array x, u16arr wq, py::array y, int64_t n, int threads,
                    const std::string& isa) {
  packed_mm("skinny_mm_bf16", false, x, wq, y, n, threads, isa);
}

void skinny_mm_bf16x3(py::array x, u16arr wq, py::array y, int64_t n, int threads,
                      const std::string& isa) {
  packed_mm("skinny_mm_bf16x3", true, x, wq, y, n, threads, isa);
}

}  // namespace

namespace specrt {
bool amx_tiles_usable() { return best_isa() == Isa::amx; }
void amx_tiles_on() { amx_configure(); }
void amx_tiles_off() { amx_release(); }

void skinny_mm_bf16_raw(const float* x, int64_t ldx, const uint16_t* wq, float* y, int64_t ldy,
                        int64_t M, int64_t K, int64_t N, int threads) {
  run_gemm(x, ldx, K, wq, y, ldy, M, N, best_isa(), threads);
}

void skinny_mm_bf16x3_raw(const float* x, int64_t ldx, const uint16_t* wq, float* y,
                          int64_t ldy, int64_t M, int64_t K, int64_t N, int threads) {
  run_gemm(x, ldx, K, wq, y, ldy, M, N, best_isa(), threads, true);
}
}  // namespace specrt

void bind_gemm_bf16(py::module_& m) {
  m.def("skinny_mm_bf16", &skinny_mm_bf16,
        "y[M, N] = bf16(x)[M, K] @ W^T from W packed as bf16 VNNI panels "
        "[ceil(N/32), ceil(K/32), 16, 2, 32] (fp32 accumulation and output, CPU)",
        py::arg("x"), py::arg("wq"), py::arg("y"), py::arg("n"), py::arg("threads"),
        py::arg("isa") = "auto");
  m.def("skinny_mm_bf16x3", &skinny_mm_bf16x3,
        "y[M, N] = x[M, K] @ W^T in bf16x3 (x = xh + xl, W = Wh + Wl, y = xh Wh + xh Wl + "
        "xl Wh, fp32 accumulation) from W packed [ceil(N/32), ceil(K/32), 2, 16, 2, 32] (CPU)",
        py::arg("x"), py::arg("wq"), py::arg("y"), py::arg("n"), py::arg("threads"),
        py::arg("isa") = "auto");
  m.def("gemm_bf16_isa", []() { return std::string(isa_name(best_isa())); },
        "the path skinny_mm_bf16 takes on this CPU: amx, avx512bf16, avx512 or scalar");
}
