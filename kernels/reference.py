"""Pure-PyTorch versions of every kiln op: the tests' truth and the fallback without the extension.

Arithmetic is in float32 for bfloat16 and float16 inputs (float64 stays float64) with one rounding
at the end, as the kernels do. Functions named with a trailing underscore or `_out` mutate their
arguments exactly as the compiled ops do.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight."""
    xf = _acc(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * _acc(weight)).to(x.dtype)


def rms_norm_out(x: Tensor, weight: Tensor, eps: float, out: Tensor) -> None:
    out.copy_(rms_norm(x, weight, eps))


def rms_norm_backward(
    grad: Tensor, z: Tensor, weight: Tensor, eps: float, grad_residual: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients of rms_norm(z) * weight with respect to z (plus grad_residual) and weight."""
    zf, gf, wf = _acc(z), _acc(grad), _acc(weight)
    n = z.shape[-1]
    rstd = torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps)
    gw = gf * wf
    dot = (gw * zf).sum(-1, keepdim=True)
    grad_z = gw * rstd - zf * dot * rstd.pow(3) / n
    if grad_residual is not None:
        grad_z = grad_z + _acc(grad_residual)
    grad_w = (gf * zf * rstd).reshape(-1, n).sum(0)
    return grad_z.to(z.dtype), grad_w.to(weight.dtype)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual) * weight, x + residual), the sum rounded to x's dtype first."""
    residual_out = (_acc(x) + _acc(residual)).to(x.dtype)
    return rms_norm(residual_out, weight, eps), residual_out


def fused_add_rms_norm_(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> None:
    """In place: residual += x; x = rms_norm(residual) * weight."""
    out, residual_out = fused_add_rms_norm(x, residual, weight, eps)
    residual.copy_(residual_out)
    x.copy_(out)


def fused_add_rms_norm_out(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, out: Tensor
) -> None:
    """residual += x; out = rms_norm(residual) * weight."""
    normed, residual_out = fused_add_rms_norm(x, residual, weight, eps)
    residual.copy_(residual_out)
    out.copy_(normed)


def silu_and_mul(x: Tensor) -> Tensor:
    """silu(gate) * up, where x = [gate, up] on the last dimension."""
    d = x.shape[-1] // 2
    xf = _acc(x)
    return (torch.nn.functional.silu(xf[..., :d]) * xf[..., d:]).to(x.dtype)


def silu_and_mul_out(x: Tensor, out: Tensor) -> None:
    out.copy_(silu_and_mul(x))


def silu_and_mul_backward(grad: Tensor, x: Tensor) -> Tensor:
    d = x.shape[-1] // 2
    xf, gf = _acc(x), _acc(grad)
    a, b = xf[..., :d], xf[..., d:]
    s = torch.sigmoid(a)
    grad_a = gf * b * s * (1 + a * (1 - s))
    grad_b = gf * a * s
    return torch.cat([grad_a, grad_b], dim=-1).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, is_neox: bool) -> Tensor:
    """Rotates the first 2*cos.shape[-1] features of x ([..., H, D]); cos/sin are [..., 1, R/2]."""
    half = cos.shape[-1]
    rot = x[..., : 2 * half]
    if is_neox:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x[..., 2 * half :]], dim=-1)


