// The CPU kernels, written once and compiled once per instruction set: kernels_<isa>.cpp defines
// KILN_ISA (the namespace) and includes this file under that variant's compiler flags.
//
// Rules that keep the variants apart in one shared library: no torch or standard-library header
// with inline functions (a weak symbol compiled for AVX-512 could be picked for the AVX2 path),
// everything but the exported table in an anonymous namespace, math through __builtin_*.
// The loops are plain C++ under `#pragma omp simd`; the compiler vectorizes them to the
// variant's width (AVX-512 needs prefer-vector-width=512 on gcc 12). Build with
// -fno-trapping-math: without it gcc will not if-convert the clamps in exp for AVX2.
#ifndef KILN_ISA
#error "define KILN_ISA (the variant's namespace) before including kernels_impl.h"
#endif

#include <cstdint>
#if defined(__x86_64__)
#include <immintrin.h>  // the AVX variants' int8 widening (their `#pragma GCC target` enables it)
#endif

#include "kernels.h"

namespace kiln::cpu::KILN_ISA {
namespace {

using bf16 = uint16_t;

// The type arithmetic happens in: float for float32 and bfloat16, double for float64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }

template <typename T> inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }
// Round to nearest even, as torch does; NaN stays a (quiet) NaN. Branch-free with a mask: a
// select here kept gcc from vectorizing some AVX2 loops.
template <> inline bf16 from_acc<bf16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan_mask = 0u - static_cast<uint32_t>((u & 0x7fffffffu) > 0x7f800000u);
  return static_cast<bf16>((rounded & ~nan_mask) | (0x7fc0u & nan_mask));
}

// float16 as its raw bits, converted with integer arithmetic and bit masks (no F16C needed; the
// loops still vectorize). Exact for every value, rounding to nearest even as torch does.
struct f16 {
  uint16_t bits;
};

inline float to_acc(f16 v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = (h & 0x7fffu) << 13;  // exponent and mantissa at float's positions
  const uint32_t exp = h & 0x7c00u;
  const uint32_t normal = em + (112u << 23);     // rebias: 127 - 15
  const uint32_t inf_nan = em + (224u << 23);    // exponent 31 -> 255, payload kept
  // Subnormal: 2^-14 * (1 + m / 1024) - 2^-14 = m * 2^-24, with no float subnormal involved.
  const float sub_f = __builtin_bit_cast(float, em + (113u << 23)) -
                      __builtin_bit_cast(float, 113u << 23);
  const uint32_t sub = __builtin_bit_cast(uint32_t, sub_f);
  const uint32_t is_sub = 0u - static_cast<uint32_t>(exp == 0);
  const uint32_t is_inf_nan = 0u - static_cast<uint32_t>(exp == 0x7c00u);
  const uint32_t bits =
      (normal & ~is_sub & ~is_inf_nan) | (sub & is_sub) | (inf_nan & is_inf_nan);
  return __builtin_bit_cast(float, bits | sign);
}

template <> inline f16 from_acc<f16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Normal half range: rebias, then round the 13 dropped bits to nearest even (a carry into the
  // exponent gives the next binade, or infinity from 65520 up).
  const uint32_t rb = a - (112u << 23);
  const uint32_t normal = (rb + 0xfffu + ((rb >> 13) & 1u)) >> 13;
  // Below 2^-14: adding 0.5 rounds |v| to a multiple of 2^-24 (nearest even); the low bits of the
  // sum are then the subnormal half.
  const uint32_t sub = __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, a) + 0.5f) -
                       0x3f000000u;
  const uint32_t is_sub = 0u - static_cast<uint32_t>(a < 0x38800000u);
  const uint32_t is_big = 0u - static_cast<uint32_t>(a >= 0x47800000u);  // 65536 and up, inf
  const uint32_t is_nan = 0u - static_cast<uint32_t>(a > 0x7f800000u);
  const uint32_t h = (normal & ~is_sub & ~is_big) | (sub & is_sub) |
                     (0x7c00u & is_big & ~is_nan) | (0x7e00u & is_nan);
  return f16{static_cast<uint16_t>(h | sign)};
}

inline float rsqrt_acc(float v) { return 1.0f / __builtin_sqrtf(v); }
inline double rsqrt_acc(double v) { return 1.0 / __builtin_sqrt(v); }

// Selects written as bit masks: with `c ? a : b` on floats, gcc if-converts the code that follows
// into several masked copies (silu ran 7x slower on AVX-512).
inline float select_acc(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, a) & m) |
                                       (__builtin_bit_cast(uint32_t, b) & ~m));
}

// exp for float in a form the vectorizer can use (libm's expf is a call). x = n*ln2 + r with
// |r| <= ln2/2, exp(r) by its Taylor series to r^6 (error below 1e-7 relative), 2^n through the
// exponent bits. x is clamped to [-87, 80]: the result stays a normal float well below FLT_MAX,
// which recip_acc needs; exp(80) = 5.5e34 already makes the sigmoid 0 to float precision.
inline float exp_acc(float x) {
  x = select_acc(x < -87.0f, -87.0f, x);
  x = select_acc(x > 80.0f, 80.0f, x);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693145751953125f;  // ln2 in two parts, so r keeps its low bits
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}
inline double exp_acc(double x) { return __builtin_exp(x); }

