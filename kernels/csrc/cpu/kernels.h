// The CPU kernels' table: plain C++ on raw pointers, with no torch header, so that the same
// source (kernels_impl.h) can be compiled once per instruction set without the ISA-specific
// copies of torch's inline functions clashing at link time.
#pragma once

#include <cstdint>

#include "../kernel_types.h"

namespace kiln::cpu {

using kiln::DType;

// The weight type of panel_linear's packed panels.
enum class PanelType : int { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };

// The W8A8 (int8 x int8 -> int32) linear of one instruction set (int8_impl.h). Kept apart from
// Kernels because the AVX-512 variant takes it from its own VNNI build where the CPU has VNNI.
struct Int8Kernels {
  const char* name;
  // Rows [r0, r1) of x (float32, K columns, row stride sx) quantized symmetrically per row into
  // xq (rows of kp >= K bytes, zero-padded; int8, or uint8 q + 128 where the kernel reads that)
  // and xscale[r] = max|x[r]| / 127.
  void (*quantize_rows)(int64_t r0, int64_t r1, int64_t K, int64_t kp, const float* x,
                        int64_t sx, uint8_t* xq, float* xscale);
  // Panels [p0, p1) of out[m, n] = float(sum_k q[m, k] * w[n, k]) * (xscale[m] * wscale[n])
  // for m < M, n < N, from quantize_rows' rows, with w packed as panels[p][k / 4][j][k % 4] =
  // w[64 p + j, k] (kp / 4 groups) and wsum[n] = sum_k w[n, k]. Exact integer sums: the same
  // bits on every variant and at every row count.
  void (*w8a8_panels)(int64_t p0, int64_t p1, int64_t M, int64_t kp, int64_t N,
                      const uint8_t* xq, const float* xscale, const int8_t* panels,
                      const int32_t* wsum, const float* wscale, float* out, int64_t so);
  // xq must hold M rounded up to a multiple of this many rows (AMX reads 16-row tiles).
  int64_t row_align;
};

// Every function works on the rows [r0, r1) (tokens for rotary, output columns for int8 linear)
// so that the caller can split the work across threads. Strides are in elements.
struct Kernels {
  const char* name;

  // z = x (+ residual); residual_out = z (stored in T); out = z * rsqrt(mean(z^2) + eps) * w.
  // residual may be null (plain rms_norm: residual_out is then ignored). out may alias x and
  // residual_out may alias residual (the in-place forms).
  void (*add_rms_norm)(DType dt, int64_t r0, int64_t r1, int64_t n, double eps,
                       const void* x, int64_t sx, const void* residual, int64_t sres,
                       void* residual_out, int64_t sro, const void* weight, void* out, int64_t so);

  // Backward of out = rms_norm(z) * w for rows [r0, r1): grad_z (+= grad_residual when given),
  // and this chunk's sum of dw into dw_acc (float, or double for kFloat64; length n, accumulated).
  void (*rms_norm_backward)(DType dt, int64_t r0, int64_t r1, int64_t n, double eps,
                            const void* grad, int64_t sg, const void* z, int64_t sz,
                            const void* weight, const void* grad_residual, int64_t sgr,
                            void* grad_z, int64_t sgz, void* dw_acc);

  // out[:, :d] = silu(x[:, :d]) * x[:, d:2d].
  void (*silu_and_mul)(DType dt, int64_t r0, int64_t r1, int64_t d, const void* x, int64_t sx,
                       void* out, int64_t so);

  // grad_x[:, :d] = g * b * silu'(a); grad_x[:, d:] = g * silu(a), with a, b the halves of x.
  void (*silu_and_mul_backward)(DType dt, int64_t r0, int64_t r1, int64_t d, const void* grad,
                                int64_t sg, const void* x, int64_t sx, void* grad_x, int64_t sgx);

