// Host entry points of the CUDA kernels (kernels.cu): raw pointers, element strides and a stream,
// no torch header, so kernels.cu compiles with nvcc alone. Each launches asynchronously on
// `stream` and returns the launch's error (cudaSuccess when none).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_types.h"

namespace kiln::cuda {

// z = x (+ residual); residual_out = z; out = z * rsqrt(mean(z^2) + eps) * w. One block per row.
cudaError_t add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x, int64_t sx,
                         const void* residual, int64_t sres, void* residual_out, int64_t sro,
                         const void* weight, void* out, int64_t so, cudaStream_t stream);

// grad_z (+ grad_residual) row by row, then grad_w (of the weight's dtype, length n) column by
// column from the rows' rstd kept in `rstd` (float for float32/bfloat16, double for float64; rows).
cudaError_t rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* grad,
                              int64_t sg, const void* z, int64_t sz, const void* weight,
                              const void* grad_residual, int64_t sgr, void* grad_z, int64_t sgz,
                              void* grad_w, void* rstd, cudaStream_t stream);

cudaError_t silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx, void* out,
                         int64_t so, cudaStream_t stream);

cudaError_t silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* grad, int64_t sg,
                                  const void* x, int64_t sx, void* grad_x, int64_t sgx,
                                  cudaStream_t stream);

// Tokens whose position is outside [0, max_pos) are left as they are (checking on the host
// would need a device sync).
cudaError_t rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                   int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                   int64_t sk_head, int64_t nk, int64_t rot_dim, const void* cache,
                   int64_t s_cache, bool neox, bool inverse, cudaStream_t stream);

// M <= 8 rows: one warp per output feature streams its int8 weight row once.
cudaError_t int8_linear(DType dt, int64_t M, int64_t N, int64_t K, const float* x, const int8_t* w,
                        int64_t sw, const float* scale, const void* bias, void* out, int64_t so,
                        cudaStream_t stream);

}  // namespace kiln::cuda
