"""This process's place in a job (rank, device, collectives) and how the model is parallelized.

`Distributed` reads torchrun's variables, picks the device and owns the process group. A
parallelism strategy wraps the model for training and says how gradients are accumulated and
clipped: `DataParallel` (DDP, or the bare model in a single process) is today's; a sharded one
(FSDP2's `fully_shard` per block) implements the same three methods.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from training.state import TrainError


@dataclass
class Distributed:
    """Rank, world size and device of this process, and the few collectives the trainer uses."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str = "auto", environ: Mapping[str, str] = os.environ) -> Distributed:
        """Reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK and picks the device (`--device`)."""
        local_rank = int(environ.get("LOCAL_RANK", "0"))
        return cls(
            rank=int(environ.get("RANK", "0")),
            world=int(environ.get("WORLD_SIZE", "1")),
            local_rank=local_rank,
            device=_pick_device(device, local_rank),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def init(self) -> None:
        """Joins the process group: NCCL on GPUs, gloo on CPU (nothing to join alone)."""
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend=backend, device_id=self.device if backend == "nccl" else None
            )

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce(self, values: list[float]) -> list[float]:
        """The sums over ranks of a few floats, in one collective (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _pick_device(want: str, local_rank: int) -> torch.device:
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainError("--device cuda, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """The forward pass's precision: bf16 autocast, or fp32."""

    bf16: bool
    device_type: str

    @classmethod
    def choose(cls, flag: str, device: torch.device) -> Precision:
        """`--precision`: auto means bf16 on GPUs that support it, fp32 on CPU."""
        if flag == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        else:
            bf16 = flag == "bf16"
        return cls(bf16=bf16, device_type=device.type)

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


class Strategy(Protocol):
    """How the model is spread over the ranks: what the trainer asks of a parallelism."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that runs forward and backward (the parameters stay `model`'s)."""
        ...

    def accumulating(
        self, wrapped: nn.Module, *, last: bool
    ) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward; gradients sync across ranks on the last."""
        ...

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        """Clips the (global) gradient norm to max_norm and returns it as it was."""
        ...


class DataParallel:
    """A full replica per rank: DDP when there are several ranks, the bare model alone."""

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return model
        device = self.dist.device
        ids = [device.index] if device.type == "cuda" else None
        # No buffer changes during training (the RoPE table is a constant): skip the per-step
        # broadcast of buffers.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def accumulating(
        self, wrapped: nn.Module, *, last: bool
    ) -> contextlib.AbstractContextManager[Any]:
        if last or not isinstance(wrapped, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        # Micro-batches before the last only accumulate locally; the last one's backward
        # all-reduces the sum.
        return wrapped.no_sync()

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        return float(nn.utils.clip_grad_norm_(params, max_norm))
