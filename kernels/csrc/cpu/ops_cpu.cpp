// CPU registration of the kiln ops: the shared tensor-level code (ops_impl.h) over a backend that
// splits rows across threads and calls the kernels of the instruction-set variant chosen at load
// time. The split is kiln's work-claiming pool (parallel.h), not at::parallel_for: OpenMP's
// static split and barrier stall every op on a thread that another process has descheduled.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "../ops_impl.h"
#include "kernels.h"
#include "parallel.h"

namespace kiln {
namespace {

using cpu::Kernels;

// ---------------------------------------------------------------------------------------------
// choosing the variant

bool isa_supported(const Kernels& k) {
#if defined(KILN_HAVE_X86_VARIANTS)
  if (&k == &cpu::avx512::kernels()) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi2");
  }
  if (&k == &cpu::avx2::kernels()) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
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

// Chosen when the library loads (import time), switchable by kiln_set_cpu_isa below.
std::atomic<const Kernels*> g_active{best_variant()};

const Kernels& active() { return *g_active.load(std::memory_order_relaxed); }

// The W8A8 linear: the active variant's, except that the avx512 variant takes the AMX build
// where the CPU has amx_int8 and Linux grants the tile state, else the VNNI build where the CPU
// has avx512_vnni. kiln_set_int8_isa picks a lesser one (tests, comparisons). All give the
// same bits (exact integer sums).
bool vnni_supported() {
#if defined(KILN_HAVE_X86_VARIANTS)
  return __builtin_cpu_supports("avx512vnni") && isa_supported(cpu::avx512::kernels());
#else
  return false;
#endif
}

// AMX: CPUID.(7, 0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), then the kernel's permission for
// this process to use the tile data state (Linux 5.16+: arch_prctl ARCH_REQ_XCOMP_PERM, 0x1023,
// XFEATURE_XTILEDATA, 18); without it the first tile instruction faults.
bool amx_supported() {
#if defined(KILN_HAVE_X86_VARIANTS) && defined(__linux__)
  static const bool ok = [] {
    if (!vnni_supported()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) == 0) return false;
    if ((d & (1u << 24)) == 0 || (d & (1u << 25)) == 0) return false;
    if (std::getenv("KILN_NO_AMX") != nullptr) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// 2: AMX where supported, 1: VNNI where supported, 0: the variant's own.
std::atomic<int> g_int8_level{2};

const cpu::Int8Kernels& int8_active() {
  const Kernels& k = active();
#if defined(KILN_HAVE_X86_VARIANTS)
  if (&k == &cpu::avx512::kernels()) {
    const int level = g_int8_level.load(std::memory_order_relaxed);
    if (level >= 2 && amx_supported()) return cpu::amx::int8_kernels();
    if (level >= 1 && vnni_supported()) return cpu::avx512vnni::int8_kernels();
  }
#endif
  return k.int8;
}

// The float32 norm backward runs the AVX2 build when AVX-512 is active: on these CPUs (2 vCPUs,
// KVM) its AVX-512 build took 13.4 ms against 7.3 ms for AVX2 at [2048, 4096] on two threads
// (equal on one thread), consistently; for bfloat16 the AVX-512 build is the faster one.
const Kernels& backward_variant(DType dt) {
  const Kernels& k = active();
#if defined(KILN_HAVE_X86_VARIANTS)
  if (dt == DType::kFloat32 && &k == &cpu::avx512::kernels()) return cpu::avx2::kernels();
#endif
  return k;
}

// Rows per task, so that a task moves enough bytes to be worth a thread: one decode row runs
// inline, without waking the pool.
int64_t grain_rows(int64_t row_elems) {
  constexpr int64_t kElemsPerTask = 16384;
  return std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(1, row_elems));
}

struct CpuBackend {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  using Guard = NoGuard;
  // Measured at [M, 4096] x [4096, 4096]: the 4x4-blocked kernel beats dequantize + matmul up to
  // about 64 rows here.
  static constexpr int64_t kInt8KernelMaxRows = 64;
  static constexpr bool kInt8Tiled = false;  // above 64 rows: float matmul (ops_impl.h)