// 1/d for d in [1, 2^120]: a bit-trick first guess (within 12%) and three Newton steps (each
// squares the error: below 1e-7 after three). A vector divide costs ~16 cycles on these CPUs;
// this is six multiply-adds.
inline float recip_acc(float d) {
  float y = __builtin_bit_cast(float, 0x7EF311C3u - __builtin_bit_cast(uint32_t, d));
  y = y * (2.0f - d * y);
  y = y * (2.0f - d * y);
  y = y * (2.0f - d * y);
  return y;
}
inline double recip_acc(double d) { return 1.0 / d; }

// Sums f(i) over [0, n) into kSumBlock partial sums: several vector registers of independent
// adds, where one `omp simd reduction` accumulator would wait on each add's latency. f may also
// store; it is called once for each i.
constexpr int64_t kSumBlock = 64;

template <typename A, typename F>
inline void blocked_sums(int64_t n, A* s0, A* s1, F f) {  // f by value: its captures stay local
  A p0[kSumBlock] = {}, p1[kSumBlock] = {};
  int64_t i = 0;
  for (; i + kSumBlock <= n; i += kSumBlock) {
#pragma omp simd
    for (int64_t j = 0; j < kSumBlock; ++j) f(i + j, p0[j], p1[j]);
  }
  A t0 = 0, t1 = 0;
#pragma omp simd reduction(+ : t0, t1)
  for (int64_t j = i; j < n; ++j) f(j, t0, t1);
#pragma omp simd reduction(+ : t0, t1)
  for (int64_t j = 0; j < kSumBlock; ++j) {
    t0 += p0[j];
    t1 += p1[j];
  }
  *s0 = t0;
  *s1 = t1;
}

// ---------------------------------------------------------------------------------------------
// rms_norm, with or without the residual add

template <typename T>
void add_rms_norm_t(int64_t r0, int64_t r1, int64_t n, double eps, const T* x, int64_t sx,
                    const T* res, int64_t sres, T* ro, int64_t sro, const T* w, T* out,
                    int64_t so) {
  using A = acc_t<T>;
  const A inv_n = A(1) / static_cast<A>(n);
  const A eps_a = static_cast<A>(eps);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * sx;
    const T* z;
    A ss = 0, unused = 0;
    if (res != nullptr) {
      const T* rr = res + r * sres;
      T* ror = ro + r * sro;
      // The sum of squares uses the residual as stored (rounded to T), as the reference does.
      blocked_sums(n, &ss, &unused, [&](int64_t i, A& acc, A&) {
        T zt = from_acc<T>(to_acc(xr[i]) + to_acc(rr[i]));
        ror[i] = zt;
        A zv = to_acc(zt);
        acc += zv * zv;
      });
      z = ror;
    } else {
      blocked_sums(n, &ss, &unused, [&](int64_t i, A& acc, A&) {
        A zv = to_acc(xr[i]);
        acc += zv * zv;
      });
      z = xr;
    }
    const A rstd = rsqrt_acc(ss * inv_n + eps_a);
    T* outr = out + r * so;
    // This pass works from cache; meanwhile the next row's x and residual are fetched, so that
    // memory stays busy (the hardware prefetcher alone idles here).
    const char* next_x = r + 1 < r1 ? reinterpret_cast<const char*>(xr + sx) : nullptr;
    const char* next_r =
        r + 1 < r1 && res != nullptr ? reinterpret_cast<const char*>(res + (r + 1) * sres) : nullptr;
    int64_t i = 0;
    for (; i + kSumBlock <= n; i += kSumBlock) {
      if (next_x != nullptr) {
        for (int64_t b = 0; b < kSumBlock * static_cast<int64_t>(sizeof(T)); b += 64) {
          __builtin_prefetch(next_x + i * sizeof(T) + b);
          if (next_r != nullptr) __builtin_prefetch(next_r + i * sizeof(T) + b);
        }
      }
#pragma omp simd
      for (int64_t j = i; j < i + kSumBlock; ++j) {
        outr[j] = from_acc<T>(to_acc(z[j]) * rstd * to_acc(w[j]));
      }
    }
#pragma omp simd
    for (int64_t j = i; j < n; ++j) outr[j] = from_acc<T>(to_acc(z[j]) * rstd * to_acc(w[j]));
  }
}

// bfloat16 two at a time: a 32-bit word holds elements 2j (low half) and 2j+1 (high half), and
// both widen to float with a shift or a mask and narrow back with a shift and an or. That keeps the
// loops free of the lane shuffles that element-wise widening needs (the AVX2 and AVX-512 shuffle
// port was the bottleneck), and the element order never changes.
using u32_unaligned = uint32_t __attribute__((may_alias, aligned(2)));

