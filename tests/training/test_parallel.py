"""`--strategy auto`: a replica where it fits one device, FSDP over several ranks where not."""

from __future__ import annotations

import torch

from training.parallel import DataParallel, Distributed, FullyShard, choose_strategy


def _dist(world: int) -> Distributed:
    return Distributed(rank=0, world=world, local_rank=0, device=torch.device("cpu"))


def test_auto_shards_over_several_ranks_only_when_a_replica_does_not_fit() -> None:
    # 1M trainable parameters: 16 MB of weights, gradients and AdamW states (70% usable).
    fits = {"trainable": 10**6, "frozen": 0, "bf16": False, "memory": 2**30}
    tight = dict(fits, memory=2**20)
    assert isinstance(choose_strategy("auto", _dist(2), **fits), DataParallel)
    assert isinstance(choose_strategy("auto", _dist(2), **tight), FullyShard)
    assert isinstance(choose_strategy("auto", _dist(1), **tight), DataParallel)  # nothing to shard
    # A frozen base counts its weights alone (4 bytes each): LoRA's replica fits where full
    # fine-tuning's does not.
    lora = {"trainable": 10**4, "frozen": 10**6, "bf16": False, "memory": 8 * 2**20}
    assert isinstance(choose_strategy("auto", _dist(2), **lora), DataParallel)
    full = dict(lora, trainable=10**6, frozen=0)
    assert isinstance(choose_strategy("auto", _dist(2), **full), FullyShard)
