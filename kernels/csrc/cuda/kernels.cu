// CUDA kernels of the kiln ops. Plain CUDA (no torch header): nvcc -c compiles this file on any
// machine with the toolkit, which is how CI checks it without a GPU. Arithmetic in float for
// float32/bfloat16 and in double for float64, one rounding at the end, as on the CPU.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"

namespace kiln::cuda {
namespace {

using bf16 = __nv_bfloat16;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }
__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

constexpr int kBlock = 256;  // threads per row block; a multiple of the warp size

// Sum over the block; every thread gets the result. `shared` holds one value per warp.
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
// rms_norm

template <typename T>
__global__ void add_rms_norm_kernel(int64_t n, acc_t<T> eps, const T* x, int64_t sx, const T* res,
                                    int64_t sres, T* ro, int64_t sro, const T* w, T* out,
                                    int64_t so) {
  using A = acc_t<T>;
  __shared__ A shared[kBlock / 32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * sx;
  const T* z = xr;
  A ss = 0;
  if (res != nullptr) {
    const T* rr = res + r * sres;
    T* ror = ro + r * sro;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      T zt = from_acc<T>(to_acc(xr[i]) + to_acc(rr[i]));
      ror[i] = zt;
      A zv = to_acc(zt);
      ss += zv * zv;
    }
    z = ror;  // each thread reads back only what it wrote itself
  } else {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      A zv = to_acc(xr[i]);
      ss += zv * zv;
    }
  }
  const A rstd = rsqrt_acc(block_sum(ss, shared) / static_cast<A>(n) + eps);
  T* outr = out + r * so;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    outr[i] = from_acc<T>(to_acc(z[i]) * rstd * to_acc(w[i]));
  }
}

template <typename T>
__global__ void rms_norm_backward_rows_kernel(int64_t n, acc_t<T> eps, const T* g, int64_t sg,
                                              const T* z, int64_t sz, const T* w, const T* gres,
                                              int64_t sgr, T* gz, int64_t sgz, acc_t<T>* rstd_out) {
  using A = acc_t<T>;
  __shared__ A shared[kBlock / 32];
  const int64_t r = blockIdx.x;
  const T* gr = g + r * sg;
  const T* zr = z + r * sz;
  A ss = 0, dot = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A zv = to_acc(zr[i]);
    ss += zv * zv;
    dot += to_acc(gr[i]) * to_acc(w[i]) * zv;
  }
  ss = block_sum(ss, shared);
  dot = block_sum(dot, shared);
  const A inv_n = A(1) / static_cast<A>(n);
  const A rstd = rsqrt_acc(ss * inv_n + eps);
  const A c = dot * rstd * rstd * rstd * inv_n;
  if (threadIdx.x == 0) rstd_out[r] = rstd;
  T* gzr = gz + r * sgz;
  const T* grr = gres != nullptr ? gres + r * sgr : nullptr;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    A v = to_acc(gr[i]) * to_acc(w[i]) * rstd - to_acc(zr[i]) * c;
    if (grr != nullptr) v += to_acc(grr[i]);
    gzr[i] = from_acc<T>(v);
  }
}

// grad_w[j] = sum over rows of g[r, j] * z[r, j] * rstd[r]: 32 columns per block, 8 row lanes.
template <typename T>
__global__ void rms_norm_backward_weight_kernel(int64_t rows, int64_t n, const T* g, int64_t sg,
                                                const T* z, int64_t sz, const acc_t<T>* rstd,
                                                T* gw) {
  using A = acc_t<T>;
  __shared__ A part[8][33];
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  A acc = 0;
  if (j < n) {
    for (int64_t r = threadIdx.y; r < rows; r += blockDim.y) {
      acc += to_acc(g[r * sg + j]) * to_acc(z[r * sz + j]) * rstd[r];
    }
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < n) {
    A total = 0;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += part[y][threadIdx.x];
    gw[j] = from_acc<T>(total);
  }
}

// ---------------------------------------------------------------------------------------------
// silu_and_mul