inline float bf16_lo(uint32_t u) { return __builtin_bit_cast(float, u << 16); }
inline float bf16_hi(uint32_t u) { return __builtin_bit_cast(float, u & 0xffff0000u); }
// v rounded to bfloat16 (nearest even), left in the high 16 bits. No NaN test: here every NaN has
// zero low 16 bits, for which the rounding add cannot carry (NaNs come from bf16 inputs, whose
// payload x86 arithmetic passes on, only setting the quiet bit, or are the default NaN 0x7fc00000).
inline uint32_t bf16_round_hi(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

template <>
void add_rms_norm_t<bf16>(int64_t r0, int64_t r1, int64_t n, double eps, const bf16* x,
                          int64_t sx, const bf16* res, int64_t sres, bf16* ro, int64_t sro,
                          const bf16* w, bf16* out, int64_t so) {
  const int64_t pairs = n / 2;
  const float inv_n = 1.0f / static_cast<float>(n);
  const auto* w2 = reinterpret_cast<const u32_unaligned*>(w);
  for (int64_t r = r0; r < r1; ++r) {
    const bf16* xr = x + r * sx;
    const bf16* z = xr;
    float ss_even = 0, ss_odd = 0;
    if (res != nullptr) {
      const bf16* rr = res + r * sres;
      bf16* ror = ro + r * sro;
      const auto* x2 = reinterpret_cast<const u32_unaligned*>(xr);
      const auto* r2 = reinterpret_cast<const u32_unaligned*>(rr);
      auto* ro2 = reinterpret_cast<u32_unaligned*>(ror);
      // Pointers captured by value: through a may_alias store, gcc could not otherwise rule out
      // that the loop rewrites the pointers themselves, and would not vectorize it.
      blocked_sums(pairs, &ss_even, &ss_odd, [x2, r2, ro2](int64_t j, float& even, float& odd) {
        const uint32_t ux = x2[j], ur = r2[j];
        const uint32_t z0 = bf16_round_hi(bf16_lo(ux) + bf16_lo(ur));
        const uint32_t z1 = bf16_round_hi(bf16_hi(ux) + bf16_hi(ur));
        ro2[j] = (z0 >> 16) | z1;
        const float f0 = __builtin_bit_cast(float, z0), f1 = __builtin_bit_cast(float, z1);
        even += f0 * f0;
        odd += f1 * f1;
      });
      if (n % 2 != 0) {
        const bf16 zt = from_acc<bf16>(to_acc(xr[n - 1]) + to_acc(rr[n - 1]));
        ror[n - 1] = zt;
        ss_even += to_acc(zt) * to_acc(zt);
      }
      z = ror;
    } else {
      const auto* x2 = reinterpret_cast<const u32_unaligned*>(xr);
      blocked_sums(pairs, &ss_even, &ss_odd, [x2](int64_t j, float& even, float& odd) {
        const float f0 = bf16_lo(x2[j]), f1 = bf16_hi(x2[j]);
        even += f0 * f0;
        odd += f1 * f1;
      });
      if (n % 2 != 0) ss_even += to_acc(xr[n - 1]) * to_acc(xr[n - 1]);
    }
    const float rstd = rsqrt_acc((ss_even + ss_odd) * inv_n + static_cast<float>(eps));
    bf16* outr = out + r * so;
    const auto* z2 = reinterpret_cast<const u32_unaligned*>(z);
    auto* o2 = reinterpret_cast<u32_unaligned*>(outr);
#pragma omp simd
    for (int64_t j = 0; j < pairs; ++j) {
      const uint32_t uz = z2[j], uw = w2[j];
      const uint32_t o0 = bf16_round_hi(bf16_lo(uz) * rstd * bf16_lo(uw));
      const uint32_t o1 = bf16_round_hi(bf16_hi(uz) * rstd * bf16_hi(uw));
      o2[j] = (o0 >> 16) | o1;
    }
    if (n % 2 != 0) outr[n - 1] = from_acc<bf16>(to_acc(z[n - 1]) * rstd * to_acc(w[n - 1]));
  }
}

template <typename T>
void rms_norm_backward_t(int64_t r0, int64_t r1, int64_t n, double eps, const T* g, int64_t sg,
                         const T* z, int64_t sz, const T* w, const T* gres, int64_t sgr, T* gz,
                         int64_t sgz, acc_t<T>* dw) {
  using A = acc_t<T>;
  const A inv_n = A(1) / static_cast<A>(n);
  const A eps_a = static_cast<A>(eps);
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * sg;
    const T* zr = z + r * sz;
    A ss = 0, dot = 0;
    blocked_sums(n, &ss, &dot, [&](int64_t i, A& ss_i, A& dot_i) {
      A zv = to_acc(zr[i]);
      ss_i += zv * zv;
      dot_i += to_acc(gr[i]) * to_acc(w[i]) * zv;
    });
    const A rstd = rsqrt_acc(ss * inv_n + eps_a);
    const A c = dot * rstd * rstd * rstd * inv_n;
    T* gzr = gz + r * sgz;
    if (gres != nullptr) {
      const T* grr = gres + r * sgr;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        A gv = to_acc(gr[i]), zv = to_acc(zr[i]);
        gzr[i] = from_acc<T>(gv * to_acc(w[i]) * rstd - zv * c + to_acc(grr[i]));
        dw[i] += gv * zv * rstd;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        A gv = to_acc(gr[i]), zv = to_acc(zr[i]);
        gzr[i] = from_acc<T>(gv * to_acc(w[i]) * rstd - zv * c);
        dw[i] += gv * zv * rstd;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// silu_and_mul

template <typename T>
void silu_and_mul_t(int64_t r0, int64_t r1, int64_t d, const T* x, int64_t sx, T* out,
                    int64_t so) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* a = x + r * sx;
    const T* b = a + d;
    T* o = out + r * so;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      A av = to_acc(a[i]);
      A silu = av * recip_acc(A(1) + exp_acc(-av));
      o[i] = from_acc<T>(silu * to_acc(b[i]));
    }
  }
}

