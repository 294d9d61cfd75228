// CUDA kernels of the kiln ops. Plain CUDA (no torch header): nvcc -c compiles this file on any
// machine with the toolkit, which is how CI checks it without a GPU. Arithmetic in float for
// float32/bfloat16/float16 and in double for float64, one rounding at the end, as on the CPU.
//
// Row counts, token counts and element offsets are 64-bit throughout: every kernel walks its rows
// with a grid-stride loop, so a launch never needs more blocks than the hardware allows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;
using f16 = __half;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(f16 v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_acc<f16>(float v) { return __float2half_rn(v); }

template <typename A> __device__ __forceinline__ A nan_acc();
template <> __device__ __forceinline__ float nan_acc<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double nan_acc<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }
__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// W elements of T loaded or stored as one access: 16 bytes (8 bf16/f16, 4 float, 2 double) where
// every row the kernel touches is 16-byte aligned and the row length a multiple of W, else one.
template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load_pack(const T* p, int64_t i) {
  return reinterpret_cast<const Pack<T, W>*>(p)[i];
}
template <typename T, int W>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, W>& v) {
  reinterpret_cast<Pack<T, W>*>(p)[i] = v;
}

constexpr int kMaxThreads = 512;  // per block in the row kernels; __launch_bounds__ below
// Blocks launched for grid-stride loops over rows: enough to fill any GPU many times over.
constexpr int64_t kMaxGrid = int64_t{1} << 20;

unsigned grid_of(int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks < kMaxGrid ? blocks : kMaxGrid));
}

// Sum over the block; every thread gets the result. `shared` holds one value per warp (32).
template <typename A>
__device__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A total = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += shared[i];
  return total;
}

// ---------------------------------------------------------------------------------------------
// rms_norm (with or without the residual add): one block per row, in a grid-stride loop.
//
// With C > 0 each thread keeps its C packs of the row in registers between the sum of squares
// and the output, so the row is read from global memory once; the host picks C so that
// blockDim.x * C packs cover the row. C == 0 is the fallback for rows too long for that: the
// second pass reads the row again (mostly from L2).

template <typename T, int W, int C>
__global__ void __launch_bounds__(kMaxThreads)
    add_rms_norm_kernel(int64_t rows, int64_t n, acc_t<T> eps, const T* x, int64_t sx,
                        const T* res, int64_t sres, T* ro, int64_t sro, const T* w, T* out,
                        int64_t so) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  __shared__ A shared[32];
  const int64_t packs = n / W;
  constexpr int kC = C > 0 ? C : 1;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * sx;
    const T* rr = res != nullptr ? res + r * sres : nullptr;
    T* ror = res != nullptr ? ro + r * sro : nullptr;
    A cache[kC][W];
    A ss = 0;
    // z = x (+ residual, rounded to T as stored): its squares, and its values kept or stored.
    auto z_of = [&](int64_t p, A (&zv)[W]) {
      const P xp = load_pack<T, W>(xr, p);
      if (rr != nullptr) {
        const P rp = load_pack<T, W>(rr, p);
        P zp;
#pragma unroll
        for (int e = 0; e < W; ++e) {
          zp.v[e] = from_acc<T>(to_acc(xp.v[e]) + to_acc(rp.v[e]));
          zv[e] = to_acc(zp.v[e]);
        }
        store_pack<T, W>(ror, p, zp);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) zv[e] = to_acc(xp.v[e]);
      }
#pragma unroll
      for (int e = 0; e < W; ++e) ss += zv[e] * zv[e];
    };
    if constexpr (C > 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
        if (p < packs) z_of(p, cache[c]);
      }
    } else {
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) z_of(p, cache[0]);
    }
    const A rstd = rsqrt_acc(block_sum(ss, shared) / static_cast<A>(n) + eps);
    T* outr = out + r * so;
    auto write = [&](int64_t p, const A (&zv)[W]) {
      const P wp = load_pack<T, W>(w, p);
      P op;
#pragma unroll
      for (int e = 0; e < W; ++e) op.v[e] = from_acc<T>(zv[e] * rstd * to_acc(wp.v[e]));
      store_pack<T, W>(outr, p, op);
    };
    if constexpr (C > 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
        if (p < packs) write(p, cache[c]);
      }
    } else {
      // Each thread reads back only what it wrote itself (residual_out), or x.
      const T* z = rr != nullptr ? ror : xr;
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        const P zp = load_pack<T, W>(z, p);
        A zv[W];
#pragma unroll
        for (int e = 0; e < W; ++e) zv[e] = to_acc(zp.v[e]);
        write(p, zv);
      }
    }
  }
}

