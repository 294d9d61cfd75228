// CUDA registration of the kiln ops: the shared tensor-level code (ops_impl.h) over a backend
// that launches the kernels of kernels.cu on torch's current stream. Built only when torch is a
// CUDA build; CI compiles it with `g++ -fsyntax-only` (see tests/kernels/test_kernels_build.py).
#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../ops_impl.h"
#include "launchers.h"

namespace kiln {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "kiln: launching the CUDA kernel of ", what, " failed: ",
              cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

struct CudaBackend {
  static constexpr c10::DeviceType kDevice = c10::kCUDA;
  using Guard = c10::cuda::CUDAGuard;
  static constexpr int64_t kInt8KernelMaxRows = cuda::kInt8RowsKernelMaxRows;
  static constexpr bool kInt8Tiled = true;  // above that, the tiled kernel (no dequantized copy)

  static void add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x,
                           int64_t sx, const void* res, int64_t sres, void* ro, int64_t sro,
                           const void* w, void* out, int64_t so) {
    check_launch(cuda::add_rms_norm(dt, rows, n, eps, x, sx, res, sres, ro, sro, w, out, so,
                                    stream()),
                 "rms_norm");
  }

  static void rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* g,
                                int64_t sg, const void* z, int64_t sz, const void* w,
                                const void* gres, int64_t sgr, void* gz, int64_t sgz,
                                const at::Tensor& grad_w) {
    const auto acc = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
    const int64_t splits = cuda::rms_norm_backward_weight_splits(rows, n);
    at::Tensor rstd = at::empty({rows}, grad_w.options().dtype(acc));
    at::Tensor partial = at::empty({splits, n}, grad_w.options().dtype(acc));
    check_launch(cuda::rms_norm_backward(dt, rows, n, eps, g, sg, z, sz, w, gres, sgr, gz, sgz,
                                         grad_w.mutable_data_ptr(), rstd.mutable_data_ptr(),
                                         partial.mutable_data_ptr(), splits, stream()),
                 "rms_norm_backward");
  }

  static void silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx,
                           void* out, int64_t so) {
    check_launch(cuda::silu_and_mul(dt, rows, d, x, sx, out, so, stream()), "silu_and_mul");
  }

  static void silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* g, int64_t sg,
                                    const void* x, int64_t sx, void* gx, int64_t sgx) {
    check_launch(cuda::silu_and_mul_backward(dt, rows, d, g, sg, x, sx, gx, sgx, stream()),
                 "silu_and_mul_backward");
  }

  // The CPU's error, checked on the host: the positions' min and max come back in one small
  // copy (a sync). While the current stream captures a CUDA graph no sync is allowed; the kernel
  // then writes NaN into the rotated features of a token whose position is outside the cache.
  static void check_positions(const at::Tensor& positions, int64_t max_pos) {
    if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
      return;
    }
    auto [lo, hi] = at::aminmax(positions);
    const at::Tensor bounds = at::stack({lo, hi}).cpu();
    const int64_t* b = bounds.const_data_ptr<int64_t>();
    if (b[0] >= 0 && b[1] < max_pos) return;
    check_positions_on_host(positions.cpu(), max_pos);  // finds the first one, and raises
  }

  static void rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                     int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                     int64_t sk_head, int64_t nk, int64_t rot, const void* cache,
                     int64_t s_cache, bool neox, bool inverse) {
    check_launch(cuda::rotary(dt, tokens, positions, max_pos, q, sq_tok, sq_head, nq, k, sk_tok,
                              sk_head, nk, rot, cache, s_cache, neox, inverse, stream()),
                 "rotary_embedding");
  }

  static void int8_linear(DType dt, int64_t M, int64_t N, int64_t K, const float* x,
                          const int8_t* w, int64_t sw, const float* scale, const void* bias,
                          void* out, int64_t so) {
    check_launch(cuda::int8_linear_rows(dt, M, N, K, x, w, sw, scale, bias, out, so, stream()),
                 "int8_linear");
  }

  static void int8_linear_tiled(DType dt, int64_t M, int64_t N, int64_t K, const void* x,
                                int64_t sx, const int8_t* w, int64_t sw, const float* scale,
                                const void* bias, void* out, int64_t so) {
    check_launch(cuda::int8_linear_tiled(dt, M, N, K, x, sx, w, sw, scale, bias, out, so,
                                         stream()),
                 "int8_linear");
  }
};

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln, CUDA, m) { kiln::Ops<kiln::CudaBackend>::register_all(m); }