def rotary_embedding(
    positions: Tensor,
    query: Tensor,
    key: Tensor,
    cos_sin_cache: Tensor,
    is_neox: bool = True,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """RoPE on query [*T, Hq, D] and key [*T, Hk, D] at positions [*T] from a [max_pos, R] cache."""
    half = cos_sin_cache.shape[-1] // 2
    cs = _acc(cos_sin_cache[positions]).unsqueeze(-2)  # [*T, 1, R]
    cos, sin = cs[..., :half], cs[..., half:]
    if inverse:
        sin = -sin
    q = _rotate(_acc(query), cos, sin, is_neox).to(query.dtype)
    k = _rotate(_acc(key), cos, sin, is_neox).to(key.dtype)
    return q, k


def rotary_embedding_(
    positions: Tensor, query: Tensor, key: Tensor, cos_sin_cache: Tensor, is_neox: bool = True
) -> None:
    q, k = rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    query.copy_(q)
    key.copy_(k)


def rotary_embedding_backward(
    positions: Tensor,
    grad_query: Tensor,
    grad_key: Tensor,
    cos_sin_cache: Tensor,
    is_neox: bool = True,
) -> tuple[Tensor, Tensor]:
    """The rotation is orthogonal: its gradient is the rotation by the opposite angle."""
    return rotary_embedding(positions, grad_query, grad_key, cos_sin_cache, is_neox, inverse=True)


def rope_cache(
    max_position: int,
    rot_dim: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The [max_position, rot_dim] table the rotary op reads: cos in the first half, sin after."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    angles = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=device)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-feature int8: weight [N, K] -> (int8 [N, K], float32 scale [N])."""
    wf = weight.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """(x @ weight.T) * scale (+ bias), weight int8 [N, K], scale float32 [N]."""
    y = (x.float() @ weight.float().t()) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_linear_out(
    x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, out: Tensor
) -> None:
    out.copy_(int8_linear(x, weight, scale, bias))


PANEL_WIDTH = 64  # output features per panel of panel_linear's packed weight


def pack_panels(weight: Tensor) -> Tensor:
    """weight [N, K] -> panels [ceil(N / 64), K, 64], panels[p, k, j] = weight[64 p + j, k],
    zero past N: the layout panel_linear streams."""
    n, k = weight.shape
    count = -(-n // PANEL_WIDTH)
    padded = weight.new_zeros(count * PANEL_WIDTH, k)
    padded[:n] = weight
    return padded.view(count, PANEL_WIDTH, k).transpose(1, 2).contiguous()


def unpack_panels(panels: Tensor, out_features: int) -> Tensor:
    """The weight [out_features, K] that pack_panels packed."""
    count, k, width = panels.shape
    return panels.transpose(1, 2).reshape(count * width, k)[:out_features]


def panel_linear(
    x: Tensor, weight_panels: Tensor, out_features: int, scale: Tensor | None = None
) -> Tensor:
    """x @ weight.T (times `scale` per output feature, for int8 panels) with the weight in
    pack_panels' layout, float32, bfloat16 or int8, the product in float32 (float64 for float64
    x). Same values to float tolerance; the compiled op also sums every row the same way
    whatever the batch (this one need not)."""
    xf = _acc(x)
    out = xf @ unpack_panels(weight_panels, out_features).to(xf.dtype).t()
    return out if scale is None else out * scale


def panel_linear_out(
    x: Tensor, weight_panels: Tensor, out_features: int, out: Tensor, scale: Tensor | None = None
) -> None:
    out.copy_(panel_linear(x, weight_panels, out_features, scale))


INT8_GROUP = 4  # inputs per group of w8a8_linear's packed weight (one vpdpbusd lane)


def pack_int8_panels(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weight [N, K] (values in [-127, 127], as quantize_int8 makes them) -> (panels
    [ceil(N / 64), ceil(K / 4), 64, 4] with panels[p, g, j, i] = weight[64 p + j, 4 g + i], zero
    past N and K; the row sums, int32 [N]): the layout w8a8_linear reads."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    if weight.numel() and int(weight.min()) < -127:
        raise ValueError("weight must be in [-127, 127] (symmetric int8); it holds -128")
    n, k = weight.shape
    count, groups = -(-n // PANEL_WIDTH), -(-k // INT8_GROUP)
    padded = weight.new_zeros(count * PANEL_WIDTH, groups * INT8_GROUP)
    padded[:n, :k] = weight
    panels = padded.view(count, PANEL_WIDTH, groups, INT8_GROUP).permute(0, 2, 1, 3).contiguous()
    return panels, weight.sum(dim=1, dtype=torch.int32)


def unpack_int8_panels(panels: Tensor, out_features: int, in_features: int) -> Tensor:
    """The int8 weight [out_features, in_features] that pack_int8_panels packed."""
    count, groups, width, four = panels.shape
    full = panels.permute(0, 2, 1, 3).reshape(count * width, groups * four)
    return full[:out_features, :in_features]


def quantize_rows_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of float32 x [..., K]: (q int8 [..., K], scale float32 [...]) with
    q = round_half_even(x * (127 / max|x|)) in [-127, 127] (0 for an all-zero row) and scale =
    max|x| / 127, each a single float32 operation as the compiled kernels do them."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Tensor / tensor: one IEEE division (a Python number over a tensor is computed as a
    # reciprocal times the number, which can round differently).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(xf * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, amax / torch.full_like(amax, 127.0)


def w8a8_linear(
    x: Tensor, weight_panels: Tensor, weight_sums: Tensor, scale: Tensor, out_features: int
) -> Tensor:
    """x [..., K] quantized per row (quantize_rows_int8), times the int8 weight in
    pack_int8_panels' layout, summed exactly (float64 holds these integer sums exactly), then
    float32(sum) * (row scale * scale[n]): bit for bit what the compiled op computes."""
    del weight_sums  # the compiled op's correction for its unsigned activations
    q, row_scale = quantize_rows_int8(x)
    w = unpack_int8_panels(weight_panels, out_features, x.shape[-1])
    sums = q.double() @ w.double().t()
    return sums.float() * (row_scale.unsqueeze(-1) * scale)


def w8a8_linear_out(
    x: Tensor,
    weight_panels: Tensor,
    weight_sums: Tensor,
    scale: Tensor,
    out_features: int,
    out: Tensor,
) -> None:
    out.copy_(w8a8_linear(x, weight_panels, weight_sums, scale, out_features))


def decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """Per sequence b: softmax(scale * query[b] . K) @ V over positions < lengths[b] of cache
    slot slots[b]; query [B, Hq, D], caches [slots, Hkv, max_len, D], Hq a multiple of Hkv."""
    group = query.shape[1] // key_cache.shape[1]
    out = torch.empty_like(query)
    for b, (slot, length) in enumerate(zip(slots.tolist(), lengths.tolist(), strict=True)):
        k = key_cache[slot, :, :length].repeat_interleave(group, dim=0)  # [Hq, L, D]
        v = value_cache[slot, :, :length].repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hld->hl", query[b].float(), k.float()) * scale
        out[b] = torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), v.float())
    return out


def decode_attention_out(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    scale: float,
    out: Tensor,
) -> None:
    out.copy_(decode_attention(query, key_cache, value_cache, slots, lengths, scale))


def paged_decode_attention(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    scale: float,
) -> Tensor:
    """decode_attention over a paged cache: caches [blocks, Hkv, block_size, D]; sequence b's
    position l is at row l % block_size of block block_tables[b, l // block_size]."""
    block = key_cache.shape[2]
    group = query.shape[1] // key_cache.shape[1]
    out = torch.empty_like(query)
    for b, length in enumerate(lengths.tolist()):
        ids = block_tables[b, : -(-length // block)]
        # [n, Hkv, block, D] -> [Hkv, n * block, D], cut to the length.
        k = key_cache[ids].transpose(0, 1).flatten(1, 2)[:, :length]
        v = value_cache[ids].transpose(0, 1).flatten(1, 2)[:, :length]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hld->hl", query[b].float(), k.float()) * scale
        out[b] = torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), v.float())
    return out


def paged_decode_attention_out(
    query: Tensor,
    key_cache: Tensor,
    value_cache: Tensor,
    block_tables: Tensor,
    lengths: Tensor,
    scale: float,
    out: Tensor,
) -> None:
    out.copy_(paged_decode_attention(query, key_cache, value_cache, block_tables, lengths, scale))
