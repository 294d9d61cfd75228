"""Validation: the model's mean loss on the held-out blocks, shared out over the ranks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.loss import batch_loss, target_count
from training.parallel import Distributed, Precision


class Evaluator:
    """Mean next-token loss over fixed validation blocks ([n, seq_len + 1]); rank r takes every
    world-th block from r, in micro-batches, and one all-reduce sums the ranks' parts."""

    def __init__(
        self,
        blocks: Tensor,
        *,
        batch_size: int,
        every: int,
        dist: Distributed,
        precision: Precision,
        document_end: int | None = None,
    ) -> None:
        self.blocks, self.batch_size, self.every = blocks, batch_size, every
        self.dist, self.precision = dist, precision
        self.document_end = document_end  # --pack-mask document: the id ending a document

    @property
    def enabled(self) -> bool:
        return self.blocks.shape[0] > 0

    def due(self, step: int) -> bool:
        """Whether `step` is one of the periodic validations (`--eval-every`; 0: none)."""
        return bool(self.every) and step % self.every == 0

    def evaluate(self, model: nn.Module) -> float | None:
        """The validation loss (a collective: every rank calls it), or None with no validation."""
        if not self.enabled:
            return None
        model.eval()
        mine = self.blocks[self.dist.rank :: self.dist.world]
        # Every rank runs as many forwards (a sharded model's forward is a collective): one
        # with fewer blocks than rank 0 runs a spare batch whose loss it ignores.
        most = -(-self.blocks.shape[0] // self.dist.world)
        total = count = 0.0
        with torch.no_grad(), self.precision.autocast():
            for i in range(0, most, self.batch_size):
                b = mine[i : i + self.batch_size].to(self.dist.device)
                if b.shape[0] == 0:
                    batch_loss(
                        model, self.blocks[:1].to(self.dist.device), document_end=self.document_end
                    )
                    continue
                # Weighed by targets: blocks of records hold different numbers of them.
                targets = float(target_count(b))
                total += batch_loss(model, b, document_end=self.document_end).item() * targets
                count += targets
        model.train()
        loss_sum, count = self.dist.all_reduce([total, count])
        return loss_sum / max(count, 1.0)
