// Host entry points of the CUDA kernels (kernels.cu): raw pointers, element strides and a stream,
// no torch header, so kernels.cu compiles with nvcc alone. Each launches asynchronously on
// `stream` and returns the launch's error (cudaSuccess when none); a dtype with no kernel
// returns cudaErrorInvalidValue and launches nothing. Counts and strides are 64-bit: the kernels
// walk rows with grid-stride loops, so any row count runs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_types.h"

namespace kiln::cuda {

// z = x (+ residual); residual_out = z; out = z * rsqrt(mean(z^2) + eps) * w. One block per row;
// rows up to 16384 bf16 / 8192 float elements are read from global memory once.
cudaError_t add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x, int64_t sx,
                         const void* residual, int64_t sres, void* residual_out, int64_t sro,
                         const void* weight, void* out, int64_t so, cudaStream_t stream);

// How many row splits the weight gradient of rms_norm_backward uses (enough blocks to fill the
// GPU): the caller allocates `partial` as splits x n accumulators.
int64_t rms_norm_backward_weight_splits(int64_t rows, int64_t n);

// grad_z (+ grad_residual) row by row, then grad_w (of the weight's dtype, length n) from the
// rows' rstd kept in `rstd` (rows accumulators) and per-split sums in `partial` (splits x n
// accumulators), added in a fixed order. Accumulators are float for float32/bfloat16/float16
// and double for float64.
cudaError_t rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* grad,
                              int64_t sg, const void* z, int64_t sz, const void* weight,
                              const void* grad_residual, int64_t sgr, void* grad_z, int64_t sgz,
                              void* grad_w, void* rstd, void* partial, int64_t splits,
                              cudaStream_t stream);

cudaError_t silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx, void* out,
                         int64_t so, cudaStream_t stream);

cudaError_t silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* grad, int64_t sg,
                                  const void* x, int64_t sx, void* grad_x, int64_t sgx,
                                  cudaStream_t stream);

// The caller checks that positions lie in [0, max_pos) before launching (ops_cuda.cpp); where it
// cannot (CUDA graph capture), a token with a position outside gets NaN in its rotated features.
cudaError_t rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                   int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                   int64_t sk_head, int64_t nk, int64_t rot_dim, const void* cache,
                   int64_t s_cache, bool neox, bool inverse, cudaStream_t stream);

// int8 linear for M <= kInt8RowsKernelMaxRows rows (decode): one warp per output feature streams
// its int8 weight row once; x is float32 [M, K], contiguous.
constexpr int kInt8RowsKernelMaxRows = 8;
cudaError_t int8_linear_rows(DType dt, int64_t M, int64_t N, int64_t K, const float* x,
                             const int8_t* w, int64_t sw, const float* scale, const void* bias,
                             void* out, int64_t so, cudaStream_t stream);

// int8 linear for any M (prefill): 64 x 64 output tiles, the weights converted tile by tile in
// shared memory, float accumulation (tensor cores for bfloat16/float16 on sm_80+), one rounding.
// x [M, K] of dt with row stride sx.
cudaError_t int8_linear_tiled(DType dt, int64_t M, int64_t N, int64_t K, const void* x,
                              int64_t sx, const int8_t* w, int64_t sw, const float* scale,
                              const void* bias, void* out, int64_t so, cudaStream_t stream);

// Single-query attention over a paged KV cache ([blocks, kv_heads, block, d] keys and values):
// out[t, h] = softmax(scale * q[t, h] . K) @ V over positions < lengths[t] of sequence t, position
// l at row l % block of block tables[t * s_table + l / block]. Batch-invariant; lengths and
// tables stay on the device (no host check: bad ones give NaN).
cudaError_t paged_decode_attention(DType dt, int64_t batch, int64_t heads, int64_t kv_heads,
                                   int64_t d, const void* q, int64_t sq_tok, int64_t sq_head,
                                   const void* k, const void* v, int64_t sc_block,
                                   int64_t sc_head, int64_t sc_pos, int64_t block, int64_t blocks,
                                   const int64_t* tables, int64_t s_table, const int64_t* lengths,
                                   double scale, void* out, int64_t so_tok, int64_t so_head,
                                   cudaStream_t stream);

}  // namespace kiln::cuda
