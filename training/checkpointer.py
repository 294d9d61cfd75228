"""When and what the trainer checkpoints, and how a run resumes: one full-state file per step.

`Checkpointer` gathers the run's state (the weights, optimizer, schedule, `TrainState` and every
rank's random generators), has rank 0 write it with `training.checkpoint` (atomic, `latest.json`,
pruning) into a `training.storage` store, and restores it on resume. A sharded backend (every
rank writing its part with torch.distributed.checkpoint) offers the same `due`, `save`, `load`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training import checkpoint
from training.parallel import Distributed
from training.state import TrainError, TrainState
from training.storage import Store, open_store


class Checkpointer:
    """Saves every `interval` steps (0: only when asked, on SIGTERM and at the end); loads the
    latest."""

    def __init__(
        self,
        store: Store | None,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        model_config: dict[str, Any],
        dist: Distributed,
        interval: int,
        keep: int,
    ) -> None:
        self.store = store
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.model_config, self.dist = model_config, dist
        self.interval, self.keep = interval, keep

    @classmethod
    def at(cls, location: str | None, **kwargs: Any) -> Checkpointer:
        """A checkpointer writing to a local path or s3:// prefix (None: one that never writes)."""
        return cls(open_store(location) if location else None, **kwargs)

    def due(self, step: int) -> bool:
        """Whether `step` is one of the interval's checkpoints."""
        return bool(self.interval) and step % self.interval == 0

    def save(self, state: TrainState) -> str | None:
        """Writes the checkpoint of `state.step` (a collective: every rank calls it); rank 0
        returns where it went."""
        if self.store is None:
            return None
        rngs = self.dist.all_gather_object(checkpoint.rng_state())
        where = None
        if self.dist.is_main:
            payload = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **state.state_dict(),  # data, step, tokens
                "rng": rngs,
                "model_config": self.model_config,
                "world_size": self.dist.world,
            }
            where = checkpoint.save(self.store, state.step, payload, keep=self.keep)
        self.dist.barrier()  # nobody exits (or is killed) before the checkpoint is whole
        return where

    def load(self, state: TrainState) -> str | None:
        """Restores the newest checkpoint into the model, optimizer, schedule, `state` and this
        rank's random generators; returns where it came from, or None when there is none."""
        if self.store is None or not (found := checkpoint.latest(self.store)):
            return None
        where = self.store.describe(found[1])
        saved = checkpoint.load(self.store, found[1])
        if saved["model_config"] != self.model_config:
            raise TrainError(
                f"the checkpoint in {where} is of another model "
                f"({saved['model_config']}); pass --resume false or another --checkpoint-dir"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        state.load_state_dict(saved)
        rngs = saved["rng"]
        # Another world size's generators do not map onto these ranks: keep the fresh ones.
        if len(rngs) == self.dist.world:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        return where