template <typename T>
void silu_and_mul_backward_t(int64_t r0, int64_t r1, int64_t d, const T* g, int64_t sg,
                             const T* x, int64_t sx, T* gx, int64_t sgx) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * sg;
    const T* a = x + r * sx;
    const T* b = a + d;
    T* ga = gx + r * sgx;
    T* gb = ga + d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) {
      A av = to_acc(a[i]), bv = to_acc(b[i]), gv = to_acc(gr[i]);
      A s = recip_acc(A(1) + exp_acc(-av));
      A silu = av * s;
      ga[i] = from_acc<T>(gv * bv * s * (A(1) + av * (A(1) - s)));
      gb[i] = from_acc<T>(gv * silu);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rotary embedding

template <typename T>
inline void rotate_head(T* p, const T* cos, const T* sin, int64_t half, bool neox, float sign) {
  using A = acc_t<T>;
  const A sg = static_cast<A>(sign);
  if (neox) {
    T* p2 = p + half;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      A c = to_acc(cos[i]), s = sg * to_acc(sin[i]);
      A x1 = to_acc(p[i]), x2 = to_acc(p2[i]);
      p[i] = from_acc<T>(x1 * c - x2 * s);
      p2[i] = from_acc<T>(x2 * c + x1 * s);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      A c = to_acc(cos[i]), s = sg * to_acc(sin[i]);
      A x1 = to_acc(p[2 * i]), x2 = to_acc(p[2 * i + 1]);
      p[2 * i] = from_acc<T>(x1 * c - x2 * s);
      p[2 * i + 1] = from_acc<T>(x2 * c + x1 * s);
    }
  }
}

template <typename T>
void rotary_t(int64_t t0, int64_t t1, const int64_t* positions, T* q, int64_t sq_tok,
              int64_t sq_head, int64_t nq, T* k, int64_t sk_tok, int64_t sk_head, int64_t nk,
              int64_t rot_dim, const T* cache, int64_t s_cache, bool neox, bool inverse) {
  const int64_t half = rot_dim / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t t = t0; t < t1; ++t) {
    const T* cos = cache + positions[t] * s_cache;
    const T* sin = cos + half;
    for (int64_t h = 0; h < nq; ++h) rotate_head(q + t * sq_tok + h * sq_head, cos, sin, half, neox, sign);
    for (int64_t h = 0; h < nk; ++h) rotate_head(k + t * sk_tok + h * sk_head, cos, sin, half, neox, sign);
  }
}

// ---------------------------------------------------------------------------------------------
// weight-only int8 linear (decode: few rows, bound by reading the weights once)

template <typename T>
inline void int8_store(T* o, const float* acc, const float* scale, const T* bias, int64_t n,
                       int cols) {
  for (int j = 0; j < cols; ++j) {
    o[j] = from_acc<T>(acc[j] * scale[n + j] + (bias != nullptr ? to_acc(bias[n + j]) : 0.0f));
  }
}

