// CPU bindings of the kiln ops: check arguments, split rows across torch's OpenMP threads
// (at::parallel_for, compiled here with -fopenmp so it uses torch's own libgomp pool), and call
// the kernels of the instruction-set variant chosen at load time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../common.h"
#include "kernels.h"

namespace kiln {
namespace {

using cpu::DType;
using cpu::Kernels;

// ---------------------------------------------------------------------------------------------
// choosing the variant

bool isa_supported(const Kernels& k) {
#if defined(KILN_HAVE_X86_VARIANTS)
  if (&k == &cpu::avx512::kernels()) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  }
  if (&k == &cpu::avx2::kernels()) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#endif
  return &k == &cpu::generic::kernels();
}

// Best first.
std::vector<const Kernels*> all_variants() {
  std::vector<const Kernels*> v;
#if defined(KILN_HAVE_X86_VARIANTS)
  v.push_back(&cpu::avx512::kernels());
  v.push_back(&cpu::avx2::kernels());
#endif
  v.push_back(&cpu::generic::kernels());
  return v;
}

const Kernels* find_variant(const char* name) {
  for (const Kernels* k : all_variants()) {
    if (std::strcmp(k->name, name) == 0) return k;
  }
  return nullptr;
}

const Kernels* best_variant() {
  // KILN_CPU_ISA=avx2 (or generic) forces a lesser variant, for comparisons and bug hunts.
  if (const char* forced = std::getenv("KILN_CPU_ISA"); forced != nullptr && *forced != '\0') {
    const Kernels* k = find_variant(forced);
    if (k != nullptr && isa_supported(*k)) return k;
    TORCH_WARN("kiln: KILN_CPU_ISA=", forced,
               " is unknown or not supported by this CPU; using the best supported variant");
  }
  for (const Kernels* k : all_variants()) {
    if (isa_supported(*k)) return k;
  }
  return &cpu::generic::kernels();
}

std::atomic<const Kernels*> g_active{nullptr};

const Kernels& active() {
  const Kernels* k = g_active.load(std::memory_order_acquire);
  if (k == nullptr) {
    k = best_variant();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "kiln: unsupported dtype ", t.scalar_type());
  }
}

// Rows per task so that a task moves enough bytes to be worth a thread (one decode row runs
// inline, without waking the pool).
int64_t grain_rows(int64_t row_elems) {
  constexpr int64_t kElemsPerTask = 16384;
  return std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(1, row_elems));
}

// Runs `fn(target_rows)` on a row view of an in-place or output tensor; when the tensor cannot be
// walked with one row stride, on a contiguous copy that is written back afterwards.
template <typename F>
void with_writable_rows(const at::Tensor& t, F&& fn) {
  Rows r = as_rows(t);
  if (r.ok) {
    fn(t, r);
    return;
  }
  at::Tensor tmp = t.contiguous();
  fn(tmp, as_rows(tmp));
  t.copy_(tmp);
}

// ---------------------------------------------------------------------------------------------
// rms_norm and fused_add_rms_norm

// The norm reads a whole row before writing it, so `out` may be `x` itself, but not a shifted view.
void check_out_vs_input(const char* op, const at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(out.is_same(x) || at::get_overlap_status(out, x) != at::MemOverlapStatus::Partial,
              "kiln::", op, ": out partly overlaps x; pass x itself or a separate tensor");
}