  static void add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x,
                           int64_t sx, const void* res, int64_t sres, void* ro, int64_t sro,
                           const void* w, void* out, int64_t so) {
    const Kernels& k = active();
    cpu::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
      k.add_rms_norm(dt, b, e, n, eps, x, sx, res, sres, ro, sro, w, out, so);
    });
  }

  static void rms_norm_backward(DType dt, int64_t rows, int64_t n, double eps, const void* g,
                                int64_t sg, const void* z, int64_t sz, const void* w,
                                const void* gres, int64_t sgr, void* gz, int64_t sgz,
                                const at::Tensor& grad_w) {
    // Each task sums its rows' dw into its own slice; the slices are added at the end, so the
    // result does not depend on thread timing.
    const int64_t grain = grain_rows(n);
    const int64_t tasks = std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
    const auto acc = dt == DType::kFloat64 ? at::kDouble : at::kFloat;
    at::Tensor parts = at::zeros({tasks, n}, grad_w.options().dtype(acc));
    char* base = static_cast<char*>(parts.mutable_data_ptr());
    const int64_t row_bytes = n * parts.element_size();
    const Kernels& k = backward_variant(dt);
    cpu::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        k.rms_norm_backward(dt, rows * t / tasks, rows * (t + 1) / tasks, n, eps, g, sg, z, sz, w,
                            gres, sgr, gz, sgz, base + t * row_bytes);
      }
    });
    grad_w.copy_(tasks == 1 ? parts[0] : parts.sum(0));
  }

  static void silu_and_mul(DType dt, int64_t rows, int64_t d, const void* x, int64_t sx,
                           void* out, int64_t so) {
    const Kernels& k = active();
    cpu::parallel_for(0, rows, grain_rows(3 * d), [&](int64_t b, int64_t e) {
      k.silu_and_mul(dt, b, e, d, x, sx, out, so);
    });
  }

  static void silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* g, int64_t sg,
                                    const void* x, int64_t sx, void* gx, int64_t sgx) {
    const Kernels& k = active();
    cpu::parallel_for(0, rows, grain_rows(5 * d), [&](int64_t b, int64_t e) {
      k.silu_and_mul_backward(dt, b, e, d, g, sg, x, sx, gx, sgx);
    });
  }

  static void check_positions(const at::Tensor& positions, int64_t max_pos) {
    check_positions_on_host(positions, max_pos);
  }

  static void rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                     int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                     int64_t sk_head, int64_t nk, int64_t rot, const void* cache,
                     int64_t s_cache, bool neox, bool inverse) {
    (void)max_pos;  // checked by check_positions before
    const Kernels& kern = active();
    cpu::parallel_for(0, tokens, grain_rows(2 * (nq + nk) * rot), [&](int64_t b, int64_t e) {
      kern.rotary(dt, b, e, positions, q, sq_tok, sq_head, nq, k, sk_tok, sk_head, nk, rot, cache,
                  s_cache, neox, inverse);
    });
  }

  static void int8_linear(DType dt, int64_t M, int64_t N, int64_t K, const float* x,
                          const int8_t* w, int64_t sw, const float* scale, const void* bias,
                          void* out, int64_t so) {
    // Blocks of four output features (the kernel's unit), at least ~256 KiB of weights per task.
    const int64_t blocks = (N + 3) / 4;
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, 4 * K));
    const Kernels& k = active();
    cpu::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
      k.int8_linear(dt, 4 * b, std::min(N, 4 * e), M, K, x, w, sw, scale, bias, out, so);
    });
  }
};

// The decode ops (panel_linear, decode_attention): CPU and float32 only (what CPU serving runs),
// so they are not among the shared Ops<Backend>. Each has a functional and an `out` form.