template <typename T>
void int8_linear_t(int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                   const int8_t* w, int64_t sw, const float* scale, const T* bias, T* out,
                   int64_t so) {
  int64_t n = n0;
  // Four output features at a time: each x element loaded serves four weight rows, and four
  // rows of x at a time: each weight converted to float serves four rows. The 16 sums are
  // independent, which keeps the multiply-add units busy.
  for (; n + 4 <= n1; n += 4) {
    const int8_t* w0 = w + n * sw;
    const int8_t* w1 = w0 + sw;
    const int8_t* w2 = w1 + sw;
    const int8_t* w3 = w2 + sw;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      const float* x0 = x + m * K;
      const float* x1 = x0 + K;
      const float* x2 = x1 + K;
      const float* x3 = x2 + K;
      float a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
      float a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, \
                               a31, a32, a33)
      for (int64_t k = 0; k < K; ++k) {
        const float v0 = w0[k], v1 = w1[k], v2 = w2[k], v3 = w3[k];
        a00 += x0[k] * v0; a01 += x0[k] * v1; a02 += x0[k] * v2; a03 += x0[k] * v3;
        a10 += x1[k] * v0; a11 += x1[k] * v1; a12 += x1[k] * v2; a13 += x1[k] * v3;
        a20 += x2[k] * v0; a21 += x2[k] * v1; a22 += x2[k] * v2; a23 += x2[k] * v3;
        a30 += x3[k] * v0; a31 += x3[k] * v1; a32 += x3[k] * v2; a33 += x3[k] * v3;
      }
      const float acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13},
                               {a20, a21, a22, a23}, {a30, a31, a32, a33}};
      for (int i = 0; i < 4; ++i) int8_store(out + (m + i) * so + n, acc[i], scale, bias, n, 4);
    }
    for (; m < M; ++m) {
      const float* xm = x + m * K;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xm[k];
        a0 += xv * static_cast<float>(w0[k]);
        a1 += xv * static_cast<float>(w1[k]);
        a2 += xv * static_cast<float>(w2[k]);
        a3 += xv * static_cast<float>(w3[k]);
      }
      const float acc[4] = {a0, a1, a2, a3};
      int8_store(out + m * so + n, acc, scale, bias, n, 4);
    }
  }
  for (; n < n1; ++n) {
    const int8_t* wn = w + n * sw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float a = 0;
#pragma omp simd reduction(+ : a)
      for (int64_t k = 0; k < K; ++k) a += xm[k] * static_cast<float>(wn[k]);
      int8_store(out + m * so + n, &a, scale, bias, n, 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// batch-invariant panel linear (decode projections)
//
// An output is one chain acc = fma(x[m, k], w[n, k], acc) over k = 0..K-1 from zero: the tiling
// below decides which outputs share registers, never the order of an output's own sums, so a
// row's result is the same alone or among any rows (BLAS kernels change their summation order
// with the row count). The weight is packed in panels of 64 output features ([K][64] each) so
// that a tile streams it contiguously. Vector-extension types lower to the variant's registers
// (one zmm, two ymm or four xmm per 16 floats); the build's -ffp-contract=fast makes `+= *` one
// fused multiply-add where the instruction set has it (AVX2, AVX-512), in every tile alike.

#if !defined(KILN_VEC_FLOATS) || !defined(KILN_TILE_VECS) || !defined(KILN_TILE_ROWS)
#error "kernels_<isa>.cpp defines panel_linear's tile: KILN_VEC_FLOATS, KILN_TILE_VECS, KILN_TILE_ROWS"
#endif

constexpr int kVec = KILN_VEC_FLOATS;
constexpr int kTileVecs = KILN_TILE_VECS;
constexpr int kTileCols = kVec * kTileVecs;
constexpr int kTileRows = KILN_TILE_ROWS;
static_assert(kPanelWidth % kTileCols == 0, "a panel must split into whole tiles");
typedef float vfloat __attribute__((vector_size(kVec * sizeof(float))));

// The panels' weights as kVec floats: float32 as they are, bfloat16 widened (its bits are a
// float32's top half, so the conversion is exact), int8 converted (exact; its scale is applied
// to the finished sum). Each weight type gives the same chain of fused multiply-adds per output.
typedef int8_t vint8 __attribute__((vector_size(kVec)));
typedef uint32_t vu32 __attribute__((vector_size(kVec * sizeof(uint32_t))));
typedef int32_t vi32 __attribute__((vector_size(kVec * sizeof(int32_t))));

inline vfloat load_weights(const float* w) {
  vfloat v;
  __builtin_memcpy(&v, w, sizeof(v));
  return v;
}

// 2 kVec bfloat16 weights (columns c .. c + 2 kVec) as two vectors of float32 without any
// shuffle: read as kVec 32-bit lanes, lane l holds column c + 2l in its low half and c + 2l + 1
// in its high half (little-endian), so `<< 16` gives the even columns and `& 0xffff0000` the odd
// ones, both exact. Widening 16 bfloat16 in order is a zero-extension across 128-bit lanes, which
// gcc 12 emitted as 4 shuffle uops per 16 weights on AVX-512 (vpmovzxwd ymm x2, vextracti128,
// vinserti64x4): they all compete for the one shuffle port, which bound one-row bf16 panels
// below the memory bandwidth. Here: one load, one shift, one and per 2 kVec weights.
inline void load_bf16_pair(const uint16_t* w, vfloat& even, vfloat& odd) {
  vu32 bits;
  __builtin_memcpy(&bits, w, sizeof(bits));
  const vu32 lo = bits << 16;
  const vu32 hi = bits & 0xffff0000u;
  __builtin_memcpy(&even, &lo, sizeof(even));
  __builtin_memcpy(&odd, &hi, sizeof(odd));
}

// The inverse of load_bf16_pair's de-interleave, on finished sums: even holds columns 0, 2, ..,
// odd 1, 3, .. of 2 kVec; lo gets columns [0, kVec), hi [kVec, 2 kVec).
// (Preprocessor branches: a discarded `if constexpr` outside a template is still checked, and
// the 16-lane indices are out of range for 8 lanes.)
inline void interleave_pair(vfloat even, vfloat odd, vfloat& lo, vfloat& hi) {
#if KILN_VEC_FLOATS == 16
  lo = __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  hi = __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15,
                               31);
#elif KILN_VEC_FLOATS == 8
  lo = __builtin_shufflevector(even, odd, 0, 8, 1, 9, 2, 10, 3, 11);
  hi = __builtin_shufflevector(even, odd, 4, 12, 5, 13, 6, 14, 7, 15);
#else
  float e[kVec], o[kVec], a[kVec], b[kVec];
  __builtin_memcpy(e, &even, sizeof(e));
  __builtin_memcpy(o, &odd, sizeof(o));
  for (int m = 0; m < kVec / 2; ++m) {
    a[2 * m] = e[m];
    a[2 * m + 1] = o[m];
    b[2 * m] = e[kVec / 2 + m];
    b[2 * m + 1] = o[kVec / 2 + m];
  }
  __builtin_memcpy(&lo, a, sizeof(lo));
  __builtin_memcpy(&hi, b, sizeof(hi));
#endif
}

inline vfloat load_weights(const int8_t* w) {
  // Sign-extend and convert with the variant's instructions: gcc 12 scalarizes the generic
  // vector conversion of int8 to float (measured 15x slower than float32 panels).
#if defined(__x86_64__) && KILN_VEC_FLOATS == 16
  if constexpr (kVec == 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    vfloat v;
    __builtin_memcpy(&v, &f, sizeof(v));
    return v;
  }
#endif
#if defined(__x86_64__) && KILN_VEC_FLOATS == 8
  if constexpr (kVec == 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    vfloat v;
    __builtin_memcpy(&v, &f, sizeof(v));
    return v;
  }
#endif
  vint8 b;
  __builtin_memcpy(&b, w, sizeof(b));
  return __builtin_convertvector(__builtin_convertvector(b, vi32), vfloat);
}

// bfloat16 panels go through load_bf16_pair (two vectors at a time).
template <typename W> constexpr bool kSplitBf16 = false;
template <> constexpr bool kSplitBf16<uint16_t> = true;
static_assert(kTileVecs % 2 == 0, "bfloat16 panels load tile vectors in pairs");

// R rows x kTileCols columns: w points at the tile's first column in its panel (row stride
// kPanelWidth); `cols` of the tile's columns are stored (fewer in the last panel), each times
// its scale where scale is not null (int8 weights).
template <int R, typename W>
inline void panel_tile(int64_t K, const float* x, int64_t sx, const W* w, const float* scale,
                       float* out, int64_t so, int64_t cols) {
  vfloat acc[R][kTileVecs];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < kTileVecs; ++j) acc[r][j] = vfloat{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const W* wk = w + k * kPanelWidth;
    vfloat wv[kTileVecs];
    if constexpr (kSplitBf16<W>) {
      // wv[2i], wv[2i + 1]: the even and odd columns of tile columns [2i kVec, (2i + 2) kVec).
#pragma GCC unroll 8
      for (int i = 0; i < kTileVecs / 2; ++i) {
        load_bf16_pair(wk + 2 * i * kVec, wv[2 * i], wv[2 * i + 1]);
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVecs; ++j) wv[j] = load_weights(wk + j * kVec);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * sx + k];
#pragma GCC unroll 8
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] += xv * wv[j];
    }
  }
  if constexpr (kSplitBf16<W>) {
    // Back to column order; each output is still its own chain of multiply-adds over k in
    // order, so the bits are those of the one-vector widening, at every row count.
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int i = 0; i < kTileVecs / 2; ++i) {
        interleave_pair(acc[r][2 * i], acc[r][2 * i + 1], acc[r][2 * i], acc[r][2 * i + 1]);
      }
    }
  }
  if (scale != nullptr) {
    vfloat sv[kTileVecs];
    float padded[kTileCols] = {};
    for (int64_t c = 0; c < cols; ++c) padded[c] = scale[c];
    __builtin_memcpy(sv, padded, sizeof(sv));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVecs; ++j) acc[r][j] *= sv[j];
    }
  }
  if (cols == kTileCols) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < kTileVecs; ++j) {
        __builtin_memcpy(out + r * so + j * kVec, &acc[r][j], sizeof(vfloat));
      }
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    float row[kTileCols];
    __builtin_memcpy(row, acc[r], sizeof(row));
    for (int64_t c = 0; c < cols; ++c) out[r * so + c] = row[c];
  }
}

