"""Rotary position tables: the cos/sin table the rotary op reads, for each RoPE variant Llama-family
checkpoints use (plain, `linear`, `dynamic`, `llama3`), computed as `transformers` computes them.

The frequencies, their products with the positions and the cos/sin are all float32, in the order
`transformers`' rotary embedding uses: a model was trained against those roundings (a float64
table differs by an ulp of the angle, ~1e-5 at a position of a few hundred), so matching them
keeps the logits equal to `transformers`' to float tolerance at every position.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modeling.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """The [head_dim / 2] float32 rotation frequencies of `cfg`'s RoPE."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    if scaling.type == "dynamic":
        # NTK scaling raises the base by a function of the current sequence length once it
        # exceeds max_position_embeddings, and only then. kiln's context never does (a model's
        # max_seq_len is at most its max_position_embeddings, see modeling.hf), so within it the
        # frequencies are the plain ones, as in transformers. Beyond it transformers would
        # re-rotate every position, cached ones included, which a KV cache cannot follow.
        if cfg.max_seq_len > scaling.max_position_embeddings:
            raise ValueError(
                f"dynamic RoPE is served up to max_position_embeddings "
                f"({scaling.max_position_embeddings}), not {cfg.max_seq_len}"
            )
        return inv_freq
    # llama3: long wavelengths divided by factor, short ones kept, the band between blended.
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_table(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """[max_seq_len, head_dim] float32: cos of each position's angles, then their sin."""
    inv_freq = inverse_frequencies(cfg, device)
    positions = torch.arange(cfg.max_seq_len, device=device).float()
    # An outer product as transformers' [D/2, 1] @ [1, T] matmul computes it: one rounding each.
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)