// Backward, per row: grad_z = g*w*rstd - z*c (+ grad_residual), c = dot(g*w, z) * rstd^3 / n;
// rstd kept per row for the weight gradient. With C > 0 the row's g and z stay in registers.
template <typename T, int W, int C>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_backward_rows_kernel(int64_t rows, int64_t n, acc_t<T> eps, const T* g, int64_t sg,
                                  const T* z, int64_t sz, const T* w, const T* gres, int64_t sgr,
                                  T* gz, int64_t sgz, acc_t<T>* rstd_out) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  __shared__ A shared[32];
  const int64_t packs = n / W;
  constexpr int kC = C > 0 ? C : 1;
  const A inv_n = A(1) / static_cast<A>(n);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gr = g + r * sg;
    const T* zr = z + r * sz;
    A gw_cache[kC][W], z_cache[kC][W];
    A ss = 0, dot = 0;
    auto load = [&](int64_t p, A (&gwv)[W], A (&zv)[W]) {
      const P gp = load_pack<T, W>(gr, p), zp = load_pack<T, W>(zr, p),
              wp = load_pack<T, W>(w, p);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        zv[e] = to_acc(zp.v[e]);
        gwv[e] = to_acc(gp.v[e]) * to_acc(wp.v[e]);
        ss += zv[e] * zv[e];
        dot += gwv[e] * zv[e];
      }
    };
    if constexpr (C > 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(c) * blockDim.x;
        if (p < packs) load(p, gw_cache[c], z_cache[c]);
      }
    } else {
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) load(p, gw_cache[0], z_cache[0]);
    }
    ss = block_sum(ss, shared);
    dot = block_sum(dot, shared);
    const A rstd = rsqrt_acc(ss * inv_n + eps);
    const A c = dot * rstd * rstd * rstd * inv_n;
    if (threadIdx.x == 0) rstd_out[r] = rstd;
    T* gzr = gz + r * sgz;
    const T* grr = gres != nullptr ? gres + r * sgr : nullptr;
    auto write = [&](int64_t p, const A (&gwv)[W], const A (&zv)[W]) {
      P op;
      if (grr != nullptr) {
        const P rp = load_pack<T, W>(grr, p);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          op.v[e] = from_acc<T>(gwv[e] * rstd - zv[e] * c + to_acc(rp.v[e]));
        }
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e) op.v[e] = from_acc<T>(gwv[e] * rstd - zv[e] * c);
      }
      store_pack<T, W>(gzr, p, op);
    };
    if constexpr (C > 0) {
#pragma unroll
      for (int cc = 0; cc < C; ++cc) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(cc) * blockDim.x;
        if (p < packs) write(p, gw_cache[cc], z_cache[cc]);
      }
    } else {
      // The row again (mostly from L2): g * w and z recomputed.
      for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
        A gwv[W], zv[W];
        const P gp = load_pack<T, W>(gr, p), zp = load_pack<T, W>(zr, p),
                wp = load_pack<T, W>(w, p);
#pragma unroll
        for (int e = 0; e < W; ++e) {
          zv[e] = to_acc(zp.v[e]);
          gwv[e] = to_acc(gp.v[e]) * to_acc(wp.v[e]);
        }
        write(p, gwv, zv);
      }
    }
  }
}

// grad_w, stage 1: partial[split, j] = sum over this split's rows of g[r, j] * z[r, j] * rstd[r].
// 32 columns x 8 row lanes per block; blockIdx.y picks the split of the rows, so that hidden
// 4096 (128 column blocks) still launches several blocks per multiprocessor.
template <typename T>
__global__ void rms_norm_backward_weight_partial_kernel(int64_t rows, int64_t n, int64_t splits,
                                                        const T* g, int64_t sg, const T* z,
                                                        int64_t sz, const acc_t<T>* rstd,
                                                        acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A part[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t r0 = rows * split / splits, r1 = rows * (split + 1) / splits;
  A acc = 0;
  if (j < n) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      acc += to_acc(g[r * sg + j]) * to_acc(z[r * sz + j]) * rstd[r];
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    A total = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += part[y][threadIdx.x];
    partial[split * n + j] = total;
  }
}

