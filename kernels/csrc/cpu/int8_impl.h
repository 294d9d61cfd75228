// int8 x int8 -> int32 linear (W8A8) for the CPU variants: included inside a variant's anonymous
// namespace (kernels_impl.h, and kernels_avx512vnni.cpp for the VNNI build), with KILN_INT8_KIND
// saying which inner product the variant has:
//   0: portable C++ (int32 multiply-adds);
//   1: AVX2 vpmaddubsw with the sign trick (|x| as u8 times w carrying x's sign, as s8): with
//      both in [-127, 127] a pair of products is at most 2 * 127 * 127 = 32,258 and the 16-bit
//      sums never saturate;
//   2: AVX-512 VNNI vpdpbusd (u8 x s8, four products into an int32): x is offset by 128 to make
//      it unsigned, and the offset's share, 128 * sum_k w[n, k], is taken off each output.
// Every kind computes the exact integer sum, so they give the same bits, and a row's result never
// depends on the rows around it: batch-invariant by construction, whatever the row count.
//
// Activations: one symmetric scale per row, q = round_half_even(x * (127 / max|x|)) in
// [-127, 127] (0 for an all-zero row). Output: float(sum_k q[m, k] * w[n, k]) * (xscale[m] *
// wscale[n]), xscale = max|x| / 127; kernels.reference.w8a8_linear does the same operations.
//
// Weights: panels [P][K4][64][4] (kernels.reference.pack_int8_panels): output feature 64 p + j,
// inputs 4 g .. 4 g + 3 at panels[p][g][j][0..3]; a group of four inputs for 16 features is one
// 64-byte vector, the layout vpdpbusd (and AMX's B tiles) read. K is padded to K4 = ceil(K / 4)
// groups with zero weights; the activation rows are padded to the same kp = 4 * K4 bytes.
#ifndef KILN_INT8_KIND
#error "define KILN_INT8_KIND before including int8_impl.h"
#endif

constexpr int64_t kInt8PanelWidth = 64;  // == kPanelWidth
constexpr int64_t kInt8GroupBytes = kInt8PanelWidth * 4;

// Rows [r0, r1) of x quantized into xq (rows of kp bytes; as int8, or as uint8 q + 128 for
// VNNI) and their scales into xscale.
void quantize_rows_int8(int64_t r0, int64_t r1, int64_t K, int64_t kp, const float* x,
                        int64_t sx, uint8_t* xq, float* xscale) {
  constexpr int offset = KILN_INT8_KIND == 2 ? 128 : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * sx;
    float amax = 0.0f;
#pragma omp simd reduction(max : amax)
    for (int64_t k = 0; k < K; ++k) {
      const float a = __builtin_fabsf(xr[k]);
      amax = a > amax ? a : amax;
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    xscale[r] = amax / 127.0f;
    uint8_t* q = xq + r * kp;
    const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (half even)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      float v = xr[k] * inv;
      v = v < -127.0f ? -127.0f : v;
      v = v > 127.0f ? 127.0f : v;
      v = (v + kRound) - kRound;
      q[k] = static_cast<uint8_t>(static_cast<int32_t>(v) + offset);
    }
    for (int64_t k = K; k < kp; ++k) q[k] = static_cast<uint8_t>(offset);
  }
}

// Writes rows x cols of one tile: out = float(dot) * (xscale[r] * wscale[c]).
inline void int8_store_scalar(int64_t rows, int64_t cols, int64_t width, const int32_t* dots,
                              const float* xscale, const float* wscale, float* out,
                              int64_t so) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const float s = xscale[r] * wscale[c];
      out[r * so + c] = static_cast<float>(dots[r * width + c]) * s;
    }
  }
}

#if KILN_INT8_KIND == 2
// R rows x the panel's 64 features: 4 x R accumulators of 16 int32, one vpdpbusd each per
// group of four inputs.
constexpr int kInt8TileRows = 6;
constexpr int64_t kInt8TileCols = 64;

template <int R>
inline void int8_tile(int64_t K4, const uint8_t* xq, int64_t kp, const int8_t* w,
                      const int32_t* wsum, const float* xscale, const float* wscale, float* out,
                      int64_t so, int64_t cols) {
  __m512i acc[R][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  }
  for (int64_t g = 0; g < K4; ++g) {
    const int8_t* wg = w + g * kInt8GroupBytes;
    __m512i wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_si512(wg + 64 * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t four;
      __builtin_memcpy(&four, xq + r * kp + 4 * g, 4);
      const __m512i xb = _mm512_set1_epi32(four);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], xb, wv[j]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const int64_t c0 = 16 * j;
    if (c0 >= cols) break;
    const __mmask16 m = cols - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cols - c0)) - 1);
    const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, wsum + c0), 7);
    const __m512 sw = _mm512_maskz_loadu_ps(m, wscale + c0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], corr));
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(xscale[r]), sw);
      _mm512_mask_storeu_ps(out + r * so + c0, m, _mm512_mul_ps(f, s));
    }
  }
}
#elif KILN_INT8_KIND == 1
// R rows x 32 features (half a panel): 4 x R accumulators of 8 int32.
constexpr int kInt8TileRows = 2;
constexpr int64_t kInt8TileCols = 32;

