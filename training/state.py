"""Where a training run stands (step, tokens seen, data position), and the error a run raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.data import BlockStream


class TrainError(ValueError):
    """A run that cannot proceed as asked; the message says what to change."""


@dataclass
class TrainState:
    """The run's progress, advanced by `train_step` and passed to whatever reads or restores it.

    The data position lives in the stream (`data`); the random generators are the process's own
    (Python's and torch's), which the checkpointer saves and restores per rank beside this.
    """

    data: BlockStream
    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data.state_dict(), "step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state["data"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