  // In place on the tokens [t0, t1): rotates the first rot_dim features of every head of q and k
  // by the angle of positions[t] (cos in cache[pos, :rot_dim/2], sin in cache[pos, rot_dim/2:]).
  // neox: halves are rotated against each other; else adjacent pairs (GPT-J). inverse: by -angle.
  void (*rotary)(DType dt, int64_t t0, int64_t t1, const int64_t* positions, void* q,
                 int64_t sq_tok, int64_t sq_head, int64_t nq, void* k, int64_t sk_tok,
                 int64_t sk_head, int64_t nk, int64_t rot_dim, const void* cache,
                 int64_t s_cache, bool neox, bool inverse);

  // Output columns [n0, n1) of out[m, n] = (sum_k x[m, k] * w[n, k]) * scale[n] (+ bias[n]) for
  // m < M. x is float32 (already converted), w int8, scale float32; bias and out are of dt.
  void (*int8_linear)(DType dt, int64_t n0, int64_t n1, int64_t M, int64_t K, const float* x,
                      const int8_t* w, int64_t sw, const float* scale, const void* bias,
                      void* out, int64_t so);

  // Panels [p0, p1) of out[m, n] = (sum_k x[m, k] * w[n, k]) (* scale[n]) for m < M, n < N
  // (x and out float32; w float32, bfloat16 or int8 as `wt` says, converted to float32 exactly),
  // with w packed as panels[p][k][j] = w[64 p + j, k] (zero past N). Each output is one chain of
  // fused multiply-adds over k = 0..K-1 from zero, whatever M and the row's place: batch-
  // invariant. scale (one float32 per output feature, int8 weights) may be null.
  void (*panel_linear)(int64_t p0, int64_t p1, int64_t M, int64_t K, int64_t N, const float* x,
                       int64_t sx, PanelType wt, const void* panels, const float* scale,
                       float* out, int64_t so);

  // Units [u0, u1) of single-query attention over a KV cache of blocks, a unit being (token t,
  // kv head j) = t * kv_heads + j: for each of the `group` query heads h of kv head j, out[t, h]
  // = softmax(scale * q[t, h] . K[l]) @ V over the cached positions l < lengths[t], position l
  // at row l % block of cache block tables[t * s_table + l / block] (a contiguous cache: one
  // block per sequence, its slot, block = max_len). Each sequence is summed on its own, in
  // position order: batch-invariant. scratch holds (u1 - u0) x group x s_scratch floats,
  // s_scratch >= every length.
  void (*decode_attention)(int64_t u0, int64_t u1, int64_t kv_heads, int64_t group, int64_t d,
                           const float* q, int64_t sq_tok, int64_t sq_head, const float* k,
                           const float* v, int64_t sc_block, int64_t sc_head, int64_t sc_pos,
                           int64_t block, const int64_t* tables, int64_t s_table,
                           const int64_t* lengths, float scale, float* scratch,
                           int64_t s_scratch, float* out, int64_t so_tok, int64_t so_head);

  // This variant's W8A8 linear (for AVX-512 without VNNI: AVX2's instructions).
  Int8Kernels int8;
};

// Output features per panel of panel_linear's packed weight.
constexpr int64_t kPanelWidth = 64;

// One table per instruction-set variant; the AVX ones exist on x86-64 only.
#if defined(__x86_64__)
#define KILN_HAVE_X86_VARIANTS 1
#endif

namespace generic { const Kernels& kernels(); }
#if defined(KILN_HAVE_X86_VARIANTS)
namespace avx2 { const Kernels& kernels(); }
namespace avx512 { const Kernels& kernels(); }
// The W8A8 linear with AVX-512 VNNI (vpdpbusd), used by the avx512 variant where the CPU has it.
namespace avx512vnni { const Int8Kernels& int8_kernels(); }
// The same on AMX tiles (tdpbusd), where the CPU has amx_int8 and the OS grants the tile state.
namespace amx { const Int8Kernels& int8_kernels(); }
#endif

}  // namespace kiln::cpu
