"""This process's place in a job (rank, device, collectives) and how the model is parallelized.

`Distributed` reads torchrun's variables, picks the device and owns the process group. A
parallelism strategy wraps the model for training and says how gradients are accumulated and
clipped: `DataParallel` (DDP, or the bare model in a single process), or `FullyShard` (FSDP2's
`fully_shard` per block: each rank holds 1/world of the weights, gradients and optimizer states,
a block's weights are gathered just before it runs). `choose_strategy` picks one for
`--strategy auto`: FSDP when a replica of the weights, gradients and AdamW states would not fit.
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

    name: str

    def wrap(self, model: nn.Module, *, compile: bool = False) -> nn.Module:
        """The module that runs forward and backward (the parameters stay `model`'s, sharded
        in place by a sharded strategy); `compile`: under torch.compile."""
        ...

    def accumulating(
        self, wrapped: nn.Module, *, last: bool
    ) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward; gradients sync across ranks on the last."""
        ...

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        """Clips the (global) gradient norm to max_norm and returns it as it was."""
        ...


def checkpoint_activations(model: nn.Module) -> None:
    """Activation checkpointing per block: a block's backward recomputes its forward instead
    of keeping its activations (the composable form keeps parameter names unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in model.layers:  # type: ignore[union-attr]
        checkpoint(block)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block in place: the blocks share one compiled graph (compiling the
    whole model would trace every layer, and the fused loss is a graph break anyway)."""
    for block in model.layers:  # type: ignore[union-attr]
        block.compile()


class DataParallel:
    """A full replica per rank: DDP when there are several ranks, the bare model alone."""

    name = "ddp"

    def __init__(self, dist: Distributed, *, activation_checkpointing: bool = False) -> None:
        self.dist = dist
        self.activation_checkpointing = activation_checkpointing

    def wrap(self, model: nn.Module, *, compile: bool = False) -> nn.Module:
        if self.activation_checkpointing:
            checkpoint_activations(model)
        if compile:
            compile_blocks(model)
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


class FullyShard:
    """FSDP2: `fully_shard` on every block, then on the model (embedding, final norm, head).

    With bf16 the gathered weights a block computes with are bfloat16 and gradients are
    reduce-scattered in float32 onto the float32 shards the optimizer steps (no autocast is
    needed). Gradients sync on the last micro-batch of a step only.
    """

    name = "fsdp"

    def __init__(
        self, dist: Distributed, *, bf16: bool, activation_checkpointing: bool = False
    ) -> None:
        self.dist, self.bf16 = dist, bf16
        self.activation_checkpointing = activation_checkpointing
        self.root: Any = None

    def wrap(self, model: nn.Module, *, compile: bool = False) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.activation_checkpointing:
            checkpoint_activations(model)
        mesh = init_device_mesh(self.dist.device.type, (self.dist.world,))
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if self.bf16 else None, reduce_dtype=torch.float32
        )
        layers = list(model.layers)  # type: ignore[union-attr,arg-type]
        if compile:
            compile_blocks(model)
        for i, block in enumerate(layers):
            # The last block's weights are needed again at once by backward: keep them.
            fully_shard(
                block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1
            )
        self.root = fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    def accumulating(
        self, wrapped: nn.Module, *, last: bool
    ) -> contextlib.AbstractContextManager[Any]:
        self.root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        params = [p for p in params if p.grad is not None]
        total = nn.utils.get_total_norm([p.grad for p in params])  # type: ignore[misc]
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the shards' norms combined over the ranks
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)


# AdamW in float32: weights 4, gradients 4, two moments 8 bytes a parameter.
REPLICA_BYTES_PER_PARAM = 16


def device_memory(device: torch.device) -> int:
    """Bytes of memory of one device: the GPU's, or on CPU the machine's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def replica_fits(
    trainable: int,
    frozen: int,
    device: torch.device,
    headroom: float = 0.7,
    *,
    memory: int | None = None,
) -> bool:
    """Whether a full replica's weights, gradients and AdamW states (of the trainable
    parameters) fit in `headroom` of the device's memory (`memory` bytes where given, else what
    the device reports), leaving the rest to activations."""
    need = trainable * REPLICA_BYTES_PER_PARAM + frozen * 4
    return need <= headroom * (memory or device_memory(device))


def choose_strategy(
    flag: str,
    dist: Distributed,
    *,
    trainable: int,
    frozen: int,
    bf16: bool,
    activation_checkpointing: bool = False,
    memory: int | None = None,
) -> DataParallel | FullyShard:
    """`--strategy`: ddp, fsdp, or auto (FSDP when several ranks share a model whose replica
    would not fit one device of `memory` bytes, by default what it reports). A single process
    runs the bare model either way."""
    if flag == "auto":
        fits = replica_fits(trainable, frozen, dist.device, memory=memory)
        flag = "ddp" if dist.world == 1 or fits else "fsdp"
    if flag == "fsdp" and dist.world > 1:  # alone there is nothing to shard over
        return FullyShard(dist, bf16=bf16, activation_checkpointing=activation_checkpointing)
    return DataParallel(dist, activation_checkpointing=activation_checkpointing)
