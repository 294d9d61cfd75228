"""Sizing a run to a wall-time budget: how many steps fit, and the warm-up and evaluations that go
with them.

A run given `--max-minutes` and `--fit-to-minutes true` times its first steps, then plans: the
step count that ends the loop at its deadline (never more than `--max-steps`), a warm-up of a
twentieth of it and five evaluations along the way. It plans again at each evaluation, from the
rate measured so far (evaluations included), so a machine that slows down or speeds up moves the
end of the schedule, not the deadline. The plan is made at the same steps on every rank, from
rank 0's clock, so every rank stops at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WARMUP_FRACTION = 0.05
EVALUATIONS = 5
# Steps not timed (the first ones allocate and warm caches), then steps timed before planning.
UNTIMED_STEPS = 2
CALIBRATION_STEPS = 8


@dataclass(frozen=True)
class Plan:
    total_steps: int
    warmup_steps: int
    eval_every: int


def plan_total(
    *,
    step: int,
    seconds_per_step: float,
    seconds_left: float,
    max_steps: int,
    eval_cost_steps: float,
    evals_left: int,
) -> int:
    """The run's total steps: what fits in `seconds_left` after the evaluations still due,
    at least one more step (the clock stops a run that has no time left), at most `max_steps`."""
    fits = seconds_left / max(seconds_per_step, 1e-9) - evals_left * eval_cost_steps
    return min(max_steps, max(step + 1, step + math.floor(max(fits, 0.0))))


def first_plan(total_steps: int) -> Plan:
    """Warm-up and evaluation interval for a run of `total_steps`."""
    return Plan(
        total_steps=total_steps,
        warmup_steps=max(1, round(total_steps * WARMUP_FRACTION)),
        eval_every=max(1, total_steps // EVALUATIONS),
    )


class StepClock:
    """The seconds per step measured since the first timed step of this process."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step
        self.start_step: int | None = None
        self.start_time = 0.0

    def tick(self, step: int, now: float) -> None:
        """Called after each step; starts the clock after the untimed steps."""
        if self.start_step is None and step >= self.first_step + UNTIMED_STEPS:
            self.start_step, self.start_time = step, now

    @property
    def calibration_step(self) -> int:
        """The step after which the first plan is made."""
        return self.first_step + UNTIMED_STEPS + CALIBRATION_STEPS

    def seconds_per_step(self, step: int, now: float) -> float | None:
        if self.start_step is None or step <= self.start_step:
            return None
        return (now - self.start_time) / (step - self.start_step)
