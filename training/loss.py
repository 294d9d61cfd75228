"""The training loss of a batch of blocks: next-token cross entropy over its targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data import inputs_targets
from training.records import IGNORE


def documents(inputs: Tensor, end_id: int) -> Tensor:
    """Each token's document number within its row [B, T]: a document starts after the token
    that ends one (`end_id`); the row's first token continues whatever came before."""
    starts = torch.zeros_like(inputs)
    starts[:, 1:] = inputs[:, :-1] == end_id
    return starts.cumsum(1)


def batch_loss(
    model: nn.Module, blocks: Tensor, *, fused: bool = True, document_end: int | None = None
) -> Tensor:
    """Mean next-token loss of a batch of blocks over its targets (masked ones left out): text
    blocks [n, seq_len + 1] (every token a target), or [n, 2, seq_len + 1] ids and labels.

    `fused` (the default): the model's forward computes the loss with the output projection
    fused in (`modeling.loss`), never holding the logits whole; else from the full logits.
    `document_end` (`--pack-mask document`): the id that ends a document; each packed document
    attends within itself only, its positions starting at 0.
    """
    inputs, targets = inputs_targets(blocks)
    extra = {}
    if document_end is not None:
        extra["documents"] = documents(inputs, document_end)
    if fused:
        loss: Tensor = model(inputs, targets=targets, **extra)
        return loss
    logits = model(inputs, **extra)
    flat = targets.reshape(-1)
    total = F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), flat, ignore_index=IGNORE, reduction="sum"
    )
    # A batch without targets (all prompt) contributes zero, not NaN.
    return total / flat.ne(IGNORE).sum().clamp(min=1)


def target_count(blocks: Tensor) -> int:
    return int(inputs_targets(blocks)[1].ne(IGNORE).sum())
