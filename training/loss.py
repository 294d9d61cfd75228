"""The training loss of a batch of blocks: next-token cross entropy over its targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from modeling.model import lm_loss
from training.data import inputs_targets
from training.records import IGNORE


def batch_loss(model: nn.Module, blocks: Tensor) -> Tensor:
    """Mean next-token loss of a batch of blocks over its targets (masked ones left out): text
    blocks [n, seq_len + 1] (every token a target), or [n, 2, seq_len + 1] ids and labels."""
    inputs, targets = inputs_targets(blocks)
    logits = model(inputs)
    if blocks.dim() == 2:
        return lm_loss(logits, targets)
    flat = targets.reshape(-1)
    total = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="sum"
    )
    # A batch without targets (all prompt) contributes zero, not NaN.
    return total / flat.ne(IGNORE).sum().clamp(min=1)


def target_count(blocks: Tensor) -> int:
    return int(inputs_targets(blocks)[1].ne(IGNORE).sum())