// Runs fn(o) on out when the kernel can write it (`usable`), else on a contiguous temporary
// that is copied into out afterwards.
template <typename F>
void into_out(const at::Tensor& out, bool usable, F&& fn) {
  if (usable) {
    fn(out);
    return;
  }
  at::Tensor tmp = at::empty(out.sizes(), out.options());
  fn(tmp);
  out.copy_(tmp);
}

void check_out(const char* op, const at::Tensor& out, at::IntArrayRef shape,
               const at::Tensor& input) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "kiln::", op, ": out must be float32, got ",
              out.scalar_type());
  check_device(op, out, c10::DeviceType::CPU);
  check_shape(op, "out", out, shape);
  check_writable(op, "out", out);
  check_no_overlap(op, "out", out, "the input", input);
}

std::vector<int64_t> check_panel_linear(const char* op, const at::Tensor& x,
                                        const at::Tensor& panels, int64_t out_features,
                                        const std::optional<at::Tensor>& scale) {
  constexpr int64_t width = cpu::kPanelWidth;
  const auto wt = panels.scalar_type();
  TORCH_CHECK(x.scalar_type() == at::kFloat, "kiln::", op, ": x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar, "kiln::", op,
              ": weight_panels must be float32, bfloat16 or int8, got ", wt);
  TORCH_CHECK((wt == at::kChar) == scale.has_value(), "kiln::", op,
              ": int8 weight_panels need a scale (one float32 per output feature), and only "
              "int8 ones take it");
  check_device(op, x, c10::DeviceType::CPU);
  check_device(op, panels, c10::DeviceType::CPU);
  TORCH_CHECK(x.dim() >= 1, "kiln::", op, ": x must have at least one dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == K && panels.size(2) == width, "kiln::", op,
              ": weight_panels must be [panels, ", K, " (x's last dimension), ", width,
              "] as kernels.reference.pack_panels makes it, got ", panels.sizes());
  TORCH_CHECK(out_features > (panels.size(0) - 1) * width &&
                  out_features <= panels.size(0) * width,
              "kiln::", op, ": ", panels.size(0), " panels hold ", (panels.size(0) - 1) * width + 1,
              " to ", panels.size(0) * width, " output features, got out_features=",
              out_features);
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 &&
                    scale->size(0) == out_features,
                "kiln::", op, ": scale must be float32 [", out_features, "], got ",
                scale->scalar_type(), " ", scale->sizes());
    check_device(op, *scale, c10::DeviceType::CPU);
  }
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

void panel_linear_into(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                       const std::optional<at::Tensor>& scale, const at::Tensor& out) {
  const int64_t K = x.size(-1);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  if (out.numel() == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const at::Tensor xc = x.reshape({M, K}).contiguous();
  const at::Tensor pc = panels.contiguous();
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  const cpu::PanelType wt = panels.scalar_type() == at::kFloat      ? cpu::PanelType::kFloat32
                            : panels.scalar_type() == at::kBFloat16 ? cpu::PanelType::kBFloat16
                                                                    : cpu::PanelType::kInt8;
  const Kernels& k = active();
  // Whole panels per task, at least ~256 Ki multiply-adds each: a one-row call on a small
  // weight stays on this thread. Any split gives the same numbers (outputs are independent).
  const int64_t per_panel = std::max<int64_t>(1, M * K * cpu::kPanelWidth);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_panel);
  into_out(out, out.is_contiguous(), [&](const at::Tensor& o) {
    const float* xp = xc.const_data_ptr<float>();
    const void* wp = pc.const_data_ptr();
    const float* sp = sc.defined() ? sc.const_data_ptr<float>() : nullptr;
    float* op = o.mutable_data_ptr<float>();
    cpu::parallel_for(0, panels.size(0), grain, [&](int64_t b, int64_t e) {
      k.panel_linear(b, e, M, K, out_features, xp, K, wt, wp, sp, op, out_features);
    });
  });
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const std::optional<at::Tensor>& scale) {
  const auto shape = check_panel_linear("panel_linear", x, panels, out_features, scale);
  at::Tensor out = at::empty(shape, x.options());
  panel_linear_into(x, panels, out_features, scale, out);
  return out;
}

