// CPU registration of the kiln ops: the shared tensor-level code (ops_impl.h) over a backend that
// splits rows across torch's OpenMP threads and calls the kernels of the instruction-set variant
// chosen at load time. at::parallel_for is an inline `#pragma omp parallel` compiled here with
// -fopenmp; the library links libgomp by the soname torch already loaded, so both share one pool.
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

#include "../ops_impl.h"
#include "kernels.h"

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

  static void add_rms_norm(DType dt, int64_t rows, int64_t n, double eps, const void* x,
                           int64_t sx, const void* res, int64_t sres, void* ro, int64_t sro,
                           const void* w, void* out, int64_t so) {
    const Kernels& k = active();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t b, int64_t e) {
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
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
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
    at::parallel_for(0, rows, grain_rows(3 * d), [&](int64_t b, int64_t e) {
      k.silu_and_mul(dt, b, e, d, x, sx, out, so);
    });
  }

  static void silu_and_mul_backward(DType dt, int64_t rows, int64_t d, const void* g, int64_t sg,
                                    const void* x, int64_t sx, void* gx, int64_t sgx) {
    const Kernels& k = active();
    at::parallel_for(0, rows, grain_rows(5 * d), [&](int64_t b, int64_t e) {
      k.silu_and_mul_backward(dt, b, e, d, g, sg, x, sx, gx, sgx);
    });
  }

  static void rotary(DType dt, int64_t tokens, const int64_t* positions, int64_t max_pos, void* q,
                     int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                     int64_t sk_head, int64_t nk, int64_t rot, const void* cache,
                     int64_t s_cache, bool neox, bool inverse) {
    for (int64_t t = 0; t < tokens; ++t) {
      TORCH_CHECK(positions[t] >= 0 && positions[t] < max_pos, "kiln::rotary_embedding: position ",
                  positions[t], " (index ", t, ") is outside the cos_sin_cache's ", max_pos,
                  " positions");
    }
    const Kernels& kern = active();
    at::parallel_for(0, tokens, grain_rows(2 * (nq + nk) * rot), [&](int64_t b, int64_t e) {
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
    at::parallel_for(0, blocks, grain, [&](int64_t b, int64_t e) {
      k.int8_linear(dt, 4 * b, std::min(N, 4 * e), M, K, x, w, sw, scale, bias, out, so);
    });
  }
};

}  // namespace
}  // namespace kiln

TORCH_LIBRARY_IMPL(kiln, CPU, m) { kiln::Ops<kiln::CpuBackend>::register_all(m); }

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
