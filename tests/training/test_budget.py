"""Sizing a run to its minutes: the plan's arithmetic and the progress line."""

from __future__ import annotations

from training.budget import StepClock, first_plan, plan_total
from training.metrics import duration, progress_line


def test_the_total_is_what_fits_after_the_evaluations_left() -> None:
    common = {"step": 10, "seconds_per_step": 0.1, "max_steps": 10_000, "eval_cost_steps": 2.0}
    assert plan_total(seconds_left=100, evals_left=4, **common) == 10 + 1000 - 8
    # Never past --max-steps, never fewer than one more step.
    assert plan_total(seconds_left=1e6, evals_left=0, **{**common, "max_steps": 500}) == 500
    assert plan_total(seconds_left=0, evals_left=4, **common) == 11
    # At the last step a new plan adds none.
    assert plan_total(seconds_left=100, evals_left=0, **{**common, "max_steps": 10}) == 10


def test_the_first_plan_warms_up_over_a_twentieth_and_evaluates_five_times() -> None:
    plan = first_plan(2000)
    assert (plan.warmup_steps, plan.eval_every) == (100, 400)
    assert first_plan(3).warmup_steps == 1 and first_plan(3).eval_every == 1


def test_the_clock_skips_the_first_steps() -> None:
    clock = StepClock(first_step=0)
    clock.tick(1, now=5.0)  # the first steps are slow: not timed
    assert clock.seconds_per_step(1, now=5.0) is None
    clock.tick(2, now=6.0)
    assert clock.seconds_per_step(6, now=8.0) == 0.5
    assert clock.calibration_step == 10


def test_progress_line() -> None:
    event = {
        "step": 120,
        "total_steps": 1800,
        "train_loss": 2.3141,
        "tokens_per_s": 12345.6,
        "elapsed_s": 21.2,
        "eta_s": 159.0,
    }
    assert progress_line(event) == (
        "step 120/1800 (7%) | loss 2.314 | 12,346 tok/s | 21s elapsed | ETA 2m39s"
    )
    assert duration(3725) == "1h02m"