// grad_w, stage 2: the splits added in order (deterministic), rounded once to T.
template <typename T>
__global__ void rms_norm_backward_weight_sum_kernel(int64_t n, int64_t splits,
                                                    const acc_t<T>* partial, T* gw) {
  using A = acc_t<T>;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A total = 0;
    for (int64_t s = 0; s < splits; ++s) total += partial[s * n + j];
    gw[j] = from_acc<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// silu_and_mul: blockDim.y rows per block, blockDim.x threads over a row's packs. No division
// per element: rows and columns come from the thread and block indices.

template <typename T, int W>
__global__ void silu_and_mul_kernel(int64_t rows, int64_t d, const T* x, int64_t sx, T* out,
                                    int64_t so) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  const int64_t packs = d / W;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* a = x + r * sx;
    const T* b = a + d;
    T* o = out + r * so;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const P ap = load_pack<T, W>(a, p), bp = load_pack<T, W>(b, p);
      P op;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const A av = to_acc(ap.v[e]);
        op.v[e] = from_acc<T>(av / (A(1) + exp_acc(-av)) * to_acc(bp.v[e]));
      }
      store_pack<T, W>(o, p, op);
    }
  }
}

template <typename T, int W>
__global__ void silu_and_mul_backward_kernel(int64_t rows, int64_t d, const T* g, int64_t sg,
                                             const T* x, int64_t sx, T* gx, int64_t sgx) {
  using A = acc_t<T>;
  using P = Pack<T, W>;
  const int64_t packs = d / W;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* a = x + r * sx;
    const T* b = a + d;
    const T* gr = g + r * sg;
    T* ga = gx + r * sgx;
    T* gb = ga + d;
    for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
      const P ap = load_pack<T, W>(a, p), bp = load_pack<T, W>(b, p),
              gp = load_pack<T, W>(gr, p);
      P gap, gbp;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const A av = to_acc(ap.v[e]), bv = to_acc(bp.v[e]), gv = to_acc(gp.v[e]);
        const A s = A(1) / (A(1) + exp_acc(-av));
        gap.v[e] = from_acc<T>(gv * bv * s * (A(1) + av * (A(1) - s)));
        gbp.v[e] = from_acc<T>(gv * av * s);
      }
      store_pack<T, W>(ga, p, gap);
      store_pack<T, W>(gb, p, gbp);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rotary embedding: one block per token (grid-stride), threadIdx.y over heads, threadIdx.x over
// rotated pairs.