template <int R, typename W>
inline void panel_rows(int64_t M, int64_t K, const float* x, int64_t sx, const W* w,
                       const float* scale, float* out, int64_t so, int64_t cols) {
  if constexpr (R > 0) {
    if (M == R) {
      panel_tile<R>(K, x, sx, w, scale, out, so, cols);
    } else {
      panel_rows<R - 1>(M, K, x, sx, w, scale, out, so, cols);
    }
  }
}

template <typename W>
void panel_linear_t(int64_t p0, int64_t p1, int64_t M, int64_t K, int64_t N, const float* x,
                    int64_t sx, const W* panels, const float* scale, float* out, int64_t so) {
  for (int64_t p = p0; p < p1; ++p) {
    const W* panel = panels + p * K * kPanelWidth;
    for (int64_t t = 0; t < kPanelWidth; t += kTileCols) {
      const int64_t n = p * kPanelWidth + t;
      if (n >= N) break;
      const int64_t cols = N - n < kTileCols ? N - n : kTileCols;
      const float* sc = scale != nullptr ? scale + n : nullptr;
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) {
        panel_tile<kTileRows>(K, x + m * sx, sx, panel + t, sc, out + m * so + n, so, cols);
      }
      if (m < M) {
        panel_rows<kTileRows - 1>(M - m, K, x + m * sx, sx, panel + t, sc, out + m * so + n,
                                  so, cols);
      }
    }
  }
}