// One entry for every form: residual undefined means plain rms_norm.
void add_rms_norm_into(const char* op, const at::Tensor& x, const at::Tensor* residual,
                       const at::Tensor* residual_out, const at::Tensor& weight, double eps,
                       const at::Tensor& out) {
  const at::Tensor xr = rows_readable(x);
  const at::Tensor w = weight.contiguous();
  const Rows rx = as_rows(xr);
  if (rx.rows == 0 || rx.n == 0) return;
  const DType dt = dtype_of(x);
  const Kernels& k = active();
  const int64_t n = rx.n;
  with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
    if (residual == nullptr) {
      at::parallel_for(0, rx.rows, grain_rows(n), [&](int64_t b, int64_t e) {
        k.add_rms_norm(dt, b, e, n, eps, xr.const_data_ptr(), rx.stride, nullptr, 0, nullptr, 0,
                       w.const_data_ptr(), o.mutable_data_ptr(), ro.stride);
      });
      return;
    }
    auto run = [&](const at::Tensor& res, int64_t sres, const at::Tensor& rot, int64_t sro) {
      at::parallel_for(0, rx.rows, grain_rows(n), [&](int64_t b, int64_t e) {
        k.add_rms_norm(dt, b, e, n, eps, xr.const_data_ptr(), rx.stride, res.const_data_ptr(),
                       sres, rot.mutable_data_ptr(), sro, w.const_data_ptr(),
                       o.mutable_data_ptr(), ro.stride);
      });
    };
    if (residual->is_same(*residual_out)) {
      // In place: the kernel reads each residual element just before overwriting it.
      with_writable_rows(*residual_out, [&](const at::Tensor& rot, Rows rro) {
        run(rot, rro.stride, rot, rro.stride);
      });
    } else {
      const at::Tensor res = rows_readable(*residual);
      const int64_t sres = as_rows(res).stride;
      with_writable_rows(*residual_out, [&](const at::Tensor& rot, Rows rro) {
        run(res, sres, rot, rro.stride);
      });
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args("rms_norm", x, weight, eps);
  check_device("rms_norm", x, c10::kCPU);
  at::Tensor out = at::empty(x.sizes(), x.options());
  add_rms_norm_into("rms_norm", x, nullptr, nullptr, weight, eps, out);
  return out;
}

void rms_norm_out(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  const char* op = "rms_norm_out";
  check_norm_args(op, x, weight, eps);
  check_device(op, x, c10::kCPU);
  check_like(op, "out", out, "x", x);
  check_shape(op, "out", out, x.sizes());
  check_writable(op, "out", out);
  check_out_vs_input(op, out, x);
  add_rms_norm_into(op, x, nullptr, nullptr, weight, eps, out);
}

void check_fused_args(const char* op, const at::Tensor& x, const at::Tensor& residual,
                      const at::Tensor& weight, double eps) {
  check_norm_args(op, x, weight, eps);
  check_device(op, x, c10::kCPU);
  check_like(op, "residual", residual, "x", x);
  check_shape(op, "residual", residual, x.sizes());
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                      const at::Tensor& weight, double eps) {
  check_fused_args("fused_add_rms_norm", x, residual, weight, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor res_out = at::empty(x.sizes(), x.options());
  add_rms_norm_into("fused_add_rms_norm", x, &residual, &res_out, weight, eps, out);
  return {out, res_out};
}

// residual += x; x = rms_norm(residual) * weight.
void fused_add_rms_norm_(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         double eps) {
  const char* op = "fused_add_rms_norm_";
  check_fused_args(op, x, residual, weight, eps);
  check_writable(op, "x", x);
  check_writable(op, "residual", residual);
  check_no_overlap(op, "x", x, "residual", residual);
  add_rms_norm_into(op, x, &residual, &residual, weight, eps, x);
}

// residual += x; out = rms_norm(residual) * weight.
void fused_add_rms_norm_out(const at::Tensor& x, const at::Tensor& residual,
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
  add_rms_norm_into(op, x, &residual, &residual, weight, eps, out);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad, const at::Tensor& z,
                                                     const at::Tensor& weight, double eps,
                                                     const std::optional<at::Tensor>& grad_residual) {
  const char* op = "rms_norm_backward";
  check_norm_args(op, z, weight, eps);
  check_device(op, z, c10::kCPU);
  check_like(op, "grad", grad, "z", z);
  check_shape(op, "grad", grad, z.sizes());
  if (grad_residual.has_value()) {
    check_like(op, "grad_residual", *grad_residual, "z", z);
    check_shape(op, "grad_residual", *grad_residual, z.sizes());
  }
  const at::Tensor g = rows_readable(grad), zr = rows_readable(z), w = weight.contiguous();
  const at::Tensor gres = grad_residual.has_value() ? rows_readable(*grad_residual) : at::Tensor();
  const Rows rg = as_rows(g), rz = as_rows(zr);
  const Rows rgr = gres.defined() ? as_rows(gres) : Rows{};
  const int64_t n = rz.n, rows = rz.rows;
  at::Tensor grad_z = at::empty(z.sizes(), z.options());
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (rows == 0 || n == 0) {
    return {grad_z, at::zeros({n}, weight.options())};
  }
  // Each task sums its rows' dw into its own slice; the slices are added at the end, so the
  // result does not depend on thread timing.
  const int64_t grain = grain_rows(n);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  at::Tensor dw_parts = at::zeros({tasks, n}, z.options().dtype(acc_type));
  const DType dt = dtype_of(z);
  const Kernels& k = active();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = rows * t / tasks, e = rows * (t + 1) / tasks;
      k.rms_norm_backward(dt, b, e, n, eps, g.const_data_ptr(), rg.stride, zr.const_data_ptr(),
                          rz.stride, w.const_data_ptr(),
                          gres.defined() ? gres.const_data_ptr() : nullptr, rgr.stride,
                          grad_z.mutable_data_ptr(), n,
                          static_cast<char*>(dw_parts.mutable_data_ptr()) +
                              t * n * dw_parts.element_size());
    }
  });
  at::Tensor dw = tasks == 1 ? dw_parts[0] : dw_parts.sum(0);
  return {grad_z, dw.to(weight.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// silu_and_mul

void silu_and_mul_into(const at::Tensor& x, const at::Tensor& out) {
  const at::Tensor xr = rows_readable(x);
  const Rows rx = as_rows(xr);
  const int64_t d = rx.n / 2;
  if (rx.rows == 0 || d == 0) return;
  const DType dt = dtype_of(x);
  const Kernels& k = active();
  with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
    at::parallel_for(0, rx.rows, grain_rows(3 * d), [&](int64_t b, int64_t e) {
      k.silu_and_mul(dt, b, e, d, xr.const_data_ptr(), rx.stride, o.mutable_data_ptr(), ro.stride);
    });
  });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  check_silu_args("silu_and_mul", x);
  check_device("silu_and_mul", x, c10::kCPU);
  at::Tensor out = at::empty(silu_out_shape(x), x.options());
  silu_and_mul_into(x, out);
  return out;
}