template <typename T>
__global__ void rotary_kernel(int64_t tokens, const int64_t* positions, int64_t max_pos, T* q,
                              int64_t sq_tok, int64_t sq_head, int64_t nq, T* k, int64_t sk_tok,
                              int64_t sk_head, int64_t nk, int64_t rot, const T* cache,
                              int64_t s_cache, bool neox, bool inverse) {
  using A = acc_t<T>;
  const int64_t half = rot / 2;
  const A sign = inverse ? A(-1) : A(1);
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t pos = positions[t];
    // The host checks positions before launching; this guard serves launches it cannot check
    // (CUDA graph capture): the token's rotated features become NaN rather than stay unrotated.
    const bool valid = pos >= 0 && pos < max_pos;
    const T* cos = cache + (valid ? pos : 0) * s_cache;
    const T* sin = cos + half;
    for (int64_t h = threadIdx.y; h < nq + nk; h += blockDim.y) {
      T* p = h < nq ? q + t * sq_tok + h * sq_head : k + t * sk_tok + (h - nq) * sk_head;
      for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        const int64_t i1 = neox ? i : 2 * i, i2 = neox ? i + half : 2 * i + 1;
        if (!valid) {
          p[i1] = from_acc<T>(nan_acc<A>());
          p[i2] = from_acc<T>(nan_acc<A>());
          continue;
        }
        const A c = to_acc(cos[i]), s = sign * to_acc(sin[i]);
        const A x1 = to_acc(p[i1]), x2 = to_acc(p[i2]);
        p[i1] = from_acc<T>(x1 * c - x2 * s);
        p[i2] = from_acc<T>(x2 * c + x1 * s);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// int8 linear, decode (M <= 8 rows): a warp per output feature streams its weight row once.

template <typename T>
__global__ void int8_linear_rows_kernel(int64_t M, int64_t N, int64_t K, const float* x,
                                        const int8_t* w, int64_t sw, const float* scale,
                                        const T* bias, T* out, int64_t so) {
  const int lane = threadIdx.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int8_t* wn = w + n * sw;
    float acc[kInt8RowsKernelMaxRows] = {};
    // Four weights per load where the row allows it.
    const bool vec = (K % 4 == 0) && (reinterpret_cast<uintptr_t>(wn) % 4 == 0);
    if (vec) {
      const char4* w4 = reinterpret_cast<const char4*>(wn);
      for (int64_t k4 = lane; k4 < K / 4; k4 += 32) {
        const char4 v = w4[k4];
        const float w0 = v.x, w1 = v.y, w2 = v.z, w3 = v.w;
#pragma unroll
        for (int m = 0; m < kInt8RowsKernelMaxRows; ++m) {
          if (m < M) {
            const float* xm = x + m * K + 4 * k4;
            acc[m] += xm[0] * w0 + xm[1] * w1 + xm[2] * w2 + xm[3] * w3;
          }
        }
      }
    } else {
      for (int64_t kk = lane; kk < K; kk += 32) {
        const float wv = wn[kk];
#pragma unroll
        for (int m = 0; m < kInt8RowsKernelMaxRows; ++m) {
          if (m < M) acc[m] += x[m * K + kk] * wv;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < kInt8RowsKernelMaxRows; ++m) {
      float v = acc[m];
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m < M) {
        float y = v * scale[n];
        if (bias != nullptr) y += to_acc(bias[n]);
        out[m * so + n] = from_acc<T>(y);
      }
    }
  }
}

// int8 linear, many rows (prefill): 64 x 64 output tiles, int8 weights converted to float tile
// by tile in shared memory (never the whole weight), float accumulation, then scale and bias in
// float and one rounding. 256 threads, 4 x 4 outputs each.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16;

template <typename T>
__global__ void __launch_bounds__(256)
    int8_linear_tiled_kernel(int64_t M, int64_t N, int64_t K, const T* x, int64_t sx,
                             const int8_t* w, int64_t sw, const float* scale, const T* bias,
                             T* out, int64_t so) {
  __shared__ __align__(16) float xs[kTileK][kTileM + 4];
  __shared__ __align__(16) float ws[kTileK][kTileN + 4];
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    {
      // Each thread loads one k (consecutive threads: consecutive k) of every 16th row.
      const int kk = tid % kTileK;
      const int64_t k = k0 + kk;
#pragma unroll
      for (int r = tid / kTileK; r < kTileM; r += 256 / kTileK) {
        const int64_t m = m0 + r, n = n0 + r;
        xs[kk][r] = (m < M && k < K) ? static_cast<float>(to_acc(x[m * sx + k])) : 0.0f;
        ws[kk][r] = (n < N && k < K) ? static_cast<float>(w[n * sw + k]) : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&ws[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= N) continue;
      float y = acc[i][j] * scale[n];
      if (bias != nullptr) y += to_acc(bias[n]);
      out[m * so + n] = from_acc<T>(y);
    }
  }
}

// int8 linear, many rows, bfloat16/float16 activations on tensor cores (sm_80+): 64 x 64 output
// tiles, four warps of 32 x 32; the int8 weights become T in shared memory tile by tile (exact:
// every int8 is a bfloat16 and a float16), products accumulate in float, then scale and bias in
// float and one rounding.
constexpr int kMmaK = 32;          // k per shared-memory tile
constexpr int kMmaLd = kMmaK + 8;  // padded row (a multiple of 8 elements, as wmma needs)
constexpr int kMmaOutLd = kTileN + 4;

template <typename T>
__global__ void __launch_bounds__(128)
    int8_linear_mma_kernel(int64_t M, int64_t N, int64_t K, const T* x, int64_t sx,
                           const int8_t* w, int64_t sw, const float* scale, const T* bias, T* out,
                           int64_t so) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T xs[kTileM * kMmaLd];
  __shared__ __align__(32) T ws[kTileN * kMmaLd];
  __shared__ __align__(32) float cs[kTileM * kMmaOutLd];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32 x 32 of the tile
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  for (int64_t k0 = 0; k0 < K; k0 += kMmaK) {
    {
      // Each thread loads one k (a warp: 32 consecutive ones) of every fourth row.
      const int kk = tid % kMmaK;
      const int64_t k = k0 + kk;
#pragma unroll 4
      for (int r = tid / kMmaK; r < kTileM; r += 128 / kMmaK) {
        const int64_t m = m0 + r, n = n0 + r;
        xs[r * kMmaLd + kk] = (m < M && k < K) ? x[m * sx + k] : from_acc<T>(0.0f);
        ws[r * kMmaLd + kk] =
            from_acc<T>((n < N && k < K) ? static_cast<float>(w[n * sw + k]) : 0.0f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      // B = W^T: element (k, n) at ws[n * ld + k], i.e. column-major.
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], xs + (wm + 16 * i) * kMmaLd + kk, kMmaLd);
        wmma::load_matrix_sync(b[i], ws + (wn + 16 * i) * kMmaLd + kk, kMmaLd);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(cs + (wm + 16 * i) * kMmaOutLd + wn + 16 * j, acc[i][j],
                              kMmaOutLd, wmma::mem_row_major);
    }
  }
  __syncthreads();
  for (int lin = tid; lin < kTileM * kTileN; lin += 128) {
    const int r = lin / kTileN, c = lin % kTileN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= M || n >= N) continue;
    float y = cs[r * kMmaOutLd + c] * scale[n];
    if (bias != nullptr) y += to_acc(bias[n]);
    out[m * so + n] = from_acc<T>(y);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// paged decode attention: one block per (sequence t, query head h), in a grid-stride loop.
//
// Scores of positions [0, len) go to shared memory (thread i takes positions i, i + blockDim.x,
// ...; each a dot product over the head in order), the block's max and sum are reduced in a fixed
// tree order, then thread i sums output features i, i + blockDim.x, ... over positions in order.
// Every sum's order depends on len and the launch's fixed block size, not on the batch:
// batch-invariant. Position l is at row l % block of cache block table[l / block]. Nothing is
// checked on the host (no sync, so a CUDA graph can capture it): a length outside
// [1, capacity] or a block id outside the cache gives NaN outputs for that sequence and head.
constexpr int kAttentionThreads = 128;

template <typename A>
__device__ A block_max(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A best = shared[0];
  for (int i = 1; i < static_cast<int>(blockDim.x / 32); ++i) best = fmax(best, shared[i]);
  return best;
}

template <typename T>
__global__ void __launch_bounds__(kAttentionThreads)
paged_decode_attention_kernel(int64_t units, int64_t heads, int64_t group, int64_t d,
                              const T* q, int64_t sq_tok, int64_t sq_head, const T* k,
                              const T* v, int64_t sc_block, int64_t sc_head, int64_t sc_pos,
                              int64_t block, int64_t blocks, const int64_t* tables,
                              int64_t s_table, const int64_t* lengths, int64_t capacity,
                              float scale, T* out, int64_t so_tok, int64_t so_head) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* s = reinterpret_cast<A*>(smem_raw);
  A* red = s + capacity;  // 32 values for the reductions
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t t = u / heads, h = u % heads, j = h / group;
    const int64_t len = lengths[t];
    const int64_t* table = tables + t * s_table;
    const T* qh = q + t * sq_tok + h * sq_head;
    T* oh = out + t * so_tok + h * so_head;
    if (len < 1 || len > capacity) {
      for (int64_t e = threadIdx.x; e < d; e += blockDim.x) oh[e] = from_acc<T>(nan_acc<A>());
      continue;
    }
    A best = -INFINITY;
    bool bad = false;
    for (int64_t l = threadIdx.x; l < len; l += blockDim.x) {
      const int64_t b = table[l / block];
      A dot = 0;
      if (b < 0 || b >= blocks) {
        dot = nan_acc<A>();
        bad = true;
      } else {
        const T* kl = k + b * sc_block + j * sc_head + (l % block) * sc_pos;
        for (int64_t e = 0; e < d; ++e) dot += to_acc(qh[e]) * to_acc(kl[e]);
        dot *= scale;
      }
      s[l] = dot;
      best = fmax(best, dot);
    }
    // A bad block makes every output NaN (fmax drops NaN, so it travels separately).
    const A any_bad = block_sum(static_cast<A>(bad ? 1 : 0), red);
    best = block_max(best, red);
    A part = 0;
    for (int64_t l = threadIdx.x; l < len; l += blockDim.x) {
      const A p = exp_acc(s[l] - best);
      s[l] = p;
      part += p;
    }
    const A total = block_sum(part, red);  // its barriers also publish s[] to every thread
    const A inv = any_bad > 0 ? nan_acc<A>() : static_cast<A>(1) / total;
    for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
      A acc = 0;
      for (int64_t l = 0; l < len; ++l) {
        const int64_t b = table[l / block];
        if (b < 0 || b >= blocks) continue;
        acc += s[l] * to_acc(v[b * sc_block + j * sc_head + (l % block) * sc_pos + e]);
      }
      oh[e] = from_acc<T>(acc * inv);
    }
    __syncthreads();  // s[] is rewritten by the next unit
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch on dtype; false for a dtype this file has no kernels for (nothing is launched)

template <typename F>
bool dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kBFloat16: f(bf16{}); return true;
    case DType::kFloat16: f(f16{}); return true;
    case DType::kFloat64: f(double{}); return true;
  }
  return false;
}

