"""The scheduler alone, no model: admission by blocks, chunked prefill beside decode, preemption,
prefix reuse, the queue bound, deadlines, cancels, stop."""

from __future__ import annotations

import threading
import time

import pytest

from inference.blocks import BlockManager
from inference.scheduler import NotAcceptingError, QueueFullError, ScheduledStep, Scheduler
from inference.sequence import FinishReason, SamplingParams, Sequence

LATER = 1e18  # a deadline that never comes


def seq(prompt_len: int = 4, deadline: float = LATER, first: int = 1) -> Sequence:
    prompt = [first] + [1] * (prompt_len - 1)
    return Sequence(prompt=prompt, params=SamplingParams(8), deadline=deadline)


def scheduler(
    slots: int = 2, max_queue: int = 2, budget: int = 100, blocks: int = 64, block_size: int = 4
) -> Scheduler:
    s = Scheduler(
        max_batch=slots,
        max_queue=max_queue,
        prefill_chunk=budget,
        blocks=BlockManager(blocks, block_size),
    )
    s.accepting = True
    return s


def step(s: Scheduler) -> ScheduledStep:
    planned = s.schedule()
    assert planned is not None
    return planned


def run(s: Scheduler, planned: ScheduledStep, token: int = 7) -> None:
    """What the runner and the engine do with a planned step (no model): the chunks and the
    decode step computed, a token for each sequence whose prefill ended and each decoded one."""
    for chunk in planned.prefill:
        last = chunk.last
        chunk.sequence.computed = chunk.end
        if last:
            chunk.sequence.target = 0
            chunk.sequence.tokens.append(token)
    for q in planned.decode:
        q.computed = q.position + 1
        q.tokens.append(token)
    s.end_step()


def prefilled(planned: ScheduledStep) -> list[tuple[Sequence, int, int]]:
    return [(c.sequence, c.start, c.end) for c in planned.prefill]


def finish(s: Scheduler, sequence: Sequence, reason: FinishReason = FinishReason.LENGTH) -> None:
    """What the engine does when a sequence ends in its step."""
    sequence.finish = reason
    s.release(sequence)
    s.end_step()


def test_admission_prefills_then_decodes_from_the_next_step() -> None:
    s = scheduler(slots=3)
    a, b = seq(), seq(6)
    s.submit(a)
    s.submit(b)
    first = step(s)
    assert prefilled(first) == [(a, 0, 4), (b, 0, 6)] and first.decode == []
    assert a.admitted_at is not None and len(a.blocks) == 1 and len(b.blocks) == 2
    run(s, first)
    finish(s, a)
    assert a.blocks == [] and not a.running
    c = seq()
    s.submit(c)
    second = step(s)
    assert second.decode == [b] and prefilled(second) == [(c, 0, 4)]
    assert s.running == [b, c]  # admission order


def test_running_streams_decode_every_step_while_a_long_prompt_is_chunked() -> None:
    s = scheduler(slots=4, budget=10)
    streams = [seq(3), seq(5)]
    for x in streams:
        s.submit(x)
    run(s, step(s))
    long = seq(35, first=9)  # nothing in common with the streams: no prefix hit
    s.submit(long)
    chunks = []
    for _ in range(4):
        planned = step(s)
        assert planned.decode == streams  # a token each, every step
        chunks += prefilled(planned)
        run(s, planned)
    assert chunks == [(long, 0, 10), (long, 10, 20), (long, 20, 30), (long, 30, 35)]
    assert long.tokens == [7] and step(s).decode == [*streams, long]


def test_the_budget_is_shared_by_a_step_and_a_new_prompt_starts_in_the_same_step() -> None:
    s = scheduler(slots=4, budget=10)
    a, b, c = seq(6, first=2), seq(6, first=3), seq(6, first=4)
    for x in (a, b, c):
        s.submit(x)
    first = step(s)
    assert prefilled(first) == [(a, 0, 6), (b, 0, 4)]  # c waits: the budget is spent
    run(s, first)
    second = step(s)
    assert second.decode == [a] and prefilled(second) == [(b, 4, 6), (c, 0, 6)]


def test_admission_is_by_free_blocks_not_by_batch_size() -> None:
    s = scheduler(slots=8, max_queue=4, blocks=5, block_size=4)
    # Two blocks each: the third does not fit.
    a, b, c = seq(8, first=2), seq(8, first=3), seq(8, first=4)
    for x in (a, b, c):
        s.submit(x)
    planned = step(s)
    assert [x for x, _, _ in prefilled(planned)] == [a, b] and s.counts() == (2, 1)
    run(s, planned)
    finish(s, a)
    assert [x for x, _, _ in prefilled(step(s))] == [c]


