// The W8A8 linear on AMX (Sapphire Rapids and later): tdpbusd multiplies a 16-row x 64-byte tile
// of activations (uint8, offset by 128) by a 16 x 64-byte tile of weights (16 groups of four
// inputs for 16 outputs: a slice of a pack_int8_panels panel, row stride 256 bytes) into 16 x 16
// int32 sums, 16x the work of a vpdpbusd per instruction; the last K % 64 inputs, if any, by
// vpdpbusd. Calls of kAmxMinRows rows or more run the tiles (rows past M in a 16-row block are
// computed from scratch and never stored), smaller ones vpdpbusd alone. The sums are exact on
// every path, so the output is the same bits as the VNNI, AVX2 and generic builds give. Only
// this object is built with AMX (and VNNI, for its build of int8_impl.h); ops_cpu.cpp uses it
// only after the kernel has granted this process the tile data state (arch_prctl
// ARCH_REQ_XCOMP_PERM).
#if defined(__x86_64__)
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,bmi2,prefer-vector-width=512")
#include <cstdint>
#include <immintrin.h>

#include "kernels.h"

namespace kiln::cpu::amx {
namespace {

#define KILN_INT8_KIND 2
#include "int8_impl.h"

constexpr int64_t kAmxRows = 16;    // rows of an activation tile
constexpr int64_t kAmxGroups = 16;  // groups of four inputs per tile (64 bytes)
// Calls of fewer rows run int8_impl.h's vpdpbusd tiles instead: at one row the tiles (16 rows
// computed for 1) streamed the weights 15-35% slower than vpdpbusd (236 MB of smollm2 layers,
// one thread, load average 12), at 2 rows alike, from 4 rows AMX was 1.2-1.9x faster. Both sum
// exactly in int32 and share the float epilogue, so a row's bits do not depend on which ran
// (tests/kernels/test_kernels_w8a8.py: batch invariance over 1-64 rows on this build).
constexpr int64_t kAmxMinRows = 4;

// The tile configuration (palette 1): tmm0-3 the sums of the panel's four 16-column slices,
// tmm4 an activation tile of 16 groups, tmm5-7 weight tiles, loaded in turn so that the next
// slice streams in while the last is multiplied (tiles are not renamed: reloading the one a
// tdpbusd still reads would wait for it).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kAmxRows;  // == kAmxGroups for the weight tiles
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The last groups (fewer than 16) of a 16-row block by vpdpbusd, added to its tile sums.
inline void vnni_tail(int64_t g0, int64_t K4, int64_t rows, const uint8_t* xm, int64_t kp,
                      const int8_t* panel, int32_t* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512i acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_load_si512(sums + r * kInt8PanelWidth + 16 * j);
    for (int64_t g = g0; g < K4; ++g) {
      int32_t four;
      __builtin_memcpy(&four, xm + r * kp + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(four);
      const int8_t* wg = panel + g * kInt8GroupBytes;
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm512_dpbusd_epi32(acc[j], xb, _mm512_loadu_si512(wg + 64 * j));
      }
    }
    for (int j = 0; j < 4; ++j) _mm512_store_si512(sums + r * kInt8PanelWidth + 16 * j, acc[j]);
  }
}

// xq holds ceil(M / 16) * 16 rows of kp bytes (the op allocates them; rows past M are scratch).
void w8a8_panels_amx(int64_t p0, int64_t p1, int64_t M, int64_t kp, int64_t N,
                     const uint8_t* xq, const float* xscale, const int8_t* panels,
                     const int32_t* wsum, const float* wscale, float* out, int64_t so) {
  if (M < kAmxMinRows) {
    w8a8_panels(p0, p1, M, kp, N, xq, xscale, panels, wsum, wscale, out, so);
    return;
  }
  const int64_t K4 = kp / 4;
  const int64_t full = K4 / kAmxGroups;
  configure();
  alignas(64) int32_t sums[kAmxRows * kInt8PanelWidth];
  constexpr int64_t stride = kInt8PanelWidth * 4;  // bytes per row of `sums`
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = panels + p * K4 * kInt8GroupBytes;
    const int64_t n = p * kInt8PanelWidth;
    const int64_t cols = N - n < kInt8PanelWidth ? N - n : kInt8PanelWidth;
    for (int64_t m = 0; m < M; m += kAmxRows) {
      const uint8_t* xm = xq + m * kp;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < full; ++c) {
        const int8_t* wc = panel + c * kAmxGroups * kInt8GroupBytes;
        // Tile loads alone leave memory idle between chunks at one row (measured 4.4 against
        // 5.6 GB/s for vpdpbusd's loads): ask for the chunk after next (4 KiB each) meanwhile.
        const char* ahead = reinterpret_cast<const char*>(wc) + 2 * kAmxGroups * kInt8GroupBytes;
        for (int64_t b = 0; b < kAmxGroups * kInt8GroupBytes; b += 64) {
          __builtin_prefetch(ahead + b);
        }
        _tile_loadd(4, xm + c * 4 * kAmxGroups, kp);
        _tile_loadd(5, wc, kInt8GroupBytes);
        _tile_loadd(6, wc + 64, kInt8GroupBytes);
        _tile_dpbusd(0, 4, 5);
        _tile_loadd(7, wc + 128, kInt8GroupBytes);
        _tile_dpbusd(1, 4, 6);
        _tile_loadd(5, wc + 192, kInt8GroupBytes);
        _tile_dpbusd(2, 4, 7);
        _tile_dpbusd(3, 4, 5);
      }
      _tile_stored(0, sums, stride);
      _tile_stored(1, sums + 16, stride);
      _tile_stored(2, sums + 32, stride);
      _tile_stored(3, sums + 48, stride);
      const int64_t rows = M - m < kAmxRows ? M - m : kAmxRows;
      if (full * kAmxGroups < K4) vnni_tail(full * kAmxGroups, K4, rows, xm, kp, panel, sums);
      for (int j = 0; j < 4; ++j) {
        const int64_t c0 = 16 * j;
        if (c0 >= cols) break;
        const __mmask16 mk =
            cols - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - c0)) - 1);
        const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, wsum + n + c0), 7);
        const __m512 sw = _mm512_maskz_loadu_ps(mk, wscale + n + c0);
        for (int64_t r = 0; r < rows; ++r) {
          const __m512i acc = _mm512_load_si512(sums + r * kInt8PanelWidth + c0);
          const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, corr));
          const __m512 s = _mm512_mul_ps(_mm512_set1_ps(xscale[m + r]), sw);
          _mm512_mask_storeu_ps(out + (m + r) * so + n + c0, mk, _mm512_mul_ps(f, s));
        }
      }
    }
  }
  _tile_release();
}

const Int8Kernels kInt8 = {"amx_int8", &quantize_rows_int8, &w8a8_panels_amx, kAmxRows};

}  // namespace

const Int8Kernels& int8_kernels() { return kInt8; }

}  // namespace kiln::cpu::amx
#endif