template <typename T>
__global__ void silu_and_mul_kernel(int64_t rows, int64_t d, const T* x, int64_t sx, T* out,
                                    int64_t so) {
  using A = acc_t<T>;
  const int64_t total = rows * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / d, i = idx - r * d;
    const T* a = x + r * sx;
    A av = to_acc(a[i]);
    A silu = av / (A(1) + exp_acc(-av));
    out[r * so + i] = from_acc<T>(silu * to_acc(a[d + i]));
  }
}

template <typename T>
__global__ void silu_and_mul_backward_kernel(int64_t rows, int64_t d, const T* g, int64_t sg,
                                             const T* x, int64_t sx, T* gx, int64_t sgx) {
  using A = acc_t<T>;
  const int64_t total = rows * d;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / d, i = idx - r * d;
    const T* a = x + r * sx;
    A av = to_acc(a[i]), bv = to_acc(a[d + i]), gv = to_acc(g[r * sg + i]);
    A s = A(1) / (A(1) + exp_acc(-av));
    gx[r * sgx + i] = from_acc<T>(gv * bv * s * (A(1) + av * (A(1) - s)));
    gx[r * sgx + d + i] = from_acc<T>(gv * av * s);
  }
}

// ---------------------------------------------------------------------------------------------
// rotary embedding: one block per token, its threads over (head, pair)

template <typename T>
__global__ void rotary_kernel(const int64_t* positions, int64_t max_pos, T* q, int64_t sq_tok,
                              int64_t sq_head, int64_t nq, T* k, int64_t sk_tok, int64_t sk_head,
                              int64_t nk, int64_t rot, const T* cache, int64_t s_cache, bool neox,
                              bool inverse) {
  using A = acc_t<T>;
  const int64_t t = blockIdx.x;
  const int64_t pos = positions[t];
  if (pos < 0 || pos >= max_pos) return;
  const int64_t half = rot / 2;
  const T* cos = cache + pos * s_cache;
  const T* sin = cos + half;
  const A sign = inverse ? A(-1) : A(1);
  for (int64_t idx = threadIdx.x; idx < (nq + nk) * half; idx += blockDim.x) {
    const int64_t h = idx / half, i = idx - h * half;
    T* p = h < nq ? q + t * sq_tok + h * sq_head : k + t * sk_tok + (h - nq) * sk_head;
    const int64_t i1 = neox ? i : 2 * i, i2 = neox ? i + half : 2 * i + 1;
    A c = to_acc(cos[i]), s = sign * to_acc(sin[i]);
    A x1 = to_acc(p[i1]), x2 = to_acc(p[i2]);
    p[i1] = from_acc<T>(x1 * c - x2 * s);
    p[i2] = from_acc<T>(x2 * c + x1 * s);
  }
}

// ---------------------------------------------------------------------------------------------
// int8 linear (decode): a warp per output feature, up to 8 rows of x at once

constexpr int kMaxRows = 8;

template <typename T>
__global__ void int8_linear_kernel(int64_t M, int64_t N, int64_t K, const float* x,
                                   const int8_t* w, int64_t sw, const float* scale, const T* bias,
                                   T* out, int64_t so) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y;
  if (n >= N) return;
  const int lane = threadIdx.x;
  const int8_t* wn = w + n * sw;
  float acc[kMaxRows] = {0, 0, 0, 0, 0, 0, 0, 0};
  // Four weights per load where the row allows it.
  const bool vec = (K % 4 == 0) && (reinterpret_cast<uintptr_t>(wn) % 4 == 0);
  if (vec) {
    const char4* w4 = reinterpret_cast<const char4*>(wn);
    for (int64_t k4 = lane; k4 < K / 4; k4 += 32) {
      const char4 v = w4[k4];
      const float w0 = v.x, w1 = v.y, w2 = v.z, w3 = v.w;
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
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
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < M) acc[m] += x[m * K + kk] * wv;
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    float v = acc[m];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0 && m < M) {
      float y = v * scale[n];
      if (bias != nullptr) y += to_acc(bias[n]);
      out[m * so + n] = from_acc<T>(y);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch on dtype

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(bf16{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

int grid_for(int64_t total) {
  const int64_t blocks = (total + kBlock - 1) / kBlock;
  return static_cast<int>(blocks < 65535 * 8 ? (blocks < 1 ? 1 : blocks) : 65535 * 8);
}

}  // namespace

cudaError_t add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x, int64_t sx,
                         const void* residual, int64_t sres, void* residual_out, int64_t sro,
                         const void* weight, void* out, int64_t so, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    add_rms_norm_kernel<T><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
        n, static_cast<acc_t<T>>(eps), static_cast<const T*>(x), sx,
        static_cast<const T*>(residual), sres, static_cast<T*>(residual_out), sro,
        static_cast<const T*>(weight), static_cast<T*>(out), so);
  });
  return cudaGetLastError();
}

