// Argument checks and row views shared by the CPU and CUDA bindings: every op checks shapes,
// dtypes and devices here, so both devices raise the same clear errors.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <optional>

#include <cstdint>
#include <vector>

namespace kiln {

inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "kiln::", op, ": ", name,
              " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
}

// `t` must share dtype and device with `ref` (the op's main input).
inline void check_like(const char* op, const char* name, const at::Tensor& t,
                       const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "kiln::", op, ": ", name, " is on ", t.device(),
              " but ", ref_name, " is on ", ref.device(), "; move them to one device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "kiln::", op, ": ", name, " is ",
              t.scalar_type(), " but ", ref_name, " is ", ref.scalar_type(),
              "; the kernels need one dtype");
}

inline void check_device(const char* op, const at::Tensor& t, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, "kiln::", op, ": expected a ", device,
              " tensor here, got one on ", t.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "kiln::", op, ": ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// Outputs and in-place targets: no two elements may share memory, and no two of them may overlap.
inline void check_writable(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "kiln::", op, ": ", name,
              " has elements that share memory (an expanded tensor?); pass one it owns");
}

inline void check_no_overlap(const char* op, const char* a_name, const at::Tensor& a,
                             const char* b_name, const at::Tensor& b) {
  auto s = at::get_overlap_status(a, b);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, "kiln::", op,
              ": ", a_name, " and ", b_name, " overlap in memory; pass separate tensors");
}

// The rows of a [..., n] tensor as (pointer, count, stride), when one stride walks them all and
// the last dimension is dense. Otherwise `ok` is false and the caller works on a copy.
struct Rows {
  bool ok = false;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t stride = 0;
};

inline Rows as_rows(const at::Tensor& t) {
  Rows r;
  const int64_t nd = t.dim();
  r.n = t.size(nd - 1);
  r.rows = r.n == 0 ? 0 : t.numel() / r.n;
  if (t.stride(nd - 1) != 1 && r.n != 1) return r;
  int64_t row_stride = -1, expect = 0;
  for (int64_t d = nd - 2; d >= 0; --d) {
    const int64_t size = t.size(d), stride = t.stride(d);
    if (size == 1) continue;
    if (row_stride < 0) {
      row_stride = stride;
    } else if (stride != expect) {
      return r;
    }
    expect = stride * size;
  }
  r.stride = row_stride < 0 ? r.n : row_stride;
  r.ok = true;
  return r;
}

// A readable [..., n] tensor in row form: itself when possible, else a contiguous copy.
inline at::Tensor rows_readable(const at::Tensor& t) { return as_rows(t).ok ? t : t.contiguous(); }

// ----------------------------------------------------------------------------------------------
// per-op checks (shared by both devices)

inline void check_norm_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            double eps) {
  check_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "kiln::", op, ": x must have at least one dimension");
  check_like(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "kiln::", op,
              ": weight must have shape [", x.size(-1), "] (the last dimension of x), got ",
              weight.sizes());
  TORCH_CHECK(eps >= 0, "kiln::", op, ": eps must be >= 0, got ", eps);
}

inline void check_silu_args(const char* op, const at::Tensor& x) {
  check_dtype(op, "x", x);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "kiln::", op,
              ": the last dimension of x holds [gate, up] and must be even, got shape ",
              x.sizes());
}

inline std::vector<int64_t> silu_out_shape(const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() /= 2;
  return shape;
}

// positions [*T]; query [*T, Hq, D]; key [*T, Hk, D]; cos_sin_cache [max_pos, rot_dim].
inline void check_rotary_args(const char* op, const at::Tensor& positions, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& cache) {
  check_dtype(op, "query", q);
  check_like(op, "key", k, "query", q);
  check_like(op, "cos_sin_cache", cache, "query", q);
  TORCH_CHECK(positions.scalar_type() == at::kLong, "kiln::", op,
              ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.device() == q.device(), "kiln::", op, ": positions are on ",
              positions.device(), " but query is on ", q.device());
  const int64_t pd = positions.dim();
  TORCH_CHECK(q.dim() == pd + 2 && k.dim() == pd + 2, "kiln::", op,
              ": query and key must be [*positions.shape, heads, head_size]; positions ",
              positions.sizes(), ", query ", q.sizes(), ", key ", k.sizes());
  for (int64_t d = 0; d < pd; ++d) {
    TORCH_CHECK(q.size(d) == positions.size(d) && k.size(d) == positions.size(d), "kiln::", op,
                ": query ", q.sizes(), " and key ", k.sizes(), " must start with positions' shape ",
                positions.sizes());
  }
  TORCH_CHECK(q.size(-1) == k.size(-1), "kiln::", op, ": query head_size ", q.size(-1),
              " differs from key head_size ", k.size(-1));
  TORCH_CHECK(cache.dim() == 2, "kiln::", op, ": cos_sin_cache must be [max_position, rot_dim], got ",
              cache.sizes());
  const int64_t rot = cache.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot > 0 && rot <= q.size(-1), "kiln::", op,
              ": cos_sin_cache's rot_dim (", rot, ") must be even and at most head_size (",
              q.size(-1), ")");
}

// The error both devices raise for a rotary position outside the cos_sin_cache.
[[noreturn]] inline void fail_position(int64_t index, int64_t position, int64_t max_pos) {
  TORCH_CHECK(false, "kiln::rotary_embedding: position ", position, " (index ", index,
              ") is outside the cos_sin_cache's ", max_pos, " positions");
  __builtin_unreachable();
}

// Raises for the first position of a contiguous CPU int64 tensor outside [0, max_pos).
inline void check_positions_on_host(const at::Tensor& positions, int64_t max_pos) {
  const int64_t* p = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.numel(); ++t) {
    if (p[t] < 0 || p[t] >= max_pos) fail_position(t, p[t], max_pos);
  }
}

// x [..., K] float32/bfloat16/float16; weight int8 [N, K]; scale float32 [N]; bias [N] of x's
// dtype.
inline void check_int8_linear_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "kiln::", op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kChar, "kiln::", op, ": weight must be int8, got ",
              w.scalar_type(), " (quantize it with kernels.reference.quantize_int8)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "kiln::", op, ": scale must be float32, got ",
              scale.scalar_type());
  TORCH_CHECK(w.device() == x.device() && scale.device() == x.device(), "kiln::", op,
              ": x, weight and scale must be on one device; got ", x.device(), ", ", w.device(),
              ", ", scale.device());
  TORCH_CHECK(x.dim() >= 1, "kiln::", op, ": x must have at least one dimension");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "kiln::", op,
              ": weight must be [out_features, ", x.size(-1), "], got ", w.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == w.size(0), "kiln::", op,
              ": scale must be [", w.size(0), "] (one per output feature), got ", scale.sizes());
  if (bias.has_value()) {
    check_like(op, "bias", *bias, "x", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "kiln::", op, ": bias must be [",
                w.size(0), "], got ", bias->sizes());
  }
}

inline std::vector<int64_t> int8_linear_out_shape(const at::Tensor& x, const at::Tensor& w) {
  auto shape = x.sizes().vec();
  shape.back() = w.size(0);
  return shape;
}

}  // namespace kiln