void panel_linear_out(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                      const at::Tensor& out, const std::optional<at::Tensor>& scale) {
  constexpr const char* op = "panel_linear_out";
  const auto shape = check_panel_linear(op, x, panels, out_features, scale);
  check_out(op, out, shape, x);
  panel_linear_into(x, panels, out_features, scale, out);
}

// W8A8: x quantized per row to int8, int8 panels [P, ceil(K / 4), 64, 4] (pack_int8_panels),
// exact int32 sums, one float32 scale per row and per output feature.
std::vector<int64_t> check_w8a8_linear(const char* op, const at::Tensor& x,
                                       const at::Tensor& panels, const at::Tensor& sums,
                                       const at::Tensor& scale, int64_t out_features) {
  constexpr int64_t width = cpu::kPanelWidth;
  TORCH_CHECK(x.scalar_type() == at::kFloat, "kiln::", op, ": x must be float32, got ",
              x.scalar_type());
  TORCH_CHECK(panels.scalar_type() == at::kChar, "kiln::", op,
              ": weight_panels must be int8, got ", panels.scalar_type());
  for (const at::Tensor* t : {&x, &panels, &sums, &scale}) check_device(op, *t, c10::DeviceType::CPU);
  TORCH_CHECK(x.dim() >= 1, "kiln::", op, ": x must have at least one dimension");
  const int64_t K = x.size(-1);
  const int64_t groups = (K + 3) / 4;
  TORCH_CHECK(panels.dim() == 4 && panels.size(1) == groups && panels.size(2) == width &&
                  panels.size(3) == 4,
              "kiln::", op, ": weight_panels must be [panels, ", groups, " (ceil(K / 4), K = ",
              K, " from x), ", width, ", 4] as kernels.reference.pack_int8_panels makes it, got ",
              panels.sizes());
  TORCH_CHECK(out_features > (panels.size(0) - 1) * width &&
                  out_features <= panels.size(0) * width,
              "kiln::", op, ": ", panels.size(0), " panels hold ", (panels.size(0) - 1) * width + 1,
              " to ", panels.size(0) * width, " output features, got out_features=",
              out_features);
  TORCH_CHECK(sums.scalar_type() == at::kInt && sums.dim() == 1 && sums.size(0) == out_features,
              "kiln::", op, ": weight_sums must be int32 [", out_features, "], got ",
              sums.scalar_type(), " ", sums.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                  scale.size(0) == out_features,
              "kiln::", op, ": scale must be float32 [", out_features, "], got ",
              scale.scalar_type(), " ", scale.sizes());
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  return shape;
}