cudaError_t rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* grad,
                              int64_t sg, const void* z, int64_t sz, const void* weight,
                              const void* grad_residual, int64_t sgr, void* grad_z, int64_t sgz,
                              void* grad_w, void* rstd, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    rms_norm_backward_rows_kernel<T><<<static_cast<unsigned>(rows), kBlock, 0, stream>>>(
        n, static_cast<A>(eps), static_cast<const T*>(grad), sg, static_cast<const T*>(z), sz,
        static_cast<const T*>(weight), static_cast<const T*>(grad_residual), sgr,
        static_cast<T*>(grad_z), sgz, static_cast<A*>(rstd));
    err = cudaGetLastError();
    if (err != cudaSuccess) return;
    const dim3 block(32, 8);
    const unsigned grid = static_cast<unsigned>((n + 31) / 32);
    rms_norm_backward_weight_kernel<T><<<grid, block, 0, stream>>>(
        rows, n, static_cast<const T*>(grad), sg, static_cast<const T*>(z), sz,
        static_cast<const A*>(rstd), static_cast<T*>(grad_w));
    err = cudaGetLastError();
  });
  return err;
}

cudaError_t silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx, void* out,
                         int64_t so, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_kernel<T><<<grid_for(rows * d), kBlock, 0, stream>>>(
        rows, d, static_cast<const T*>(x), sx, static_cast<T*>(out), so);
  });
  return cudaGetLastError();
}

cudaError_t silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* grad, int64_t sg,
                                  const void* x, int64_t sx, void* grad_x, int64_t sgx,
                                  cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_backward_kernel<T><<<grid_for(rows * d), kBlock, 0, stream>>>(
        rows, d, static_cast<const T*>(grad), sg, static_cast<const T*>(x), sx,
        static_cast<T*>(grad_x), sgx);
  });
  return cudaGetLastError();
}

cudaError_t rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                   int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                   int64_t sk_head, int64_t nk, int64_t rot_dim, const void* cache,
                   int64_t s_cache, bool neox, bool inverse, cudaStream_t stream) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<static_cast<unsigned>(tokens), 128, 0, stream>>>(
        positions, max_pos, static_cast<T*>(q), sq_tok, sq_head, nq, static_cast<T*>(k), sk_tok,
        sk_head, nk, rot_dim, static_cast<const T*>(cache), s_cache, neox, inverse);
  });
  return cudaGetLastError();
}

cudaError_t int8_linear(DType dt, int64_t M, int64_t N, int64_t K, const float* x, const int8_t* w,
                        int64_t sw, const float* scale, const void* bias, void* out, int64_t so,
                        cudaStream_t stream) {
  if (M > kMaxRows) return cudaErrorInvalidValue;
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    const dim3 block(32, 8);  // 8 output features per block
    const unsigned grid = static_cast<unsigned>((N + 7) / 8);
    int8_linear_kernel<T><<<grid, block, 0, stream>>>(M, N, K, x, w, sw, scale,
                                                      static_cast<const T*>(bias),
                                                      static_cast<T*>(out), so);
  });
  return cudaGetLastError();
}

}  // namespace kiln::cuda