def test_out_of_blocks_preempts_the_latest_admitted_and_recomputes_it_later() -> None:
    s = scheduler(slots=4, blocks=4, block_size=4)
    a, b = seq(8, first=2), seq(7, first=3)
    s.submit(a)
    s.submit(b)
    run(s, step(s))  # a: 8 tokens + 1 sampled; b: 7 + 1, each in two blocks
    # a's next position (8) needs a third block and none is free: b, admitted last, yields.
    planned = step(s)
    assert planned.decode == [a] and planned.preempted == [b]
    assert not b.running and b.blocks == [] and b.computed == 0 and b.preemptions == 1
    assert b.finish is None and s.counts() == (1, 1)  # waiting again, never failed
    run(s, planned)
    finish(s, a)
    again = step(s)
    # Recomputed: its prompt and the token it had generated, then it samples the next one; its
    # full first block was registered and is still cached, so only the rest is computed.
    assert prefilled(again) == [(b, 4, 8)] and b.target == 8 and b.cached_tokens == 4
    run(s, again)
    assert b.tokens == [7, 7] and step(s).decode == [b]


def test_a_lone_sequence_that_outgrows_the_free_blocks_preempts_itself() -> None:
    s = scheduler(slots=2, blocks=4, block_size=4)
    a, b = seq(12, first=2), seq(3, first=3)
    s.submit(a)
    s.submit(b)
    run(s, step(s))  # a holds three blocks, b one: the cache is full
    planned = step(s)
    # b needs no new block (position 3 is in its first); a, needing one, preempts b, the
    # latest, and then decodes.
    assert planned.preempted == [b] and planned.decode == [a]


def test_a_shared_prompt_prefix_is_taken_from_the_cache() -> None:
    s = scheduler(slots=2, blocks=16, block_size=4)
    a = Sequence(prompt=list(range(10)), params=SamplingParams(8), deadline=LATER)
    s.submit(a)
    run(s, step(s))
    finish(s, a)  # its two full prompt blocks stay cached
    b = Sequence(prompt=[*range(8), 50, 51, 52], params=SamplingParams(8), deadline=LATER)
    s.submit(b)
    planned = step(s)
    assert prefilled(planned) == [(b, 8, 11)] and b.cached_tokens == 8
    assert b.blocks[:2] == a_blocks_cached(s, 2)
    run(s, planned)
    # The whole prompt cached: its last block is computed again for the next token's logits.
    c = Sequence(prompt=list(range(8)), params=SamplingParams(8), deadline=LATER)
    s.submit(c)
    assert prefilled(step(s)) == [(c, 4, 8)] and c.cached_tokens == 4


def a_blocks_cached(s: Scheduler, n: int) -> list[int]:
    """The blocks the prefix cache holds for the first n blocks of range(4 n)."""
    assert s.blocks is not None
    return s.blocks.cached_prefix(s.blocks.digests(list(range(4 * n))), n)


def test_the_queue_is_bounded_and_refuses_at_once() -> None:
    s = scheduler(slots=1, max_queue=1)
    s.submit(seq())
    s.submit(seq())
    with pytest.raises(QueueFullError, match="0 requests running and 2 waiting"):
        s.submit(seq())
    with pytest.raises(NotAcceptingError, match="model not ready"):
        Scheduler(max_batch=1, max_queue=1, prefill_chunk=1).submit(seq())
    s.stop()
    with pytest.raises(NotAcceptingError, match="shutting down"):
        s.submit(seq())
    assert s.schedule() is None


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
    assert running.blocks == [] and s.counts() == (0, 0)


def test_cancels_retire_at_the_next_step_waiting_ones_without_blocks() -> None:
    s = scheduler(slots=1, max_queue=1)
    running, waiting = seq(), seq()
    s.submit(running)
    s.submit(waiting)
    step(s)
    s.cancel(waiting)
    s.cancel(running)
    planned = step(s)
    assert (running, FinishReason.CANCELLED) in planned.retired
    assert (waiting, FinishReason.CANCELLED) in planned.retired  # popped, never admitted
    assert waiting.blocks == [] and s.counts() == (0, 0)


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
    assert s.drain() == [got[0].prefill[0].sequence, queued] and s.sequences() == []
