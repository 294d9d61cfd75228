"""The run's metrics: JSON lines on stdout from rank 0, one object per event.

Events: `resume`, `start`, `train` (`train_loss`, `lr`, `grad_norm`, `tokens_per_s`,
`total_steps`, `eta_s`), `val` (`val_loss`, `val_perplexity`), `checkpoint`, `stopped`, `model`,
`registered`.
SageMaker's metric definitions match `"name": value` in these lines. Beside them, at a steady
interval (`--progress-every` seconds), a person reads the same numbers as one line on stderr:
`step 120/1800 (7%) | loss 2.314 | 12,345 tok/s | 21s elapsed | ETA 2m39s`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from training.state import TrainState

log = logging.getLogger("training")


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(event: dict[str, Any]) -> str:
    """The human form of a `train` event."""
    step, total = event["step"], event.get("total_steps")
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
    parts.append(f"loss {event['train_loss']:.3f}")
    parts.append(f"{event['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{duration(event['elapsed_s'])} elapsed")
    if event.get("eta_s") is not None:
        parts.append(f"ETA {duration(event['eta_s'])}")
    return " | ".join(parts)


if TYPE_CHECKING:
    from training.tracking import Tracker


class Metrics:
    """Every line the run reports goes through here; ranks other than 0 report nothing. With
    a `tracker` (MLflow, `training.tracking`), each record goes there too."""

    def __init__(
        self,
        enabled: bool,
        job: str,
        progress_every: float = 10.0,
        tracker: Tracker | None = None,
    ) -> None:
        self.enabled, self.job, self.tracker = enabled, job, tracker
        self.progress_every = progress_every  # seconds between progress lines; 0: none
        self.started = self._last_time = self._last_line = time.monotonic()
        self._last_tokens = 0
        self._start_step = 0

    def emit(self, event: str, **fields: Any) -> None:
        if self.enabled:
            record = {"event": event, "job": self.job, **fields}
            print(json.dumps(record), flush=True)
            if self.tracker is not None:
                self.tracker.event(record)

    def start_clock(self, state: TrainState) -> None:
        """Elapsed time and throughput count from here (the first step of this process)."""
        self.started = self._last_time = time.monotonic()
        self._last_line = float("-inf")  # the first step shows a line at once
        self._last_tokens = state.tokens
        self._start_step = state.step

    def overdue(self) -> bool:
        """Whether a progress line is due by the clock (between the `--log-every` steps)."""
        return self.progress_every > 0 and time.monotonic() - self._last_line >= self.progress_every

    def eta(self, state: TrainState, total_steps: int, deadline: float | None) -> float | None:
        """Seconds until the last step at this process's mean rate, capped by the deadline."""
        done = state.step - self._start_step
        if done <= 0:
            return None
        now = time.monotonic()
        left = (now - self.started) / done * max(0, total_steps - state.step)
        return max(0.0, min(left, deadline - now) if deadline is not None else left)

    def train(
        self,
        state: TrainState,
        *,
        loss: float,
        lr: float,
        grad_norm: float,
        total_steps: int | None = None,
        deadline: float | None = None,
        final: bool = False,
    ) -> None:
        """The step's mean loss over ranks, tokens/s since the previous `train` line, and where
        the run stands against its total; also the progress line when one is due."""
        now = time.monotonic()
        eta = self.eta(state, total_steps, deadline) if total_steps else None
        event: dict[str, Any] = {
            "step": state.step,
            "train_loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": state.tokens,
            "tokens_per_s": (state.tokens - self._last_tokens) / max(now - self._last_time, 1e-9),
            "elapsed_s": round(now - self.started, 3),
            "total_steps": total_steps,
            "eta_s": None if eta is None else round(eta, 1),
        }
        self.emit("train", **event)
        self._last_time, self._last_tokens = now, state.tokens
        due = final or now - self._last_line >= self.progress_every
        if self.enabled and self.progress_every > 0 and due:
            log.info("%s", progress_line(event))
            self._last_line = now

    def val(self, state: TrainState, loss: float) -> None:
        self.emit("val", step=state.step, val_loss=loss, val_perplexity=math.exp(loss))

    def resume(self, state: TrainState, where: str) -> None:
        self.emit("resume", step=state.step, checkpoint=where)

    def checkpoint(self, state: TrainState, where: str) -> None:
        self.emit("checkpoint", step=state.step, path=where)

    def stopped(self, state: TrainState, reason: str) -> None:
        self.emit("stopped", step=state.step, reason=reason)
