"""The scheduler alone, no model: admission, slots, the queue bound, deadlines, cancels, stop."""

from __future__ import annotations

import threading
import time

import pytest

from inference.scheduler import NotAcceptingError, QueueFullError, ScheduledStep, Scheduler
from inference.sequence import FinishReason, SamplingParams, Sequence

LATER = 1e18  # a deadline that never comes


def seq(prompt_len: int = 4, deadline: float = LATER) -> Sequence:
    return Sequence(prompt=[1] * prompt_len, params=SamplingParams(8), deadline=deadline)


def scheduler(slots: int = 2, max_queue: int = 2, budget: int = 100) -> Scheduler:
    s = Scheduler(slots=slots, max_queue=max_queue, prefill_budget=budget)
    s.accepting = True
    return s


def step(s: Scheduler) -> ScheduledStep:
    planned = s.schedule()
    assert planned is not None
    return planned


def finish(s: Scheduler, sequence: Sequence, reason: FinishReason = FinishReason.LENGTH) -> None:
    """What the engine does when a sequence ends in its step."""
    sequence.finish = reason
    s.release(sequence)
    s.end_step()


def test_admission_takes_the_lowest_free_slots_and_decodes_from_the_next_step() -> None:
    s = scheduler(slots=3)
    a, b = seq(), seq()
    s.submit(a)
    s.submit(b)
    first = step(s)
    assert first.prefill == [a, b] and first.decode == [] and (a.slot, b.slot) == (0, 1)
    assert a.admitted_at is not None
    finish(s, a)
    c = seq()
    s.submit(c)
    second = step(s)
    assert second.decode == [b] and second.prefill == [c] and c.slot == 0  # a's slot again
    assert s.running == [c, b]  # by slot: the decoder reads slots [0, highest]


def test_the_queue_is_bounded_and_refuses_at_once() -> None:
    s = scheduler(slots=1, max_queue=1)
    s.submit(seq())
    s.submit(seq())
    with pytest.raises(QueueFullError, match="0 requests running and 2 waiting"):
        s.submit(seq())
    with pytest.raises(NotAcceptingError, match="model not ready"):
        Scheduler(slots=1, max_queue=1, prefill_budget=1).submit(seq())
    s.stop()
    with pytest.raises(NotAcceptingError, match="shutting down"):
        s.submit(seq())
    assert s.schedule() is None


def test_the_prefill_budget_bounds_a_step_but_admits_one_long_prompt() -> None:
    s = scheduler(slots=4, budget=10)
    long, short, other = seq(30), seq(4), seq(4)
    for x in (long, short, other):
        s.submit(x)
    assert step(s).prefill == [long]  # alone over the budget: admitted anyway
    assert step(s).prefill == [short, other]


def test_deadlines_retire_running_and_waiting_sequences() -> None:
    s = scheduler(slots=1, max_queue=2)
    running, waiting = seq(deadline=time.monotonic() + 0.05), seq(deadline=time.monotonic() + 0.05)
    s.submit(running)
    s.submit(waiting)
    step(s)
    time.sleep(0.06)
    planned = step(s)
    assert planned.retired == [(running, FinishReason.TIMEOUT), (waiting, FinishReason.TIMEOUT)]
    assert planned.decode == planned.prefill == [] and s.running == []
    assert running.slot == -1 and s.counts() == (0, 0)


def test_cancels_retire_at_the_next_step_waiting_ones_without_a_slot() -> None:
    s = scheduler(slots=1, max_queue=1)
    running, waiting = seq(), seq()
    s.submit(running)
    s.submit(waiting)
    step(s)
    s.cancel(waiting)
    s.cancel(running)
    planned = step(s)
    assert (running, FinishReason.CANCELLED) in planned.retired
    assert (waiting, FinishReason.CANCELLED) in planned.retired  # popped into the freed slot
    assert waiting.slot == -1 and s.counts() == (0, 0)


def test_schedule_waits_for_work_and_drain_takes_what_is_left() -> None:
    s = scheduler()
    got: list[ScheduledStep | None] = []
    waiter = threading.Thread(target=lambda: got.append(s.schedule()))
    waiter.start()
    time.sleep(0.05)
    assert got == []  # nothing to do: it waits
    s.submit(seq())
    waiter.join(5)
    assert got and got[0] is not None and len(got[0].prefill) == 1
    queued = seq()
    s.submit(queued)
    assert s.drain() == [*got[0].prefill, queued] and s.sequences() == []