// Launch result: cudaErrorInvalidValue when the dtype had no kernel, else the launch's error.
cudaError_t launched(bool dispatched) {
  return dispatched ? cudaGetLastError() : cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether rows at `p` with element stride `s` can be walked in 16-byte packs of W elements.
template <typename T, int W>
bool packs_ok(const void* p, int64_t s) {
  return p == nullptr || (aligned16(p) && (s * static_cast<int64_t>(sizeof(T))) % 16 == 0);
}

int sm_count() {
  int dev = 0, count = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();  // clear it: this only sizes a launch
    return 132;
  }
  return count;
}

// The architecture of the machine code that runs `kernel` on the current device (80 for
// sm_80, ...), 0 if unknown: the tensor-core int8 kernel is empty when compiled for < sm_80.
template <typename K>
int binary_version(K kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return attr.binaryVersion;
}

// Threads per row block: enough warps for the row's packs, at most kMaxThreads.
int row_threads(int64_t packs, int cache) {
  const int64_t per_thread = cache > 0 ? cache : 1;
  int64_t t = (packs + per_thread - 1) / per_thread;
  t = (t + 31) / 32 * 32;
  return static_cast<int>(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// Launches kernel<T, W, C> for the smallest C in {1, 2, 4, 8, 16} (up to kMaxCache) that keeps
// the row in registers with at most kMaxThreads threads, else C = 0 (two passes).
template <int MaxCache, typename Launch>
void with_row_cache(int64_t packs, Launch&& launch) {
  static_assert(MaxCache >= 1 && MaxCache <= 16, "cache of 1 to 16 packs per thread");
  auto fits = [&](int c) { return packs <= static_cast<int64_t>(kMaxThreads) * c; };
  if (fits(1)) {
    launch(std::integral_constant<int, 1>{}, row_threads(packs, 1));
  } else if (MaxCache >= 2 && fits(2)) {
    launch(std::integral_constant<int, (MaxCache >= 2 ? 2 : 1)>{}, row_threads(packs, 2));
  } else if (MaxCache >= 4 && fits(4)) {
    launch(std::integral_constant<int, (MaxCache >= 4 ? 4 : 1)>{}, row_threads(packs, 4));
  } else if (MaxCache >= 8 && fits(8)) {
    launch(std::integral_constant<int, (MaxCache >= 8 ? 8 : 1)>{}, row_threads(packs, 8));
  } else if (MaxCache >= 16 && fits(16)) {
    launch(std::integral_constant<int, (MaxCache >= 16 ? 16 : 1)>{}, row_threads(packs, 16));
  } else {
    launch(std::integral_constant<int, 0>{}, kMaxThreads);
  }
}

// Packs of W elements a thread keeps in registers per row: 32 values in the forward (z), 16 of
// each of g*w and z in the backward; from 1 to 16 packs.
constexpr int clamp_packs(int p) { return p < 1 ? 1 : (p > 16 ? 16 : p); }
constexpr int forward_cache(int W) { return clamp_packs(32 / W); }
constexpr int backward_cache(int W) { return clamp_packs(16 / W); }

}  // namespace

cudaError_t add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x, int64_t sx,
                         const void* residual, int64_t sres, void* residual_out, int64_t sro,
                         const void* weight, void* out, int64_t so, cudaStream_t stream) {
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    auto run = [&](auto width) {
      constexpr int W = decltype(width)::value;
      with_row_cache<forward_cache(W)>(
          n / W, [&](auto cache, int threads) {
            constexpr int C = decltype(cache)::value;
            add_rms_norm_kernel<T, W, C><<<grid_of(rows), threads, 0, stream>>>(
                rows, n, static_cast<A>(eps), static_cast<const T*>(x), sx,
                static_cast<const T*>(residual), sres, static_cast<T*>(residual_out), sro,
                static_cast<const T*>(weight), static_cast<T*>(out), so);
          });
    };
    const bool vec = n % V == 0 && packs_ok<T, V>(x, sx) && packs_ok<T, V>(residual, sres) &&
                     packs_ok<T, V>(residual_out, sro) && packs_ok<T, V>(weight, 0) &&
                     packs_ok<T, V>(out, so);
    if (vec) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return launched(ok);
}