void panel_linear(int64_t p0, int64_t p1, int64_t M, int64_t K, int64_t N, const float* x,
                  int64_t sx, PanelType wt, const void* panels, const float* scale, float* out,
                  int64_t so) {
  switch (wt) {
    case PanelType::kFloat32:
      panel_linear_t(p0, p1, M, K, N, x, sx, static_cast<const float*>(panels), scale, out, so);
      break;
    case PanelType::kBFloat16:
      panel_linear_t(p0, p1, M, K, N, x, sx, static_cast<const uint16_t*>(panels), scale, out,
                     so);
      break;
    case PanelType::kInt8:
      panel_linear_t(p0, p1, M, K, N, x, sx, static_cast<const int8_t*>(panels), scale, out, so);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// decode attention (one new query per sequence against its own cached keys and values)

// Asks for the rows of the next block while this one is computed: a head's rows in a block are
// one short run (block x d floats), and the hardware prefetcher does not follow the jump to the
// next block's run on its own.
inline void prefetch_rows(const float* p, int64_t rows, int64_t d, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t e = 0; e < d; e += 16) __builtin_prefetch(p + r * stride + e);
  }
}

// One query head against positions [0, len): scores in s, then out = softmax(s) @ V. Position l
// lives in cache block table[l / block] at row l % block (a contiguous cache is one block per
// sequence: block >= len). The arithmetic per position, and its order, does not depend on the
// blocks: with block a multiple of 4 a paged cache gives the contiguous result bit for bit. D is
// the head size when it is one of the common ones (a compile-time trip count lets the dot
// products and the output accumulator live in registers), else 0 and d says it.
template <int D>
inline void attend_head(int64_t len, int64_t d_runtime, const float* qh, const float* kj,
                        const float* vj, const int64_t* table, int64_t sc_block, int64_t block,
                        int64_t sc_pos, float scale, float* s, float* oh) {
  const int64_t d = D > 0 ? D : d_runtime;
  float best = -3.0e38f;
  for (int64_t b0 = 0; b0 < len; b0 += block) {
    const int64_t n = len - b0 < block ? len - b0 : block;
    const float* kb = kj + table[b0 / block] * sc_block;
    if (b0 + block < len) {
      const int64_t next = len - b0 - block < block ? len - b0 - block : block;
      prefetch_rows(kj + table[b0 / block + 1] * sc_block, next, d, sc_pos);
    }
    float* sb = s + b0;
    int64_t l = 0;
    // Four positions at a time: four independent sums keep the multiply-add units busy while
    // each one's lanes are added up. Which positions share a group depends on the length only.
    for (; l + 4 <= n; l += 4) {
      const float* k0 = kb + l * sc_pos;
      const float* k1 = k0 + sc_pos;
      const float* k2 = k1 + sc_pos;
      const float* k3 = k2 + sc_pos;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int64_t e = 0; e < d; ++e) {
        const float qe = qh[e];
        d0 += qe * k0[e];
        d1 += qe * k1[e];
        d2 += qe * k2[e];
        d3 += qe * k3[e];
      }
      sb[l] = d0 * scale;
      sb[l + 1] = d1 * scale;
      sb[l + 2] = d2 * scale;
      sb[l + 3] = d3 * scale;
    }
    for (; l < n; ++l) {
      const float* kl = kb + l * sc_pos;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < d; ++e) dot += qh[e] * kl[e];
      sb[l] = dot * scale;
    }
  }
  for (int64_t l = 0; l < len; ++l) best = s[l] > best ? s[l] : best;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t l = 0; l < len; ++l) {
    s[l] = exp_acc(s[l] - best);
    total += s[l];
  }
  const float inv = 1.0f / total;
  if constexpr (D > 0) {
    float acc[D];
#pragma omp simd
    for (int e = 0; e < D; ++e) acc[e] = 0.0f;
    for (int64_t b0 = 0; b0 < len; b0 += block) {
      const int64_t n = len - b0 < block ? len - b0 : block;
      const float* vb = vj + table[b0 / block] * sc_block;
      if (b0 + block < len) {
        const int64_t next = len - b0 - block < block ? len - b0 - block : block;
        prefetch_rows(vj + table[b0 / block + 1] * sc_block, next, d, sc_pos);
      }
      for (int64_t l = 0; l < n; ++l) {
        const float p = s[b0 + l];
        const float* vl = vb + l * sc_pos;
#pragma omp simd
        for (int e = 0; e < D; ++e) acc[e] += p * vl[e];
      }
    }
#pragma omp simd
    for (int e = 0; e < D; ++e) oh[e] = acc[e] * inv;
  } else {
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) oh[e] = 0.0f;
    for (int64_t b0 = 0; b0 < len; b0 += block) {
      const int64_t n = len - b0 < block ? len - b0 : block;
      const float* vb = vj + table[b0 / block] * sc_block;
      if (b0 + block < len) {
        const int64_t next = len - b0 - block < block ? len - b0 - block : block;
        prefetch_rows(vj + table[b0 / block + 1] * sc_block, next, d, sc_pos);
      }
      for (int64_t l = 0; l < n; ++l) {
        const float p = s[b0 + l];
        const float* vl = vb + l * sc_pos;
#pragma omp simd
        for (int64_t e = 0; e < d; ++e) oh[e] += p * vl[e];
      }
    }
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) oh[e] *= inv;
  }
}

