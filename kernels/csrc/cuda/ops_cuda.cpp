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

// paged_decode_attention on the GPU: shapes and dtypes checked here; block tables and lengths
// stay on the device (reading them would sync, and a CUDA graph cannot capture a sync), so bad
// entries give NaN outputs instead of an error.
void check_paged_cuda(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& tables, const at::Tensor& lengths) {
  check_dtype(op, "query", q);
  check_like(op, "key_cache", k, "query", q);
  check_like(op, "value_cache", v, "query", q);
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong &&
                  tables.device() == q.device() && lengths.device() == q.device(),
              "kiln::", op, ": block_tables and lengths must be int64 on ", q.device(), ", got ",
              tables.scalar_type(), " on ", tables.device(), " and ", lengths.scalar_type(),
              " on ", lengths.device());
  TORCH_CHECK(q.dim() == 3, "kiln::", op, ": query must be [batch, heads, head_dim], got ",
              q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(3) == D, "kiln::", op,
              ": key_cache and value_cache must both be [blocks, kv_heads, block_size, ", D,
              "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.strides() == v.strides() && k.stride(3) == 1, "kiln::", op,
              ": key_cache and value_cache must share strides with contiguous head_dim, got ",
              k.strides(), " and ", v.strides());
  TORCH_CHECK(k.size(1) > 0 && Hq % k.size(1) == 0 && k.size(2) > 0, "kiln::", op,
              ": query heads (", Hq, ") must be a multiple of kv heads (", k.size(1), ")");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lengths.dim() == 1 &&
                  lengths.size(0) == B,
              "kiln::", op, ": block_tables must be [", B, ", blocks per sequence] and lengths [",
              B, "], got ", tables.sizes(), " and ", lengths.sizes());
}

void paged_attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& tables, const at::Tensor& lengths, double scale,
                          const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor tc = tables.contiguous(), lc = lengths.contiguous();
  const bool direct = out.stride(2) == 1;
  at::Tensor o = direct ? out : at::empty(out.sizes(), out.options());
  check_launch(cuda::paged_decode_attention(
                   dtype_of(q), q.size(0), q.size(1), k.size(1), q.size(2), qc.const_data_ptr(),
                   qc.stride(0), qc.stride(1), k.const_data_ptr(), v.const_data_ptr(),
                   k.stride(0), k.stride(1), k.stride(2), k.size(2), k.size(0),
                   tc.const_data_ptr<int64_t>(), tc.size(1), lc.const_data_ptr<int64_t>(), scale,
                   o.mutable_data_ptr(), o.stride(0), o.stride(1), stream()),
               "paged_decode_attention");
  if (!direct) out.copy_(o);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& tables, const at::Tensor& lengths,
                                  double scale) {
  check_paged_cuda("paged_decode_attention", q, k, v, tables, lengths);
  at::Tensor out = at::empty(q.sizes(), q.options());
  paged_attention_into(q, k, v, tables, lengths, scale, out);
  return out;
}

void paged_decode_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& tables, const at::Tensor& lengths,
                                double scale, const at::Tensor& out) {
  constexpr const char* op = "paged_decode_attention_out";
  check_paged_cuda(op, q, k, v, tables, lengths);
  check_like(op, "out", out, "query", q);
  check_shape(op, "out", out, q.sizes());
  check_writable(op, "out", out);
  check_no_overlap(op, "out", out, "query", q);
  check_no_overlap(op, "out", out, "key_cache", k);
  check_no_overlap(op, "out", out, "value_cache", v);
  paged_attention_into(q, k, v, tables, lengths, scale, out);
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln, CUDA, m) {
  kiln::Ops<kiln::CudaBackend>::register_all(m);
  m.impl("paged_decode_attention", &kiln::paged_decode_attention);
  m.impl("paged_decode_attention_out", &kiln::paged_decode_attention_out);
}