void w8a8_linear_into(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& sums,
                      const at::Tensor& scale, int64_t out_features, const at::Tensor& out) {
  const int64_t K = x.size(-1);
  const int64_t M = K == 0 ? 0 : x.numel() / K;
  if (out.numel() == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const int64_t kp = 4 * panels.size(1);
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor xc = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const at::Tensor pc = panels.contiguous(), sc = sums.contiguous(), wc = scale.contiguous();
  const cpu::Int8Kernels& k = int8_active();
  // The quantized rows, kept per calling thread across calls: no allocation once grown.
  thread_local std::vector<uint8_t> xq;
  thread_local std::vector<float> xs;
  const int64_t rows = (M + k.row_align - 1) / k.row_align * k.row_align;
  if (xq.size() < static_cast<size_t>(rows * kp)) xq.resize(rows * kp);
  if (xs.size() < static_cast<size_t>(M)) xs.resize(M);
  uint8_t* qp = xq.data();
  float* sp = xs.data();
  const float* xp = xc.const_data_ptr<float>();
  const int64_t sx = xc.stride(0);
  cpu::parallel_for(0, M, grain_rows(K), [&](int64_t b, int64_t e) {
    k.quantize_rows(b, e, K, kp, xp, sx, qp, sp);
  });
  // Whole panels per task, at least ~256 Ki multiply-adds each (outputs are independent, so
  // any split gives the same numbers).
  const int64_t per_panel = std::max<int64_t>(1, M * kp * cpu::kPanelWidth);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_panel);
  into_out(out, out.is_contiguous(), [&](const at::Tensor& o) {
    const int8_t* wp = pc.const_data_ptr<int8_t>();
    const int32_t* sump = sc.const_data_ptr<int32_t>();
    const float* wsp = wc.const_data_ptr<float>();
    float* op = o.mutable_data_ptr<float>();
    cpu::parallel_for(0, panels.size(0), grain, [&](int64_t b, int64_t e) {
      k.w8a8_panels(b, e, M, kp, out_features, qp, sp, wp, sump, wsp, op, out_features);
    });
  });
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& sums,
                       const at::Tensor& scale, int64_t out_features) {
  const auto shape = check_w8a8_linear("w8a8_linear", x, panels, sums, scale, out_features);
  at::Tensor out = at::empty(shape, x.options());
  w8a8_linear_into(x, panels, sums, scale, out_features, out);
  return out;
}

void w8a8_linear_out(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& sums,
                     const at::Tensor& scale, int64_t out_features, const at::Tensor& out) {
  constexpr const char* op = "w8a8_linear_out";
  const auto shape = check_w8a8_linear(op, x, panels, sums, scale, out_features);
  check_out(op, out, shape, x);
  w8a8_linear_into(x, panels, sums, scale, out_features, out);
}

// Returns the longest length (validated), for the scratch size.
int64_t check_decode_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& slots,
                               const at::Tensor& lengths) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "kiln::", op,
                ": query, key_cache and value_cache must be float32, got ", t->scalar_type());
    check_device(op, *t, c10::DeviceType::CPU);
  }
  for (const at::Tensor* t : {&slots, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device().is_cpu(), "kiln::", op,
                ": slots and lengths must be int64 CPU tensors, got ", t->scalar_type(), " on ",
                t->device());
  }
  TORCH_CHECK(q.dim() == 3, "kiln::", op, ": query must be [batch, heads, head_dim], got ",
              q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(3) == D, "kiln::", op,
              ": key_cache and value_cache must both be [slots, kv_heads, max_len, ", D,
              "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.strides() == v.strides() && k.stride(3) == 1, "kiln::", op,
              ": key_cache and value_cache must share strides with contiguous head_dim, got ",
              k.strides(), " and ", v.strides());
  const int64_t Hkv = k.size(1), max_len = k.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "kiln::", op, ": query heads (", Hq,
              ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == B && lengths.dim() == 1 &&
                  lengths.size(0) == B,
              "kiln::", op, ": slots and lengths must be [", B, "], got ", slots.sizes(), " and ",
              lengths.sizes());
  const at::Tensor sc = slots.contiguous(), lc = lengths.contiguous();
  const int64_t* sp = sc.const_data_ptr<int64_t>();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < k.size(0), "kiln::", op, ": slots[", b, "] = ", sp[b],
                " is outside the cache's ", k.size(0), " slots");
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_len, "kiln::", op, ": lengths[", b, "] = ", lp[b],
                " must be in [1, ", max_len, "]");
    longest = std::max(longest, lp[b]);
  }
  return longest;
}

