// Every schema of the kiln namespace, in one place. Device code registers implementations
// (TORCH_LIBRARY_IMPL) in csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp; kernels/ops.py adds
// the fake (meta) kernels and the autograd formulas.
//
// Each op has a functional form returning new tensors (what training and torch.compile use) and
// in-place or write-into-`out` forms that return nothing (what decode uses: no allocation).
// Mutated arguments are annotated (a!) so that torch.compile functionalizes them correctly.
#include <torch/library.h>

TORCH_LIBRARY(kiln, m) {
  // out = x * rsqrt(mean(x^2, -1) + eps) * weight, in float32 arithmetic for bfloat16.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_out(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  // Gradient of rms_norm(z) * weight: (grad_z [+ grad_residual], grad_weight).
  m.def(
      "rms_norm_backward(Tensor grad, Tensor z, Tensor weight, float eps, "
      "Tensor? grad_residual=None) -> (Tensor, Tensor)");

  // residual_out = x + residual; out = rms_norm(residual_out) * weight. Returns (out, residual_out).
  m.def(
      "fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) "
      "-> (Tensor, Tensor)");
  // In place: residual += x; x = rms_norm(residual) * weight.
  m.def(
      "fused_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // residual += x; out = rms_norm(residual) * weight.
  m.def(
      "fused_add_rms_norm_out(Tensor x, Tensor(a!) residual, Tensor weight, float eps, "
      "Tensor(b!) out) -> ()");

  // x = [gate, up] on the last dimension; out = silu(gate) * up.
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("silu_and_mul_out(Tensor x, Tensor(a!) out) -> ()");
  m.def("silu_and_mul_backward(Tensor grad, Tensor x) -> Tensor");

  // positions [*T] int64; query [*T, Hq, D]; key [*T, Hk, D]; cos_sin_cache [max_pos, rot_dim]
  // holding cos in [:, :rot_dim/2] and sin in [:, rot_dim/2:]. The first rot_dim features of
  // every head are rotated: as halves (is_neox) or as adjacent pairs (GPT-J).
  m.def(
      "rotary_embedding(Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache, "
      "bool is_neox=True) -> (Tensor, Tensor)");
  m.def(
      "rotary_embedding_(Tensor positions, Tensor(a!) query, Tensor(b!) key, "
      "Tensor cos_sin_cache, bool is_neox=True) -> ()");
  m.def(
      "rotary_embedding_backward(Tensor positions, Tensor grad_query, Tensor grad_key, "
      "Tensor cos_sin_cache, bool is_neox=True) -> (Tensor, Tensor)");

  // Weight-only int8: out = (x @ weight.T) * scale + bias, weight int8 [N, K] with one float32
  // scale per output feature. Inference only (no autograd).
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def(
      "int8_linear_out(Tensor x, Tensor weight, Tensor scale, Tensor? bias, Tensor(a!) out) "
      "-> ()");

  // Batch-invariant linear for decode: out [..., out_features] = x [..., K] @ weight.T, each
  // output summed over k in order with one fused multiply-add per step, so that a row's result
  // never depends on how many rows share the call or where it sits. weight_panels is the weight
  // packed by kernels.reference.pack_panels: [ceil(out_features / 64), K, 64], zero-padded,
  // float32, bfloat16 or int8 (weight-only quantized: then `scale`, float32 [out_features],
  // multiplies each finished sum). CPU, x and out float32, inference only (no autograd).
  m.def(
      "panel_linear(Tensor x, Tensor weight_panels, int out_features, Tensor? scale=None) -> "
      "Tensor");
  m.def(
      "panel_linear_out(Tensor x, Tensor weight_panels, int out_features, Tensor(a!) out, "
      "Tensor? scale=None) -> ()");

  // W8A8 linear (int8 weights and int8 activations, int32 sums): each row of x [..., K] is
  // quantized symmetrically on its own (scale max|x| / 127, round half to even), multiplied
  // exactly in integers by the int8 weight packed by kernels.reference.pack_int8_panels
  // (weight_panels [ceil(N / 64), ceil(K / 4), 64, 4], weight_sums int32 [N] = its row sums,
  // values in [-127, 127]), and out = float(sum) * (row scale * scale[n]). Exact sums make a
  // row's result independent of the batch on every CPU variant. CPU, float32 x and out.
  m.def(
      "w8a8_linear(Tensor x, Tensor weight_panels, Tensor weight_sums, Tensor scale, "
      "int out_features) -> Tensor");
  m.def(
      "w8a8_linear_out(Tensor x, Tensor weight_panels, Tensor weight_sums, Tensor scale, "
      "int out_features, Tensor(a!) out) -> ()");

  // Attention of one new query per sequence over its own KV-cache slot (decode): query
  // [B, Hq, D]; key_cache and value_cache [slots, Hkv, max_len, D] (Hq a multiple of Hkv);
  // slots and lengths int64 [B]: sequence b attends to positions < lengths[b] of its slot.
  // out [B, Hq, D] = softmax(scale * q . K) @ V. Each sequence is computed on its own, in
  // position order, so its result does not depend on the batch. CPU, float32, inference only.
  m.def(
      "decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor slots, "
      "Tensor lengths, float scale) -> Tensor");
  m.def(
      "decode_attention_out(Tensor query, Tensor key_cache, Tensor value_cache, Tensor slots, "
      "Tensor lengths, float scale, Tensor(a!) out) -> ()");

  // The same over a paged KV cache: key_cache and value_cache [blocks, Hkv, block_size, D];
  // block_tables int64 [B, n]: sequence b's position l is at row l % block_size of block
  // block_tables[b, l / block_size] (entries past its length are not read). Summed in position
  // order as decode_attention is: with block_size a multiple of 4, bit for bit its result.
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor lengths, float scale) -> Tensor");
  m.def(
      "paged_decode_attention_out(Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor lengths, float scale, Tensor(a!) out) -> ()");
}