int64_t rms_norm_backward_weight_splits(int64_t rows, int64_t n) {
  const int64_t col_blocks = (n + 31) / 32;
  const int64_t want = 4 * static_cast<int64_t>(sm_count());  // blocks to fill the GPU
  int64_t splits = (want + col_blocks - 1) / col_blocks;
  // At least 64 rows per split, at most 65535 splits (gridDim.y).
  const int64_t by_rows = rows / 64 > 1 ? rows / 64 : 1;
  if (splits > by_rows) splits = by_rows;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

cudaError_t rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* grad,
                              int64_t sg, const void* z, int64_t sz, const void* weight,
                              const void* grad_residual, int64_t sgr, void* grad_z, int64_t sgz,
                              void* grad_w, void* rstd, void* partial, int64_t splits,
                              cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    auto run = [&](auto width) {
      constexpr int W = decltype(width)::value;
      with_row_cache<backward_cache(W)>(
          n / W, [&](auto cache, int threads) {
            constexpr int C = decltype(cache)::value;
            rms_norm_backward_rows_kernel<T, W, C><<<grid_of(rows), threads, 0, stream>>>(
                rows, n, static_cast<A>(eps), static_cast<const T*>(grad), sg,
                static_cast<const T*>(z), sz, static_cast<const T*>(weight),
                static_cast<const T*>(grad_residual), sgr, static_cast<T*>(grad_z), sgz,
                static_cast<A*>(rstd));
          });
    };
    const bool vec = n % V == 0 && packs_ok<T, V>(grad, sg) && packs_ok<T, V>(z, sz) &&
                     packs_ok<T, V>(weight, 0) && packs_ok<T, V>(grad_residual, sgr) &&
                     packs_ok<T, V>(grad_z, sgz);
    if (vec) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    const dim3 block(32, 8);
    const dim3 grid(static_cast<unsigned>((n + 31) / 32), static_cast<unsigned>(splits));
    rms_norm_backward_weight_partial_kernel<T><<<grid, block, 0, stream>>>(
        rows, n, splits, static_cast<const T*>(grad), sg, static_cast<const T*>(z), sz,
        static_cast<const A*>(rstd), static_cast<A*>(partial));
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    rms_norm_backward_weight_sum_kernel<T><<<grid_of((n + 255) / 256), 256, 0, stream>>>(
        n, splits, static_cast<const A*>(partial), static_cast<T*>(grad_w));
    err = cudaGetLastError();
  });
  return ok ? err : cudaErrorInvalidValue;
}