// Paged: key_cache and value_cache [blocks, kv_heads, block_size, D], block_tables [B, n] int64;
// sequence b's position l is at row l % block_size of block block_tables[b, l / block_size].
// Returns the longest length (validated), for the scratch size.
int64_t check_paged_decode_attention(const char* op, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& tables,
                                     const at::Tensor& lengths) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "kiln::", op,
                ": query, key_cache and value_cache must be float32, got ", t->scalar_type());
    check_device(op, *t, c10::DeviceType::CPU);
  }
  for (const at::Tensor* t : {&tables, &lengths}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device().is_cpu(), "kiln::", op,
                ": block_tables and lengths must be int64 CPU tensors, got ", t->scalar_type(),
                " on ", t->device());
  }
  TORCH_CHECK(q.dim() == 3, "kiln::", op, ": query must be [batch, heads, head_dim], got ",
              q.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(3) == D, "kiln::", op,
              ": key_cache and value_cache must both be [blocks, kv_heads, block_size, ", D,
              "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.strides() == v.strides() && k.stride(3) == 1, "kiln::", op,
              ": key_cache and value_cache must share strides with contiguous head_dim, got ",
              k.strides(), " and ", v.strides());
  const int64_t Hkv = k.size(1), block = k.size(2), blocks = k.size(0);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "kiln::", op, ": query heads (", Hq,
              ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(block > 0, "kiln::", op, ": block_size (key_cache's dimension 2) must be > 0");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B && lengths.dim() == 1 &&
                  lengths.size(0) == B,
              "kiln::", op, ": block_tables must be [", B, ", blocks per sequence] and lengths [",
              B, "], got ", tables.sizes(), " and ", lengths.sizes());
  const at::Tensor tc = tables.contiguous(), lc = lengths.contiguous();
  const int64_t* tp = tc.const_data_ptr<int64_t>();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  const int64_t per_seq = tables.size(1);
  int64_t longest = 1;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= per_seq * block, "kiln::", op, ": lengths[", b, "] = ",
                lp[b], " must be in [1, ", per_seq * block, "] (", per_seq,
                " table entries of ", block, " positions)");
    for (int64_t i = 0; i * block < lp[b]; ++i) {
      const int64_t e = tp[b * per_seq + i];
      TORCH_CHECK(e >= 0 && e < blocks, "kiln::", op, ": block_tables[", b, ", ", i, "] = ", e,
                  " is outside the cache's ", blocks, " blocks");
    }
    longest = std::max(longest, lp[b]);
  }
  return longest;
}

// tables: [B, n] int64 contiguous; `block` positions per table entry (a contiguous cache passes
// its slots as [B, 1] and block = max_len).
void decode_attention_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& tables, int64_t block, const at::Tensor& lengths,
                           double scale, int64_t longest, const at::Tensor& out) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  if (B == 0 || D == 0) return;
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor tc = tables.contiguous(), lc = lengths.contiguous();
  const int64_t group = Hq / Hkv, units = B * Hkv, s_table = tc.size(1);
  // Units of (sequence, kv head), each ~2 * length * head_dim * group multiply-adds.
  const int64_t per_unit = std::max<int64_t>(1, 2 * longest * D * group);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_unit);
  const Kernels& kern = active();
  // The kernel takes any token and head strides; head_dim must be contiguous.
  into_out(out, out.stride(2) == 1, [&](const at::Tensor& o) {
    cpu::parallel_for(0, units, grain, [&](int64_t b, int64_t e) {
      // Scores, kept per thread across calls: no allocation once it has grown.
      thread_local std::vector<float> scratch;
      const size_t need = static_cast<size_t>((e - b) * group * longest);
      if (scratch.size() < need) scratch.resize(need);
      kern.decode_attention(b, e, Hkv, group, D, qc.const_data_ptr<float>(), qc.stride(0),
                            qc.stride(1), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                            k.stride(0), k.stride(1), k.stride(2), block,
                            tc.const_data_ptr<int64_t>(), s_table, lc.const_data_ptr<int64_t>(),
                            static_cast<float>(scale), scratch.data(), longest,
                            o.mutable_data_ptr<float>(), o.stride(0), o.stride(1));
    });
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slots, const at::Tensor& lengths, double scale) {
  const int64_t longest = check_decode_attention("decode_attention", q, k, v, slots, lengths);
  at::Tensor out = at::empty(q.sizes(), q.options());
  decode_attention_into(q, k, v, slots.reshape({-1, 1}), k.size(2), lengths, scale, longest,
                        out);
  return out;
}

void decode_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& slots, const at::Tensor& lengths, double scale,
                          const at::Tensor& out) {
  constexpr const char* op = "decode_attention_out";
  const int64_t longest = check_decode_attention(op, q, k, v, slots, lengths);
  check_out(op, out, q.sizes(), q);
  check_no_overlap(op, "out", out, "key_cache", k);
  check_no_overlap(op, "out", out, "value_cache", v);
  decode_attention_into(q, k, v, slots.reshape({-1, 1}), k.size(2), lengths, scale, longest,
                        out);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& tables, const at::Tensor& lengths,
                                  double scale) {
  const int64_t longest =
      check_paged_decode_attention("paged_decode_attention", q, k, v, tables, lengths);
  at::Tensor out = at::empty(q.sizes(), q.options());
  decode_attention_into(q, k, v, tables, k.size(2), lengths, scale, longest, out);
  return out;
}

