"""The scheduler: which sequences run in the next step, and which leave before it.

It holds the bounded waiting queue, the KV-cache slots and the running sequences. Each step it
retires the running sequences that were cancelled or passed their deadline, admits waiting ones
into free slots (within a prefill budget), and drops expired ones from the queue. Callers on
other threads submit and cancel; everything else happens on the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from inference.sequence import FinishReason, Sequence


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound: retry later."""


class NotAcceptingError(RuntimeError):
    """The engine is still loading, failed, or is shutting down."""


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """One engine step: the sequences the model runs, and the ones the scheduler retired."""

    prefill: list[Sequence]  # admitted now, each in its slot: prompt in, first token out
    decode: list[Sequence]  # running before this step, by slot: one token each
    retired: list[tuple[Sequence, FinishReason]]  # cancelled or past their deadline; slots freed


class Scheduler:
    """Admission, slots, the bounded queue, deadlines, cancellation and draining."""

    def __init__(self, *, slots: int, max_queue: int, prefill_budget: int) -> None:
        self.slots = slots
        self.max_queue = max_queue
        # Prompt tokens prefilled per step (at least one whole prompt), so a burst of arrivals
        # delays the running sequences' next token by a bounded amount.
        self.prefill_budget = prefill_budget
        self.accepting = False
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[Sequence] = set()
        self._stopping = False
        # Lowest slot first: keeps the batch dense (attention reads slots [0, highest]).
        self._free_slots = list(range(slots - 1, -1, -1))
        self.running: list[Sequence] = []  # by slot; the engine thread's

    # -- from any thread -------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        """Queues a sequence; raises QueueFullError or NotAcceptingError at once, never blocks."""
        with self._cond:
            if self._stopping or not self.accepting:
                raise NotAcceptingError("shutting down" if self._stopping else "model not ready")
            running = self.slots - len(self._free_slots)
            if running + len(self._waiting) >= self.slots + self.max_queue:
                raise QueueFullError(f"{running} requests running and {len(self._waiting)} waiting")
            self._waiting.append(sequence)
            self._cond.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Retires a sequence at the next step (a no-op once it has finished)."""
        with self._cond:
            self._cancelled.add(sequence)
            self._cond.notify()

    def stop(self) -> None:
        """Makes `schedule` return None: the engine stops stepping."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self.running), len(self._waiting)

    def sequences(self) -> list[Sequence]:
        """The running and waiting sequences, a snapshot."""
        with self._cond:
            return [*self.running, *self._waiting]

    # -- on the engine thread --------------------------------------------------------------------

    def schedule(self) -> ScheduledStep | None:
        """Waits for work, then plans the next step; None once the engine is stopping."""
        with self._cond:
            while not (self._waiting or self.running or self._cancelled or self._stopping):
                self._cond.wait()
            if self._stopping:
                return None
            cancelled, self._cancelled = self._cancelled, set()
            now = time.monotonic()
            retired: list[tuple[Sequence, FinishReason]] = []
            decode: list[Sequence] = []
            for seq in self.running:
                if seq in cancelled or seq.deadline <= now:
                    reason = FinishReason.CANCELLED if seq in cancelled else FinishReason.TIMEOUT
                    self._retire(seq, reason, retired)
                else:
                    decode.append(seq)
            prefill = self._admit(cancelled, now, retired)
            # Cancels of sequences still waiting stay pending until they are popped.
            self._cancelled |= {s for s in cancelled if s in self._waiting}
            self.running = sorted(decode + prefill, key=lambda s: s.slot) if prefill else decode
        return ScheduledStep(prefill, decode, retired)

    def release(self, sequence: Sequence) -> None:
        """Frees the slot of a sequence that ended in this step (its `finish` is set)."""
        with self._cond:
            self._free(sequence)

    def end_step(self) -> None:
        """Drops the sequences that ended in this step from the running ones."""
        self.running = [s for s in self.running if s.finish is None]

    def drain(self) -> list[Sequence]:
        """Every sequence still running or waiting, taken out of the scheduler."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        running, self.running = self.running, []
        return [s for s in (*running, *waiting) if s.finish is None]

    def _admit(
        self, cancelled: set[Sequence], now: float, retired: list[tuple[Sequence, FinishReason]]
    ) -> list[Sequence]:
        """Pops waiting sequences into free slots, within the prefill budget (lock held)."""
        admitted: list[Sequence] = []
        budget = self.prefill_budget
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if admitted and len(seq.prompt) > budget:
                break
            self._waiting.popleft()
            if seq in cancelled or seq.deadline <= now:
                # It never takes a slot.
                cancelled.discard(seq)
                reason = FinishReason.CANCELLED if seq.deadline > now else FinishReason.TIMEOUT
                self._retire(seq, reason, retired)
                continue
            seq.slot = self._free_slots.pop()
            seq.admitted_at = now
            budget -= len(seq.prompt)
            admitted.append(seq)
        # Waiting sequences past their deadline leave the queue now, not when a slot frees.
        expired = [s for s in self._waiting if s.deadline <= now]
        for seq in expired:
            self._waiting.remove(seq)
            self._retire(seq, FinishReason.TIMEOUT, retired)
        return admitted

    def _retire(
        self, seq: Sequence, reason: FinishReason, retired: list[tuple[Sequence, FinishReason]]
    ) -> None:
        self._free(seq)
        retired.append((seq, reason))

    def _free(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            self._free_slots.sort(reverse=True)
            seq.slot = -1