namespace {

// blockDim for the silu kernels: x over a row's packs (a warp at least), y over rows.
dim3 silu_block(int64_t packs) {
  int tx = 32;
  while (tx < 256 && tx < packs) tx *= 2;
  return dim3(tx, 256 / tx);
}

}  // namespace

cudaError_t silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx, void* out,
                         int64_t so, cudaStream_t stream) {
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool vec = d % V == 0 && packs_ok<T, V>(x, sx) && packs_ok<T, V>(out, so);
    auto run = [&](auto width) {
      constexpr int W = decltype(width)::value;
      const dim3 block = silu_block(d / W);
      silu_and_mul_kernel<T, W><<<grid_of((rows + block.y - 1) / block.y), block, 0, stream>>>(
          rows, d, static_cast<const T*>(x), sx, static_cast<T*>(out), so);
    };
    if (vec) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return launched(ok);
}

cudaError_t silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* grad, int64_t sg,
                                  const void* x, int64_t sx, void* grad_x, int64_t sgx,
                                  cudaStream_t stream) {
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool vec = d % V == 0 && packs_ok<T, V>(grad, sg) && packs_ok<T, V>(x, sx) &&
                     packs_ok<T, V>(grad_x, sgx);
    auto run = [&](auto width) {
      constexpr int W = decltype(width)::value;
      const dim3 block = silu_block(d / W);
      silu_and_mul_backward_kernel<T, W>
          <<<grid_of((rows + block.y - 1) / block.y), block, 0, stream>>>(
              rows, d, static_cast<const T*>(grad), sg, static_cast<const T*>(x), sx,
              static_cast<T*>(grad_x), sgx);
    };
    if (vec) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return launched(ok);
}

cudaError_t rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                   int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                   int64_t sk_head, int64_t nk, int64_t rot_dim, const void* cache,
                   int64_t s_cache, bool neox, bool inverse, cudaStream_t stream) {
  const int64_t half = rot_dim / 2;
  const int bx = half <= 32 ? 32 : (half <= 64 ? 64 : 128);
  const dim3 block(bx, 256 / bx);
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<grid_of(tokens), block, 0, stream>>>(
        tokens, positions, max_pos, static_cast<T*>(q), sq_tok, sq_head, nq, static_cast<T*>(k),
        sk_tok, sk_head, nk, rot_dim, static_cast<const T*>(cache), s_cache, neox, inverse);
  });
  return launched(ok);
}