void paged_decode_attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& tables, const at::Tensor& lengths,
                                double scale, const at::Tensor& out) {
  constexpr const char* op = "paged_decode_attention_out";
  const int64_t longest = check_paged_decode_attention(op, q, k, v, tables, lengths);
  check_out(op, out, q.sizes(), q);
  check_no_overlap(op, "out", out, "key_cache", k);
  check_no_overlap(op, "out", out, "value_cache", v);
  decode_attention_into(q, k, v, tables, k.size(2), lengths, scale, longest, out);
}

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  kiln::Ops<kiln::CpuBackend>::register_all(m);
  m.impl("panel_linear", &kiln::panel_linear);
  m.impl("panel_linear_out", &kiln::panel_linear_out);
  m.impl("w8a8_linear", &kiln::w8a8_linear);
  m.impl("w8a8_linear_out", &kiln::w8a8_linear_out);
  m.impl("decode_attention", &kiln::decode_attention);
  m.impl("decode_attention_out", &kiln::decode_attention_out);
  m.impl("paged_decode_attention", &kiln::paged_decode_attention);
  m.impl("paged_decode_attention_out", &kiln::paged_decode_attention_out);
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
  kiln::g_active.store(k, std::memory_order_relaxed);
  return 0;
}

// The W8A8 linear's instruction set ("avx512_vnni", "avx512", "avx2", "generic").
__attribute__((visibility("default"))) const char* kiln_cpu_int8_isa() {
  return kiln::int8_active().name;
}

// Caps the W8A8 linear's instruction set: 2 AMX, 1 VNNI, 0 the variant's own (each where the
// CPU has it). Returns the previous cap.
__attribute__((visibility("default"))) int kiln_set_int8_level(int level) {
  return kiln::g_int8_level.exchange(level);
}

// For the benchmark: microseconds per call of kiln::fused_add_rms_norm_ on one [1, n] float32 row
// when called through the dispatcher from C++ (as TorchScript or inductor's C++ wrapper call it),
// which leaves out the Python binding's cost.
__attribute__((visibility("default"))) double kiln_time_decode_call_us(int64_t n, int64_t iters) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("kiln::fused_add_rms_norm_", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  at::Tensor x = at::ones({1, n}), r = at::ones({1, n}), w = at::ones({n});
  for (int64_t i = 0; i < 100; ++i) op.call(x, r, w, 1e-6);
  double best = 1e30;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < iters; ++i) op.call(x, r, w, 1e-6);
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count() / iters);
  }
  return best;
}
}
