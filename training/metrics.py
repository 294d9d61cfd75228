"""The run's metrics: JSON lines on stdout from rank 0, one object per event.

Events: `resume`, `start`, `train` (`train_loss`, `lr`, `grad_norm`, `tokens_per_s`), `val`
(`val_loss`, `val_perplexity`), `checkpoint`, `stopped`, `model`, `registered`. SageMaker's
metric definitions match `"name": value` in these lines.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from training.state import TrainState


class Metrics:
    """Every line the run reports goes through here; ranks other than 0 report nothing."""

    def __init__(self, enabled: bool, job: str) -> None:
        self.enabled, self.job = enabled, job
        self.started = self._last_time = time.monotonic()
        self._last_tokens = 0

    def emit(self, event: str, **fields: Any) -> None:
        if self.enabled:
            record = {"event": event, "job": self.job, **fields}
            print(json.dumps(record), flush=True)

    def start_clock(self, state: TrainState) -> None:
        """Elapsed time and throughput count from here (the first step of this process)."""
        self.started = self._last_time = time.monotonic()
        self._last_tokens = state.tokens

    def train(self, state: TrainState, *, loss: float, lr: float, grad_norm: float) -> None:
        """The step's mean loss over ranks, and tokens/s since the previous `train` line."""
        now = time.monotonic()
        self.emit(
            "train",
            step=state.step,
            train_loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens=state.tokens,
            tokens_per_s=(state.tokens - self._last_tokens) / max(now - self._last_time, 1e-9),
            elapsed_s=round(now - self.started, 3),
        )
        self._last_time, self._last_tokens = now, state.tokens

    def val(self, state: TrainState, loss: float) -> None:
        self.emit("val", step=state.step, val_loss=loss, val_perplexity=math.exp(loss))

    def resume(self, state: TrainState, where: str) -> None:
        self.emit("resume", step=state.step, checkpoint=where)

    def checkpoint(self, state: TrainState, where: str) -> None:
        self.emit("checkpoint", step=state.step, path=where)

    def stopped(self, state: TrainState, reason: str) -> None:
        self.emit("stopped", step=state.step, reason=reason)