cudaError_t int8_linear_rows(DType dt, int64_t M, int64_t N, int64_t K, const float* x,
                             const int8_t* w, int64_t sw, const float* scale, const void* bias,
                             void* out, int64_t so, cudaStream_t stream) {
  if (M > kInt8RowsKernelMaxRows) return cudaErrorInvalidValue;
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    const dim3 block(32, 8);  // 8 output features per block
    int8_linear_rows_kernel<T><<<grid_of((N + 7) / 8), block, 0, stream>>>(
        M, N, K, x, w, sw, scale, static_cast<const T*>(bias), static_cast<T*>(out), so);
  });
  return launched(ok);
}

namespace {

// M in chunks of at most 65535 row tiles (gridDim.y).
template <typename T>
void launch_int8_tiled(int64_t M, int64_t N, int64_t K, const T* x, int64_t sx, const int8_t* w,
                       int64_t sw, const float* scale, const T* bias, T* out, int64_t so,
                       cudaStream_t stream) {
  constexpr int64_t kChunk = int64_t{65535} * kTileM;
  const unsigned gx = static_cast<unsigned>((N + kTileN - 1) / kTileN);
  bool mma = false;
  if constexpr (!std::is_same_v<T, float>) {
    mma = binary_version(int8_linear_mma_kernel<T>) >= 80;
  }
  for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
    const int64_t rows = M - m0 < kChunk ? M - m0 : kChunk;
    const dim3 grid(gx, static_cast<unsigned>((rows + kTileM - 1) / kTileM));
    if constexpr (!std::is_same_v<T, float>) {
      if (mma) {
        int8_linear_mma_kernel<T><<<grid, 128, 0, stream>>>(rows, N, K, x + m0 * sx, sx, w, sw,
                                                            scale, bias, out + m0 * so, so);
        continue;
      }
    }
    {
      int8_linear_tiled_kernel<T><<<grid, 256, 0, stream>>>(rows, N, K, x + m0 * sx, sx, w, sw,
                                                            scale, bias, out + m0 * so, so);
    }
  }
}

}  // namespace

cudaError_t int8_linear_tiled(DType dt, int64_t M, int64_t N, int64_t K, const void* x,
                              int64_t sx, const int8_t* w, int64_t sw, const float* scale,
                              const void* bias, void* out, int64_t so, cudaStream_t stream) {
  if ((N + kTileN - 1) / kTileN > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      return;  // unreachable: int8_linear takes no float64 (refused by the argument checks)
    } else {
      launch_int8_tiled<T>(M, N, K, static_cast<const T*>(x), sx, w, sw, scale,
                           static_cast<const T*>(bias), static_cast<T*>(out), so, stream);
    }
  });
  return launched(ok && dt != DType::kFloat64);
}

cudaError_t paged_decode_attention(DType dt, int64_t batch, int64_t heads, int64_t kv_heads,
                                   int64_t d, const void* q, int64_t sq_tok, int64_t sq_head,
                                   const void* k, const void* v, int64_t sc_block,
                                   int64_t sc_head, int64_t sc_pos, int64_t block, int64_t blocks,
                                   const int64_t* tables, int64_t s_table, const int64_t* lengths,
                                   double scale, void* out, int64_t so_tok, int64_t so_head,
                                   cudaStream_t stream) {
  const int64_t units = batch * heads;
  if (units == 0 || d == 0) return cudaSuccess;
  const int64_t capacity = s_table * block;
  cudaError_t err = cudaSuccess;
  const bool ok = dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const size_t bytes = static_cast<size_t>(capacity + 32) * sizeof(A);
    auto kernel = paged_decode_attention_kernel<T>;
    if (bytes > 48 * 1024) {
      // Past the default 48 KiB of dynamic shared memory a kernel must opt in.
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(bytes));
      if (err != cudaSuccess) return;
    }
    kernel<<<grid_of(units), kAttentionThreads, bytes, stream>>>(
        units, heads, heads / kv_heads, d, static_cast<const T*>(q), sq_tok, sq_head,
        static_cast<const T*>(k), static_cast<const T*>(v), sc_block, sc_head, sc_pos, block,
        blocks, tables, s_table, lengths, capacity, static_cast<float>(scale),
        static_cast<T*>(out), so_tok, so_head);
  });
  if (err != cudaSuccess) return err;
  return launched(ok);
}

}  // namespace kiln::cuda