void decode_attention(int64_t u0, int64_t u1, int64_t kv_heads, int64_t group, int64_t d,
                      const float* q, int64_t sq_tok, int64_t sq_head, const float* k,
                      const float* v, int64_t sc_block, int64_t sc_head, int64_t sc_pos,
                      int64_t block, const int64_t* tables, int64_t s_table,
                      const int64_t* lengths, float scale, float* scratch, int64_t s_scratch,
                      float* out, int64_t so_tok, int64_t so_head) {
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t t = u / kv_heads, j = u % kv_heads, len = lengths[t];
    const int64_t* table = tables + t * s_table;
    const float* kj = k + j * sc_head;
    const float* vj = v + j * sc_head;
    float* scores = scratch + (u - u0) * group * s_scratch;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = j * group + g;
      const float* qh = q + t * sq_tok + h * sq_head;
      float* s = scores + g * s_scratch;
      float* oh = out + t * so_tok + h * so_head;
      switch (d) {
        case 32:
          attend_head<32>(len, d, qh, kj, vj, table, sc_block, block, sc_pos, scale, s, oh);
          break;
        case 64:
          attend_head<64>(len, d, qh, kj, vj, table, sc_block, block, sc_pos, scale, s, oh);
          break;
        case 128:
          attend_head<128>(len, d, qh, kj, vj, table, sc_block, block, sc_pos, scale, s, oh);
          break;
        default:
          attend_head<0>(len, d, qh, kj, vj, table, sc_block, block, sc_pos, scale, s, oh);
          break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// W8A8 linear

#include "int8_impl.h"

// ---------------------------------------------------------------------------------------------
// type-erased entry points (the table holds these)

#define KILN_DISPATCH(dt, CALL)                  \
  switch (dt) {                                  \
    case DType::kFloat32: { using T = float; CALL; break; }  \
    case DType::kBFloat16: { using T = bf16; CALL; break; }  \
    case DType::kFloat16: { using T = f16; CALL; break; }    \
    case DType::kFloat64: { using T = double; CALL; break; } \
  }

void add_rms_norm(DType dt, int64_t r0, int64_t r1, int64_t n, double eps, const void* x,
                  int64_t sx, const void* res, int64_t sres, void* ro, int64_t sro,
                  const void* w, void* out, int64_t so) {
  KILN_DISPATCH(dt, add_rms_norm_t<T>(r0, r1, n, eps, static_cast<const T*>(x), sx,
                                      static_cast<const T*>(res), sres, static_cast<T*>(ro), sro,
                                      static_cast<const T*>(w), static_cast<T*>(out), so))
}

void rms_norm_backward(DType dt, int64_t r0, int64_t r1, int64_t n, double eps, const void* g,
                       int64_t sg, const void* z, int64_t sz, const void* w, const void* gres,
                       int64_t sgr, void* gz, int64_t sgz, void* dw) {
  KILN_DISPATCH(dt, rms_norm_backward_t<T>(r0, r1, n, eps, static_cast<const T*>(g), sg,
                                           static_cast<const T*>(z), sz,
                                           static_cast<const T*>(w),
                                           static_cast<const T*>(gres), sgr,
                                           static_cast<T*>(gz), sgz,
                                           static_cast<acc_t<T>*>(dw)))
}

void silu_and_mul(DType dt, int64_t r0, int64_t r1, int64_t d, const void* x, int64_t sx,
                  void* out, int64_t so) {
  KILN_DISPATCH(dt, silu_and_mul_t<T>(r0, r1, d, static_cast<const T*>(x), sx,
                                      static_cast<T*>(out), so))
}

void silu_and_mul_backward(DType dt, int64_t r0, int64_t r1, int64_t d, const void* g,
                           int64_t sg, const void* x, int64_t sx, void* gx, int64_t sgx) {
  KILN_DISPATCH(dt, silu_and_mul_backward_t<T>(r0, r1, d, static_cast<const T*>(g), sg,
                                               static_cast<const T*>(x), sx,
                                               static_cast<T*>(gx), sgx))
}

void rotary(DType dt, int64_t t0, int64_t t1, const int64_t* positions, void* q, int64_t sq_tok,
            int64_t sq_head, int64_t nq, void* k, int64_t sk_tok, int64_t sk_head, int64_t nk,
            int64_t rot_dim, const void* cache, int64_t s_cache, bool neox, bool inverse) {
  KILN_DISPATCH(dt, rotary_t<T>(t0, t1, positions, static_cast<T*>(q), sq_tok, sq_head, nq,
                                static_cast<T*>(k), sk_tok, sk_head, nk, rot_dim,
                                static_cast<const T*>(cache), s_cache, neox, inverse))
}

void int8_linear(DType dt, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                 const int8_t* w, int64_t sw, const float* scale, const void* bias, void* out,
                 int64_t so) {
  KILN_DISPATCH(dt, int8_linear_t<T>(n0, n1, M, K, x, w, sw, scale,
                                     static_cast<const T*>(bias), static_cast<T*>(out), so))
}

#undef KILN_DISPATCH

#define KILN_STR2(x) #x
#define KILN_STR(x) KILN_STR2(x)

const Kernels kTable = {
    KILN_STR(KILN_ISA), &add_rms_norm, &rms_norm_backward, &silu_and_mul,
    &silu_and_mul_backward, &rotary, &int8_linear, &panel_linear, &decode_attention,
    {KILN_STR(KILN_ISA), &quantize_rows_int8, &w8a8_panels, 1},
};

}  // namespace

const Kernels& kernels() { return kTable; }

}  // namespace kiln::cpu::KILN_ISA