void silu_and_mul_out(const at::Tensor& x, const at::Tensor& out) {
  const char* op = "silu_and_mul_out";
  check_silu_args(op, x);
  check_device(op, x, c10::kCPU);
  check_like(op, "out", out, "x", x);
  check_shape(op, "out", out, silu_out_shape(x));
  check_writable(op, "out", out);
  check_no_overlap(op, "out", out, "x", x);
  silu_and_mul_into(x, out);
}

at::Tensor silu_and_mul_backward(const at::Tensor& grad, const at::Tensor& x) {
  const char* op = "silu_and_mul_backward";
  check_silu_args(op, x);
  check_device(op, x, c10::kCPU);
  check_like(op, "grad", grad, "x", x);
  check_shape(op, "grad", grad, silu_out_shape(x));
  const at::Tensor g = rows_readable(grad), xr = rows_readable(x);
  const Rows rg = as_rows(g), rx = as_rows(xr);
  at::Tensor gx = at::empty(x.sizes(), x.options());
  const int64_t d = rx.n / 2;
  if (rx.rows == 0 || d == 0) return gx;
  const DType dt = dtype_of(x);
  const Kernels& k = active();
  at::parallel_for(0, rx.rows, grain_rows(5 * d), [&](int64_t b, int64_t e) {
    k.silu_and_mul_backward(dt, b, e, d, g.const_data_ptr(), rg.stride, xr.const_data_ptr(),
                            rx.stride, gx.mutable_data_ptr(), 2 * d);
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------
// rotary embedding

// [*T, H, D] as (tokens, token stride, head stride) when one token stride walks every token.
struct Heads {
  bool ok = false;
  int64_t tokens = 0, s_tok = 0, s_head = 0, heads = 0;
};

Heads as_heads(const at::Tensor& t) {
  Heads h;
  const int64_t nd = t.dim();
  if (t.stride(nd - 1) != 1 && t.size(nd - 1) != 1) return h;
  h.heads = t.size(nd - 2);
  h.s_head = t.stride(nd - 2);
  h.tokens = 1;
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

void rotary_inplace(const char* op, const at::Tensor& positions, const at::Tensor& q,
                    const at::Tensor& k, const at::Tensor& cache, bool neox, bool inverse) {
  const at::Tensor pos = positions.contiguous();
  const at::Tensor c = cache.stride(1) == 1 ? cache : cache.contiguous();
  const int64_t max_pos = c.size(0), rot = c.size(1);
  const int64_t* p = pos.const_data_ptr<int64_t>();
  const int64_t T = pos.numel();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < max_pos, "kiln::", op, ": position ", p[t], " at index ", t,
                " is outside the cos_sin_cache (", max_pos, " positions)");
  }
  if (T == 0) return;
  const DType dt = dtype_of(q);
  const Kernels& kern = active();
  auto run = [&](const at::Tensor& qq, const at::Tensor& kk) {
    Heads hq = as_heads(qq), hk = as_heads(kk);
    const int64_t per_tok = (hq.heads + hk.heads) * rot;
    at::parallel_for(0, T, grain_rows(2 * per_tok), [&](int64_t b, int64_t e) {
      kern.rotary(dt, b, e, p, qq.mutable_data_ptr(), hq.s_tok, hq.s_head, hq.heads,
                  kk.mutable_data_ptr(), hk.s_tok, hk.s_head, hk.heads, rot, c.const_data_ptr(),
                  c.stride(0), neox, inverse);
    });
  };
  const bool q_ok = as_heads(q).ok, k_ok = as_heads(k).ok;
  at::Tensor qq = q_ok ? q : q.contiguous();
  at::Tensor kk = k_ok ? k : k.contiguous();
  run(qq, kk);
  if (!q_ok) q.copy_(qq);
  if (!k_ok) k.copy_(kk);
}

void check_rotary_cpu(const char* op, const at::Tensor& positions, const at::Tensor& q,
                      const at::Tensor& k, const at::Tensor& cache) {
  check_rotary_args(op, positions, q, k, cache);
  check_device(op, q, c10::kCPU);
}

void rotary_embedding_(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& cache, bool is_neox) {
  const char* op = "rotary_embedding_";
  check_rotary_cpu(op, positions, q, k, cache);
  check_writable(op, "query", q);
  check_writable(op, "key", k);
  check_no_overlap(op, "query", q, "key", k);
  rotary_inplace(op, positions, q, k, cache, is_neox, false);
}

std::tuple<at::Tensor, at::Tensor> rotary_functional(const char* op, const at::Tensor& positions,
                                                     const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& cache, bool is_neox,
                                                     bool inverse) {
  check_rotary_cpu(op, positions, q, k, cache);
  at::Tensor qo = q.clone(at::MemoryFormat::Contiguous);
  at::Tensor ko = k.clone(at::MemoryFormat::Contiguous);
  rotary_inplace(op, positions, qo, ko, cache, is_neox, inverse);
  return {qo, ko};
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding(const at::Tensor& positions, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& cache,
                                                    bool is_neox) {
  return rotary_functional("rotary_embedding", positions, q, k, cache, is_neox, false);
}

// The rotation is orthogonal: its gradient is the rotation by the opposite angle.
std::tuple<at::Tensor, at::Tensor> rotary_embedding_backward(const at::Tensor& positions,
                                                             const at::Tensor& grad_q,
                                                             const at::Tensor& grad_k,
                                                             const at::Tensor& cache, bool is_neox) {
  return rotary_functional("rotary_embedding_backward", positions, grad_q, grad_k, cache, is_neox,
                           true);
}

// ---------------------------------------------------------------------------------------------
// weight-only int8 linear

// Up to this many rows the kernel streams the int8 weights once (decode); above it, a dequantized
// copy and torch's matmul (prefill, compute-bound) win.
constexpr int64_t kInt8GemvMaxRows = 8;

void int8_linear_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                      const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const int64_t K = x.size(-1), N = w.size(0);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  if (M == 0 || N == 0) return;
  if (M > kInt8GemvMaxRows || K == 0) {
    at::Tensor y = at::matmul(x, w.to(x.scalar_type()).t());
    y.mul_(scale.to(x.scalar_type()));
    if (bias.has_value()) y.add_(*bias);
    out.copy_(y);
    return;
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor wc = w.stride(1) == 1 ? w : w.contiguous();
  const at::Tensor sc = scale.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const DType dt = dtype_of(x);
  const Kernels& k = active();
  with_writable_rows(out, [&](const at::Tensor& o, Rows ro) {
    // Blocks of four output features, at least ~256 KiB of weights per task.
    const int64_t blocks = (N + 3) / 4;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, 4 * K));
    at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
      k.int8_linear(dt, 4 * b, std::min(N, 4 * e), M, K, xf.const_data_ptr<float>(),
                    wc.const_data_ptr<int8_t>(), wc.stride(0), sc.const_data_ptr<float>(),
                    bc.defined() ? bc.const_data_ptr() : nullptr, o.mutable_data_ptr(), ro.stride);
    });
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  check_int8_linear_args("int8_linear", x, w, scale, bias);
  check_device("int8_linear", x, c10::kCPU);
  at::Tensor out = at::empty(int8_linear_out_shape(x, w), x.options());
  int8_linear_into(x, w, scale, bias, out);
  return out;
}

void int8_linear_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, const at::Tensor& out) {
  const char* op = "int8_linear_out";
  check_int8_linear_args(op, x, w, scale, bias);
  check_device(op, x, c10::kCPU);
  check_like(op, "out", out, "x", x);
  check_shape(op, "out", out, int8_linear_out_shape(x, w));
  check_writable(op, "out", out);
  check_no_overlap(op, "out", out, "x", x);
  int8_linear_into(x, w, scale, bias, out);
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("rms_norm", &kiln::rms_norm);
  m.impl("rms_norm_out", &kiln::rms_norm_out);
  m.impl("rms_norm_backward", &kiln::rms_norm_backward);
  m.impl("fused_add_rms_norm", &kiln::fused_add_rms_norm);
  m.impl("fused_add_rms_norm_", &kiln::fused_add_rms_norm_);
  m.impl("fused_add_rms_norm_out", &kiln::fused_add_rms_norm_out);
  m.impl("silu_and_mul", &kiln::silu_and_mul);
  m.impl("silu_and_mul_out", &kiln::silu_and_mul_out);
  m.impl("silu_and_mul_backward", &kiln::silu_and_mul_backward);
  m.impl("rotary_embedding", &kiln::rotary_embedding);
  m.impl("rotary_embedding_", &kiln::rotary_embedding_);
  m.impl("rotary_embedding_backward", &kiln::rotary_embedding_backward);
  m.impl("int8_linear", &kiln::int8_linear);
  m.impl("int8_linear_out", &kiln::int8_linear_out);
}

// For tests and the benchmark (through ctypes): which CPU variant runs, and switching it.
extern "C" {
__attribute__((visibility("default"))) const char* kiln_cpu_isa() { return kiln::active().name; }

// Comma-separated, best first: the variants this build has that this CPU can run.
__attribute__((visibility("default"))) const char* kiln_cpu_isas_supported() {
  static const std::string names = [] {
    std::string s;
    for (const kiln::cpu::Kernels* k : kiln::all_variants()) {
      if (!kiln::isa_supported(*k)) continue;
      if (!s.empty()) s += ",";
      s += k->name;
    }
    return s;
  }();
  return names.c_str();
}

// 0 on success, 1 if this build has no such variant, 2 if this CPU cannot run it.
__attribute__((visibility("default"))) int kiln_set_cpu_isa(const char* name) {
  const kiln::cpu::Kernels* k = kiln::find_variant(name);
  if (k == nullptr) return 1;
  if (!kiln::isa_supported(*k)) return 2;
  kiln::g_active.store(k, std::memory_order_release);
  return 0;
}
}