template <int R>
inline void int8_tile(int64_t K4, const uint8_t* xq, int64_t kp, const int8_t* w,
                      const int32_t* wsum, const float* xscale, const float* wscale, float* out,
                      int64_t so, int64_t cols) {
  (void)wsum;  // the sign trick needs no offset correction
  __m256i acc[R][4];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
  }
  for (int64_t g = 0; g < K4; ++g) {
    const int8_t* wg = w + g * kInt8GroupBytes;
    __m256i wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32 * j));
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t four;
      __builtin_memcpy(&four, xq + r * kp + 4 * g, 4);
      const __m256i xb = _mm256_set1_epi32(four);
      const __m256i ax = _mm256_abs_epi8(xb);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[j], xb));
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  int32_t dots[R * kInt8TileCols];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dots + r * kInt8TileCols + 8 * j),
                          acc[r][j]);
    }
  }
  int8_store_scalar(R, cols, kInt8TileCols, dots, xscale, wscale, out, so);
}
#else
// R rows x 16 features in plain C++.
constexpr int kInt8TileRows = 2;
constexpr int64_t kInt8TileCols = 16;

template <int R>
inline void int8_tile(int64_t K4, const uint8_t* xq, int64_t kp, const int8_t* w,
                      const int32_t* wsum, const float* xscale, const float* wscale, float* out,
                      int64_t so, int64_t cols) {
  (void)wsum;
  int32_t dots[R * kInt8TileCols] = {};
  for (int64_t g = 0; g < K4; ++g) {
    const int8_t* wg = w + g * kInt8GroupBytes;
    for (int r = 0; r < R; ++r) {
      const int8_t* xg = reinterpret_cast<const int8_t*>(xq + r * kp + 4 * g);
      const int32_t x0 = xg[0], x1 = xg[1], x2 = xg[2], x3 = xg[3];
      int32_t* d = dots + r * kInt8TileCols;
#pragma omp simd
      for (int64_t c = 0; c < kInt8TileCols; ++c) {
        const int8_t* wc = wg + 4 * c;
        d[c] += x0 * wc[0] + x1 * wc[1] + x2 * wc[2] + x3 * wc[3];
      }
    }
  }
  int8_store_scalar(R, cols, kInt8TileCols, dots, xscale, wscale, out, so);
}
#endif

template <int R>
inline void int8_rows(int64_t M, int64_t K4, const uint8_t* xq, int64_t kp, const int8_t* w,
                      const int32_t* wsum, const float* xscale, const float* wscale, float* out,
                      int64_t so, int64_t cols) {
  if constexpr (R > 0) {
    if (M == R) {
      int8_tile<R>(K4, xq, kp, w, wsum, xscale, wscale, out, so, cols);
    } else {
      int8_rows<R - 1>(M, K4, xq, kp, w, wsum, xscale, wscale, out, so, cols);
    }
  }
}

// Panels [p0, p1) of out[m, n] (m < M, n < N; row stride so) from the quantized rows.
void w8a8_panels(int64_t p0, int64_t p1, int64_t M, int64_t kp, int64_t N, const uint8_t* xq,
                 const float* xscale, const int8_t* panels, const int32_t* wsum,
                 const float* wscale, float* out, int64_t so) {
  const int64_t K4 = kp / 4;
  for (int64_t p = p0; p < p1; ++p) {
    const int8_t* panel = panels + p * K4 * kInt8GroupBytes;
    for (int64_t t = 0; t < kInt8PanelWidth; t += kInt8TileCols) {
      const int64_t n = p * kInt8PanelWidth + t;
      if (n >= N) break;
      const int64_t cols = N - n < kInt8TileCols ? N - n : kInt8TileCols;
      const int8_t* w = panel + 4 * t;
      int64_t m = 0;
      for (; m + kInt8TileRows <= M; m += kInt8TileRows) {
        int8_tile<kInt8TileRows>(K4, xq + m * kp, kp, w, wsum + n, xscale + m, wscale + n,
                                 out + m * so + n, so, cols);
      }
      if (m < M) {
        int8_rows<kInt8TileRows - 1>(M - m, K4, xq + m * kp, kp, w, wsum + n, xscale + m,
                                     wscale + n, out + m * so + n, so, cols);
      }
    }
  }
}
