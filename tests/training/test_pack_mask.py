"""--pack-mask document: packed documents attend within themselves only, positions restarting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling.attention import document_positions
from modeling.config import PRESETS
from modeling.model import LlamaModel
from tests.training.support import TINY, write_corpus
from training import train
from training.loop import Trainer
from training.loss import batch_loss, documents
from training.parallel import Distributed
from training.state import TrainState

END = 2


def test_documents_start_after_each_end_token_and_positions_restart() -> None:
    ids = torch.tensor([[5, 6, END, 7, END, END, 8, 9], [END, 1, 1, 1, 1, 1, 1, 1]])
    docs = documents(ids, END)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(docs).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 0, 1, 2, 3, 4, 5, 6],
    ]


def test_a_packed_document_computes_what_it_computes_alone() -> None:
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = LlamaModel(cfg).eval()
    first = torch.randint(3, cfg.vocab_size, (1, 7))
    first[0, -1] = END
    second = torch.randint(3, cfg.vocab_size, (1, 9))
    packed = torch.cat([first, second], dim=1)
    with torch.no_grad():
        together = model(packed, documents=documents(packed, END))
        alone = [model(first), model(second)]
        causal = model(packed)  # attends across the boundary, positions running on
    torch.testing.assert_close(together, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal[:, 7:], alone[1], atol=1e-3)
    # The fused loss sees the same masks: the packed loss is the token-weighted mean of the two.
    targets = torch.cat([packed[:, 1:], torch.full((1, 1), -100)], dim=1)
    # [1, 2, T + 1] ids and labels (the labels shifted: label t is the target of input t - 1).
    blocks = torch.stack(
        [torch.cat([packed, packed[:, :1]], 1), torch.cat([targets[:, :1], targets], 1)], 1
    )
    with torch.no_grad():
        loss = batch_loss(model, blocks, document_end=END)
        want = torch.nn.functional.cross_entropy(together[0, :-1], packed[0, 1:])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


def test_training_with_document_masks_lowers_the_loss(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    argv = [
        *TINY,
        "--data", str(write_corpus(tmp_path / "data", files=4, sentences=60)),
        "--max-steps", "12", "--lr", "1e-2", "--pack-mask", "document",
        "--output-dir", str(tmp_path / "out"),
    ]  # fmt: skip
    trainer = Trainer(train.parse_args(argv, environ={}), Distributed.from_env("cpu", environ={}))
    state = TrainState(data=trainer.stream)
    assert trainer.document_end is not None
    assert trainer.describe(state)["pack_mask"] == "document"
    losses = []
    for _ in range(12):
        losses.append(trainer.train_step(state)[0])
    trainer.stream.close()
    assert losses[-1] < losses[0] - 0.5


def test_document_masks_under_compile_give_the_eager_losses(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """--compile (each block through inductor) with --pack-mask document: every batch packs its
    documents differently, and the compiled blocks take each batch's mask (a graph input, not a
    constant of the first batch's graph), so the steps' losses are the eager run's."""
    from torch._dynamo.utils import counters

    data = write_corpus(tmp_path / "data", files=4, sentences=60)
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compiled in ("false", "true"):
        argv = [
            *TINY,
            "--data", str(data), "--max-steps", "3", "--lr", "1e-2", "--pack-mask", "document",
            "--compile", compiled, "--output-dir", str(tmp_path / f"out-{compiled}"),
        ]  # fmt: skip
        trainer = Trainer(
            train.parse_args(argv, environ={}), Distributed.from_env("cpu", environ={})
        )
        state = TrainState(data=trainer.stream)
        runs.append([trainer.train_step(state)[0] for _ in range(3)])
        trainer.stream.close()
    eager, compiled_losses = runs
    # The blocks did run compiled: graphs for the first block (no residual yet) and the rest.
    assert counters["stats"]["unique_graphs"] >= 2
    assert compiled_losses == pytest.approx(eager, rel=1e-4)
    torch._dynamo.reset()
