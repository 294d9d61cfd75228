"""The loop's layers in one process: a step advances the state, a checkpoint restores it exactly,
gradient accumulation adds up to one big batch, validation matches a direct computation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from modeling.model import lm_loss
from tests.training.support import TINY
from training import train
from training.loop import Trainer
from training.parallel import DataParallel, Distributed, Precision
from training.state import TrainError, TrainState

ALONE = Distributed.from_env("cpu", environ={})


def _args(corpus: Path, *extra: str) -> argparse.Namespace:
    return train.parse_args([*TINY, "--data", str(corpus), "--max-steps", "20", *extra], environ={})


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_a_step_advances_the_state_and_a_checkpoint_restores_it_exactly(
    corpus: Path, tmp_path: Path
) -> None:
    args = _args(corpus, "--checkpoint-dir", str(tmp_path / "ck"))
    first = Trainer(args, ALONE)
    state = TrainState(data=first.stream)
    for _ in range(3):
        first.train_step(state)
    assert (state.step, state.tokens) == (3, 3 * 4 * 32)
    assert first.checkpointer.save(state) == str(tmp_path / "ck" / "step-00000003")
    saved = torch.load(tmp_path / "ck" / "step-00000003" / "state.pt", weights_only=True)
    assert list(saved) == [
        "model", "optimizer", "scheduler", "data", "step", "tokens", "rng", "model_config",
        "world_size",
    ]  # fmt: skip
    expected = first.train_step(state)

    second = Trainer(args, ALONE)
    resumed = TrainState(data=second.stream)
    assert second.checkpointer.load(resumed) == str(tmp_path / "ck" / "step-00000003")
    assert (resumed.step, resumed.tokens) == (3, 3 * 4 * 32)
    assert second.train_step(resumed) == expected
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    first.stream.close()
    second.stream.close()


def test_a_checkpoint_of_another_model_is_refused(corpus: Path, tmp_path: Path) -> None:
    ck = ["--checkpoint-dir", str(tmp_path / "ck")]
    small = Trainer(_args(corpus, *ck), ALONE)
    small.checkpointer.save(TrainState(data=small.stream))
    other = Trainer(_args(corpus, *ck, "--num-layers", "1"), ALONE)
    with pytest.raises(TrainError, match="is of another model"):
        other.checkpointer.load(TrainState(data=other.stream))
    small.stream.close()
    other.stream.close()


def test_accumulated_micro_batches_add_up_to_the_whole_batch(corpus: Path) -> None:
    whole = Trainer(_args(corpus, "--micro-batch-size", "4"), ALONE)
    split = Trainer(_args(corpus, "--micro-batch-size", "2", "--grad-accum", "2"), ALONE)
    blocks = whole.stream.next_blocks(4)
    loss = whole.forward_backward(blocks)
    assert split.forward_backward(blocks) == pytest.approx(loss, rel=1e-6)
    a, b = _grads(whole), _grads(split)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    whole.stream.close()
    split.stream.close()


def test_validation_is_the_mean_loss_of_the_held_out_blocks(corpus: Path) -> None:
    trainer = Trainer(_args(corpus, "--eval-every", "5"), ALONE)
    blocks = trainer.evaluator.blocks
    assert blocks.shape == (8, 33)
    with torch.no_grad():
        direct = lm_loss(trainer.model(blocks[:, :-1]), blocks[:, 1:]).item()
    assert trainer.evaluator.evaluate(trainer.wrapped) == pytest.approx(direct, rel=1e-6)
    assert trainer.model.training  # evaluation hands the model back in training mode
    assert [s for s in range(1, 21) if trainer.evaluator.due(s)] == [5, 10, 15, 20]
    trainer.stream.close()

    none = Trainer(_args(corpus, "--val-fraction", "0"), ALONE)
    assert none.evaluator.evaluate(none.wrapped) is None
    none.stream.close()


def test_one_process_runs_the_bare_model_in_fp32_on_cpu() -> None:
    model = torch.nn.Linear(2, 2)
    parallel = DataParallel(ALONE)
    assert parallel.wrap(model) is model
    with parallel.accumulating(model, last=False):
        pass
    assert Precision.choose("auto", torch.device("cpu")).name == "fp32"
    assert Precision.choose("bf16", torch.device("cpu")).name == "bf16"
