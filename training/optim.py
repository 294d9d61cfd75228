"""The optimizer and learning-rate schedule: AdamW with decay on matrices, warmup then cosine."""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn


def lr_lambda(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at `total` steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """A picklable LR lambda (LambdaLR saves callable objects' state; it cannot save closures)."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_lambda(step, warmup=self.warmup, total=self.total, min_ratio=self.min_ratio)


def build_optimizer(
    model: nn.Module, args: argparse.Namespace, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's parameters (weight decay on matrices only) and its LR schedule."""
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, Schedule(args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    return optimizer, scheduler
