// The tensor-level ops, written once for both devices: checks, outputs, row views and the copies
// that non-contiguous arguments need, around a Backend that runs the kernels on raw pointers
// (CpuBackend in cpu/ops_cpu.cpp, CudaBackend in cuda/ops_cuda.cpp). register_ops<Backend>
// registers them all for the backend's dispatch key.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "kernel_types.h"

namespace kiln {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "kiln: unsupported dtype ", t.scalar_type());
  }
}


template <typename B>
struct Ops {
  using Guard = typename B::Guard;

  static void check_device(const char* op, const at::Tensor& t) {
    kiln::check_device(op, t, B::kDevice);
  }

  // Runs fn(tensor, rows) on a row view of an in-place or output tensor; when it cannot be walked
  // with one row stride, on a contiguous copy that is written back afterwards.
  template <typename F>
  static void with_writable_rows(const at::Tensor& t, F&& fn) {
    Rows r = as_rows(t);
    if (r.ok) {
      fn(t, r);
      return;
    }
    at::Tensor tmp = t.contiguous();
    fn(tmp, as_rows(tmp));
    t.copy_(tmp);
  }

  // ------------------------------------------------------------------------------------------
  // rms_norm and fused_add_rms_norm

  // Every form in one: residual null means plain rms_norm; residual_out == residual in place.
  static void add_rms_norm_into(const at::Tensor& x, const at::Tensor* residual,
                                const at::Tensor* residual_out, const at::Tensor& weight,
                                double eps, const at::Tensor& out) {
    const at::Tensor xr = rows_readable(x);
    const at::Tensor w = weight.contiguous();
    const Rows rx = as_rows(xr);
    if (rx.rows == 0 || rx.n == 0) return;
    const DType dt = dtype_of(x);
    with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
      auto run = [&](const void* res, int64_t sres, void* rot, int64_t sro) {
        B::add_rms_norm(dt, rx.rows, rx.n, eps, xr.const_data_ptr(), rx.stride, res, sres, rot,
                        sro, w.const_data_ptr(), o.mutable_data_ptr(), ro.stride);
      };
      if (residual == nullptr) {
        run(nullptr, 0, nullptr, 0);
      } else if (residual->is_same(*residual_out)) {
        // In place: the kernel reads each residual element just before overwriting it.
        with_writable_rows(*residual_out, [&](const at::Tensor& rt, Rows rr) {
          run(rt.const_data_ptr(), rr.stride, rt.mutable_data_ptr(), rr.stride);
        });
      } else {
        const at::Tensor res = rows_readable(*residual);
        const int64_t sres = as_rows(res).stride;
        with_writable_rows(*residual_out, [&](const at::Tensor& rt, Rows rr) {
          run(res.const_data_ptr(), sres, rt.mutable_data_ptr(), rr.stride);
        });
      }
    });
  }

  // The norm reads a whole row before writing it: out may be x itself, not a shifted view of it.
  static void check_out_vs_input(const char* op, const at::Tensor& out, const at::Tensor& x) {
    TORCH_CHECK(out.is_same(x) || at::get_overlap_status(out, x) != at::MemOverlapStatus::Partial,
                "kiln::", op, ": out partly overlaps x; pass x itself or a separate tensor");
  }

  static at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_norm_args("rms_norm", x, weight, eps);
    check_device("rms_norm", x);
    Guard guard(x.device());
    at::Tensor out = at::empty(x.sizes(), x.options());
    add_rms_norm_into(x, nullptr, nullptr, weight, eps, out);
    return out;
  }

  static void rms_norm_out(const at::Tensor& x, const at::Tensor& weight, double eps,
                           const at::Tensor& out) {
    const char* op = "rms_norm_out";
    check_norm_args(op, x, weight, eps);
    check_device(op, x);
    check_like(op, "out", out, "x", x);
    check_shape(op, "out", out, x.sizes());
    check_writable(op, "out", out);
    check_out_vs_input(op, out, x);
    Guard guard(x.device());
    add_rms_norm_into(x, nullptr, nullptr, weight, eps, out);
  }

  static void check_fused_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                               const at::Tensor& weight, double eps) {
    check_norm_args(op, x, weight, eps);
    check_device(op, x);
    check_like(op, "residual", residual, "x", x);
    check_shape(op, "residual", residual, x.sizes());
  }

  static std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x,
                                                               const at::Tensor& residual,
                                                               const at::Tensor& weight,
                                                               double eps) {
    check_fused_args("fused_add_rms_norm", x, residual, weight, eps);
    Guard guard(x.device());
    at::Tensor out = at::empty(x.sizes(), x.options());
    at::Tensor residual_out = at::empty(x.sizes(), x.options());
    add_rms_norm_into(x, &residual, &residual_out, weight, eps, out);
    return {out, residual_out};
  }

  // residual += x; x = rms_norm(residual) * weight.
  static void fused_add_rms_norm_(const at::Tensor& x, const at::Tensor& residual,
                                  const at::Tensor& weight, double eps) {
    const char* op = "fused_add_rms_norm_";
    check_fused_args(op, x, residual, weight, eps);
    check_writable(op, "x", x);
    check_writable(op, "residual", residual);
    check_no_overlap(op, "x", x, "residual", residual);
    Guard guard(x.device());
    add_rms_norm_into(x, &residual, &residual, weight, eps, x);
  }

  // residual += x; out = rms_norm(residual) * weight.
  static void fused_add_rms_norm_out(const at::Tensor& x, const at::Tensor& residual,
                                     const at::Tensor& weight, double eps, const at::Tensor& out) {
    const char* op = "fused_add_rms_norm_out";
    check_fused_args(op, x, residual, weight, eps);
    check_like(op, "out", out, "x", x);
    check_shape(op, "out", out, x.sizes());
    check_writable(op, "out", out);
    check_writable(op, "residual", residual);
    check_no_overlap(op, "out", out, "residual", residual);
    check_no_overlap(op, "x", x, "residual", residual);
    check_out_vs_input(op, out, x);
    Guard guard(x.device());
    add_rms_norm_into(x, &residual, &residual, weight, eps, out);
  }

  static std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
      const at::Tensor& grad, const at::Tensor& z, const at::Tensor& weight, double eps,
      const std::optional<at::Tensor>& grad_residual) {
    const char* op = "rms_norm_backward";
    check_norm_args(op, z, weight, eps);
    check_device(op, z);
    check_like(op, "grad", grad, "z", z);
    check_shape(op, "grad", grad, z.sizes());
    if (grad_residual.has_value()) {
      check_like(op, "grad_residual", *grad_residual, "z", z);
      check_shape(op, "grad_residual", *grad_residual, z.sizes());
    }
    Guard guard(z.device());
    const at::Tensor g = rows_readable(grad), zr = rows_readable(z), w = weight.contiguous();
    const at::Tensor gres =
        grad_residual.has_value() ? rows_readable(*grad_residual) : at::Tensor();
    const Rows rg = as_rows(g), rz = as_rows(zr);
    const Rows rgr = gres.defined() ? as_rows(gres) : Rows{};
    at::Tensor grad_z = at::empty(z.sizes(), z.options());
    at::Tensor grad_w = at::zeros({rz.n}, weight.options());
    if (rz.rows == 0 || rz.n == 0) return {grad_z, grad_w};
    B::rms_norm_backward(dtype_of(z), rz.rows, rz.n, eps, g.const_data_ptr(), rg.stride,
                         zr.const_data_ptr(), rz.stride, w.const_data_ptr(),
                         gres.defined() ? gres.const_data_ptr() : nullptr, rgr.stride,
                         grad_z.mutable_data_ptr(), rz.n, grad_w);
    return {grad_z, grad_w};
  }

  // ------------------------------------------------------------------------------------------
  // silu_and_mul

  static void silu_and_mul_into(const at::Tensor& x, const at::Tensor& out) {
    const at::Tensor xr = rows_readable(x);
    const Rows rx = as_rows(xr);
    const int64_t d = rx.n / 2;
    if (rx.rows == 0 || d == 0) return;
    with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
      B::silu_and_mul(dtype_of(x), rx.rows, d, xr.const_data_ptr(), rx.stride,
                      o.mutable_data_ptr(), ro.stride);
    });
  }

  static at::Tensor silu_and_mul(const at::Tensor& x) {
    check_silu_args("silu_and_mul", x);
    check_device("silu_and_mul", x);
    Guard guard(x.device());
    at::Tensor out = at::empty(silu_out_shape(x), x.options());
    silu_and_mul_into(x, out);
    return out;
  }

  static void silu_and_mul_out(const at::Tensor& x, const at::Tensor& out) {
    const char* op = "silu_and_mul_out";
    check_silu_args(op, x);
    check_device(op, x);
    check_like(op, "out", out, "x", x);
    check_shape(op, "out", out, silu_out_shape(x));
    check_writable(op, "out", out);
    check_no_overlap(op, "out", out, "x", x);
    Guard guard(x.device());
    silu_and_mul_into(x, out);
  }

  static at::Tensor silu_and_mul_backward(const at::Tensor& grad, const at::Tensor& x) {
    const char* op = "silu_and_mul_backward";
    check_silu_args(op, x);
    check_device(op, x);
    check_like(op, "grad", grad, "x", x);
    check_shape(op, "grad", grad, silu_out_shape(x));
    Guard guard(x.device());
    const at::Tensor g = rows_readable(grad), xr = rows_readable(x);
    const Rows rg = as_rows(g), rx = as_rows(xr);
    at::Tensor grad_x = at::empty(x.sizes(), x.options());
    const int64_t d = rx.n / 2;
    if (rx.rows == 0 || d == 0) return grad_x;
    B::silu_and_mul_backward(dtype_of(x), rx.rows, d, g.const_data_ptr(), rg.stride,
                             xr.const_data_ptr(), rx.stride, grad_x.mutable_data_ptr(), 2 * d);
    return grad_x;
  }

  // ------------------------------------------------------------------------------------------
  // rotary embedding

  // [*T, H, D] as (tokens, token stride, head stride), when one token stride walks every token.
  struct Heads {
    bool ok = false;
    int64_t tokens = 1, s_tok = 0, s_head = 0, heads = 0;
  };

  static Heads as_heads(const at::Tensor& t) {
    Heads h;
    const int64_t nd = t.dim();
    if (t.stride(nd - 1) != 1 && t.size(nd - 1) != 1) return h;
    h.heads = t.size(nd - 2);
    h.s_head = t.stride(nd - 2);
    int64_t tok_stride = -1, expect = 0;
    for (int64_t d = nd - 3; d >= 0; --d) {
      h.tokens *= t.size(d);
      if (t.size(d) == 1) continue;
      if (tok_stride < 0) {
        tok_stride = t.stride(d);
      } else if (t.stride(d) != expect) {
        return h;
      }
      expect = t.stride(d) * t.size(d);
    }
    h.s_tok = tok_stride < 0 ? 0 : tok_stride;
    h.ok = true;
    return h;
  }

  static void rotary_inplace(const at::Tensor& positions, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& cache, bool neox,
                             bool inverse) {
    const at::Tensor pos = positions.contiguous();
    const at::Tensor c = cache.stride(1) == 1 ? cache : cache.contiguous();
    if (pos.numel() == 0) return;
    // Both devices raise the same error for a position outside the cache (CUDA checks on the
    // host, one small copy, except while capturing a CUDA graph: see CudaBackend).
    B::check_positions(pos, c.size(0));
    const bool q_ok = as_heads(q).ok, k_ok = as_heads(k).ok;
    const at::Tensor qq = q_ok ? q : q.contiguous();
    const at::Tensor kk = k_ok ? k : k.contiguous();
    const Heads hq = as_heads(qq), hk = as_heads(kk);
    B::rotary(dtype_of(q), pos.numel(), pos.const_data_ptr<int64_t>(), c.size(0),
              qq.mutable_data_ptr(), hq.s_tok, hq.s_head, hq.heads, kk.mutable_data_ptr(),
              hk.s_tok, hk.s_head, hk.heads, c.size(1), c.const_data_ptr(), c.stride(0), neox,
              inverse);
    if (!q_ok) q.copy_(qq);
    if (!k_ok) k.copy_(kk);
  }

  static void check_rotary(const char* op, const at::Tensor& positions, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& cache) {
    check_rotary_args(op, positions, q, k, cache);
    check_device(op, q);
  }

  static void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& cache, bool is_neox) {
    const char* op = "rotary_embedding_";
    check_rotary(op, positions, q, k, cache);
    check_writable(op, "query", q);
    check_writable(op, "key", k);
    check_no_overlap(op, "query", q, "key", k);
    Guard guard(q.device());
    rotary_inplace(positions, q, k, cache, is_neox, false);
  }

  static std::tuple<at::Tensor, at::Tensor> rotary_functional(
      const char* op, const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& cache, bool is_neox, bool inverse) {
    check_rotary(op, positions, q, k, cache);
    Guard guard(q.device());
    at::Tensor qo = q.clone(at::MemoryFormat::Contiguous);
    at::Tensor ko = k.clone(at::MemoryFormat::Contiguous);
    rotary_inplace(positions, qo, ko, cache, is_neox, inverse);
    return {qo, ko};
  }

  static std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions,
                                                             const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& cache,
                                                             bool is_neox) {
    return rotary_functional("rotary_embedding", positions, q, k, cache, is_neox, false);
  }

  // The rotation is orthogonal: its gradient is the rotation by the opposite angle.
  static std::tuple<at::Tensor, at::Tensor> rotary_embedding_backward(
      const at::Tensor& positions, const at::Tensor& grad_q, const at::Tensor& grad_k,
      const at::Tensor& cache, bool is_neox) {
    return rotary_functional("rotary_embedding_backward", positions, grad_q, grad_k, cache,
                             is_neox, true);
  }

  // ------------------------------------------------------------------------------------------
  // weight-only int8 linear

  static void int8_linear_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                               const std::optional<at::Tensor>& bias, const at::Tensor& out) {
    const int64_t K = x.size(-1), N = w.size(0);
    if (out.numel() == 0) return;
    if (K == 0) {  // an empty sum: each output is its bias, or zero
      if (bias.has_value()) {
        out.copy_(bias->expand(out.sizes()));
      } else {
        out.zero_();
      }
      return;
    }
    const int64_t M = x.numel() / K;
    const at::Tensor sc = scale.contiguous();
    const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
    const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
    const DType dt = dtype_of(x);
    if (M <= B::kInt8KernelMaxRows) {
      // Few rows (decode, small batches): the kernel streams the int8 weights once.
      const at::Tensor xf = x.to(at::kFloat).contiguous();
      with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
        B::int8_linear(dt, M, N, K, xf.const_data_ptr<float>(), wc.const_data_ptr<int8_t>(),
                       wc.stride(0), sc.const_data_ptr<float>(),
                       bc.defined() ? bc.const_data_ptr() : nullptr, o.mutable_data_ptr(),
                       ro.stride);
      });
    } else if constexpr (B::kInt8Tiled) {
      // Many rows (prefill): the backend's tiled kernel, weights converted tile by tile.
      const at::Tensor xr = rows_readable(x);
      const Rows rx = as_rows(xr);
      with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
        B::int8_linear_tiled(dt, M, N, K, xr.const_data_ptr(), rx.stride,
                             wc.const_data_ptr<int8_t>(), wc.stride(0), sc.const_data_ptr<float>(),
                             bc.defined() ? bc.const_data_ptr() : nullptr, o.mutable_data_ptr(),
                             ro.stride);
      });
    } else {
      // Many rows without a tiled kernel: dequantize and multiply in float (compute-bound), then
      // scale and bias in float and one rounding, as the kernels and the reference do.
      at::Tensor y = at::matmul(x.to(at::kFloat), wc.to(at::kFloat).t());
      y.mul_(sc);
      if (bc.defined()) y.add_(bc.to(at::kFloat));
      out.copy_(y);
    }
  }

  static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
    check_int8_linear_args("int8_linear", x, w, scale, bias);
    check_device("int8_linear", x);
    Guard guard(x.device());
    at::Tensor out = at::empty(int8_linear_out_shape(x, w), x.options());
    int8_linear_into(x, w, scale, bias, out);
    return out;
  }

  static void int8_linear_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias, const at::Tensor& out) {
    const char* op = "int8_linear_out";
    check_int8_linear_args(op, x, w, scale, bias);
    check_device(op, x);
    check_like(op, "out", out, "x", x);
    check_shape(op, "out", out, int8_linear_out_shape(x, w));
    check_writable(op, "out", out);
    check_no_overlap(op, "out", out, "x", x);
    Guard guard(x.device());
    int8_linear_into(x, w, scale, bias, out);
  }

  static void register_all(torch::Library& m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("rms_norm_out", &rms_norm_out);
    m.impl("rms_norm_backward", &rms_norm_backward);
    m.impl("fused_add_rms_norm", &fused_add_rms_norm);
    m.impl("fused_add_rms_norm_", &fused_add_rms_norm_);
    m.impl("fused_add_rms_norm_out", &fused_add_rms_norm_out);
    m.impl("silu_and_mul", &silu_and_mul);
    m.impl("silu_and_mul_out", &silu_and_mul_out);
    m.impl("silu_and_mul_backward", &silu_and_mul_backward);
    m.impl("rotary_embedding", &rotary_embedding);
    m.impl("rotary_embedding_", &rotary_embedding_);
    m.impl("rotary_embedding_backward", &rotary_embedding_backward);
    m.impl("int8_linear", &int8_linear);
    m.impl("int8_linear_out", &int8_linear_out);
  }
};

// For backends whose kernels run on the current thread's device (CPU).
struct NoGuard {
  explicit NoGuard(c10::Device) {}
};

}  // namespace kiln
