"""When and what the trainer checkpoints, and how a run resumes: one full-state file per step
(`Checkpointer`), or every rank's shard (`ShardedCheckpointer`, torch.distributed.checkpoint).

`Checkpointer` gathers the run's state (the weights, optimizer, schedule, `TrainState` and every
rank's random generators), has rank 0 write it with `training.checkpoint` (atomic, `latest.json`,
pruning) into a `training.storage` store, and restores it on resume. A sharded backend (every
rank writing its part with torch.distributed.checkpoint) offers the same `due`, `save`, `load`:
FSDP's weights exist only as shards, and a sharded checkpoint resumes on another world size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from training import checkpoint
from training.parallel import Distributed
from training.state import TrainError, TrainState
from training.storage import LocalStore, Store, download_dir, open_store


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
    def at(cls, location: str | None, **kwargs: Any) -> Self:
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


META = "meta.pt"


@contextlib.contextmanager
def _alone(dist: Distributed) -> Iterator[None]:
    """A single process has no process group: DCP saves and loads alone, as it warns."""
    with warnings.catch_warnings():
        if dist.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class ShardedCheckpointer(Checkpointer):
    """Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own
    shard of the weights and optimizer states (`step-NNNNNNNN/__R_0.distcp` and `.metadata`),
    rank 0 the rest (`meta.pt`: schedule, data position, step, every rank's RNG states), and
    `latest.json` moves only after every rank has written. A load reshards: a checkpoint of
    any world size (and of FSDP or a replica) resumes on any other.

    Locally the ranks write into `.step-NNNNNNNN.partial/` (a path all of them see), renamed
    into place when all are done; for S3 each rank writes into a temporary directory of its
    own and uploads its files. Frozen weights (LoRA's base) are not saved: they come from
    --init-from again.
    """

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model, optim = get_state_dict(self.model, self.optimizer, options=options)
        return {"model": model, "optimizer": optim}

    def save(self, state: TrainState) -> str | None:
        """Every rank writes its shard of `state.step`'s checkpoint (a collective); rank 0
        returns where it went once all have."""
        if self.store is None:
            return None
        import torch.distributed.checkpoint as dcp

        rngs = self.dist.all_gather_object(checkpoint.rng_state())
        name = checkpoint.step_dir(state.step)
        meta = {
            "scheduler": self.scheduler.state_dict(),
            **state.state_dict(),  # data, step, tokens
            "rng": rngs,
            "model_config": self.model_config,
            "world_size": self.dist.world,
        }
        local = isinstance(self.store, LocalStore)
        with tempfile.TemporaryDirectory(prefix="kiln-dcp-") as tmp:
            if isinstance(self.store, LocalStore):
                target = self.store.root / f".{name}.partial"
                if self.dist.is_main:
                    shutil.rmtree(target, ignore_errors=True)
                    target.mkdir(parents=True)
                self.dist.barrier()
            else:
                target = Path(tmp)
            with _alone(self.dist):
                dcp.save(self._state(), checkpoint_id=target)
            if self.dist.is_main:
                torch.save(meta, target / META)
            if not local:  # each rank uploads what it wrote (rank 0: the metadata too)
                for rel in sorted(p.name for p in target.iterdir() if p.is_file()):
                    self.store.put_file(target / rel, f"{name}/{rel}")
            self.dist.barrier()  # every shard is written before the checkpoint is published
        where = None
        if self.dist.is_main:
            if isinstance(self.store, LocalStore):
                final = self.store.root / name
                if final.exists():
                    shutil.rmtree(final)
                os.rename(self.store.root / f".{name}.partial", final)
            where = checkpoint.commit(self.store, state.step, keep=self.keep)
        self.dist.barrier()  # nobody exits (or is killed) before latest.json moved
        return where

    def load(self, state: TrainState) -> str | None:
        """Restores the newest checkpoint (resharded onto this world size) into the model,
        optimizer, schedule, `state` and, on the same world size, this rank's generators."""
        if self.store is None or not (found := checkpoint.latest(self.store)):
            return None
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        name = found[1]
        where = self.store.describe(name)
        with tempfile.TemporaryDirectory(prefix="kiln-dcp-") as tmp:
            if isinstance(self.store, LocalStore):
                path = self.store.root / name
            else:
                path = download_dir(self.store, name, Path(tmp))
            if not (path / META).is_file():
                raise TrainError(
                    f"{where} is not a sharded checkpoint (no {META}): pass "
                    "--checkpoint-format full, or another --checkpoint-dir"
                )
            meta = torch.load(path / META, map_location="cpu", weights_only=True)
            if meta["model_config"] != self.model_config:
                raise TrainError(
                    f"the checkpoint in {where} is of another model "
                    f"({meta['model_config']}); pass --resume false or another --checkpoint-dir"
                )
            sd = self._state()
            with _alone(self.dist):
                dcp.load(sd, checkpoint_id=path)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=sd["model"],
            optim_state_dict=sd["optimizer"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        self.scheduler.load_state_dict(meta["scheduler"])
        state.load_state_dict(meta)
        rngs = meta["rng"]
        if len(rngs) == self.dist.world:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        return where
