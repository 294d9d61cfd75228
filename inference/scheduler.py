"""The scheduler: which sequences run in the next step, what each computes, and who leaves.

It holds the bounded waiting queue, the running sequences (at most `max_batch`) and the KV-cache
block manager (`inference.blocks`). Each step it retires the running sequences that were
cancelled or passed their deadline; gives each decoding sequence room for its next token,
preempting the most recently admitted sequence when no block is left (its blocks are freed and
it waits at the head of the queue to be recomputed: prompt and generated tokens prefilled again,
from the prefix cache where its blocks survived); then spends the step's prefill budget
(`prefill_chunk` tokens) on the prompts being prefilled and on admitting waiting sequences whose
blocks fit, taking any cached prefix of theirs from the prefix cache. A long prompt is thus
prefilled a chunk per step while the running sequences keep decoding a token each step.
Callers on other threads submit and cancel; everything else happens on the engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from inference.blocks import BlockManager
from inference.sequence import FinishReason, Sequence


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound: retry later."""


class NotAcceptingError(RuntimeError):
    """The engine is still loading, failed, or is shutting down."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Prefill of tokens [start, end) of a sequence's prompt (then generated) tokens."""

    sequence: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether the sequence's prefill completes: its next token is sampled."""
        return self.end == self.sequence.target


@dataclass(frozen=True, slots=True)
class ScheduledStep:
    """One engine step: what the model computes, and who the scheduler retired or preempted."""

    prefill: list[Chunk]  # in admission order; a sequence's last chunk gives its next token
    decode: list[Sequence]  # decoding before this step, in admission order: one token each
    retired: list[tuple[Sequence, FinishReason]]  # cancelled or past their deadline; blocks freed
    preempted: list[Sequence]  # blocks freed, back at the head of the queue to be recomputed


class Scheduler:
    """Admission, blocks, the bounded queue, preemption, deadlines, cancellation and draining."""

    def __init__(
        self,
        *,
        max_batch: int,
        max_queue: int,
        prefill_chunk: int,
        blocks: BlockManager | None = None,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Prompt tokens prefilled per step: bounds how long the running sequences wait for their
        # next token while prompts arrive.
        self.prefill_chunk = prefill_chunk
        self.blocks = blocks  # set when the model is loaded (the cache's size is known then)
        self.accepting = False
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[Sequence] = set()
        self._stopping = False
        self.running: list[Sequence] = []  # in admission order; the engine thread's

    # -- from any thread -------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        """Queues a sequence; raises QueueFullError or NotAcceptingError at once, never blocks."""
        with self._cond:
            if self._stopping or not self.accepting:
                raise NotAcceptingError("shutting down" if self._stopping else "model not ready")
            running = len(self.running)
            if running + len(self._waiting) >= self.max_batch + self.max_queue:
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
        assert self.blocks is not None, "the scheduler needs the block manager before a step"
        with self._cond:
            while not (self._waiting or self.running or self._cancelled or self._stopping):
                self._cond.wait()
            if self._stopping:
                return None
            cancelled, self._cancelled = self._cancelled, set()
            now = time.monotonic()
            retired: list[tuple[Sequence, FinishReason]] = []
            for seq in list(self.running):
                if seq in cancelled or seq.deadline <= now:
                    reason = FinishReason.CANCELLED if seq in cancelled else FinishReason.TIMEOUT
                    self._retire(seq, reason, retired)
            preempted: list[Sequence] = []
            decode = [
                seq
                for seq in list(self.running)
                if not seq.target and seq.running and self._room(seq, preempted)
            ]
            prefill = self._prefills(cancelled, now, retired)
            # Cancels of sequences still waiting stay pending until they are popped.
            self._cancelled |= {s for s in cancelled if s in self._waiting}
        return ScheduledStep(prefill, decode, retired, preempted)

    def release(self, sequence: Sequence) -> None:
        """Frees the blocks of a sequence that ended in this step (its `finish` is set)."""
        with self._cond:
            self._free(sequence)

    def end_step(self) -> None:
        """Drops the sequences that ended in this step from the running ones, and registers the
        blocks the step filled in the prefix cache."""
        self.running = [s for s in self.running if s.finish is None]
        blocks = self.blocks
        assert blocks is not None
        bs = blocks.block_size
        for seq in self.running:
            full = seq.computed // bs
            if full > seq.registered:
                seq.digests = blocks.digests(seq.all_tokens[: full * bs], seq.digests)
                for i in range(seq.registered, full):
                    blocks.register(seq.blocks[i], seq.digests[i])
                seq.registered = full

    def drain(self) -> list[Sequence]:
        """Every sequence still running or waiting, taken out of the scheduler."""
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        running, self.running = self.running, []
        return [s for s in (*running, *waiting) if s.finish is None]

    def _room(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        """Gives a decoding sequence a block for its next position when it needs one, preempting
        the most recently admitted running sequence while none is left; False when that was
        `seq` itself (lock held)."""
        blocks = self.blocks
        assert blocks is not None
        while len(seq.blocks) * blocks.block_size <= seq.position:
            if blocks.available():
                seq.blocks += blocks.allocate(1)
                continue
            victim = self.running[-1]
            self._preempt(victim, preempted)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, preempted: list[Sequence]) -> None:
        self._free(seq)
        self.running.remove(seq)
        seq.computed = seq.registered = seq.target = 0
        seq.preemptions += 1
        preempted.append(seq)
        # Ahead of new arrivals; the earlier admitted of several preempted first.
        self._waiting.appendleft(seq)

    def _prefills(
        self, cancelled: set[Sequence], now: float, retired: list[tuple[Sequence, FinishReason]]
    ) -> list[Chunk]:
        """This step's prefill chunks within the budget: the prompts being prefilled first, then
        waiting sequences admitted while their blocks fit (lock held)."""
        blocks = self.blocks
        assert blocks is not None
        budget = self.prefill_chunk
        chunks: list[Chunk] = []
        for seq in self.running:
            if budget and seq.target:
                end = min(seq.target, seq.computed + budget)
                chunks.append(Chunk(seq, seq.computed, end))
                budget -= end - seq.computed
        while budget and self._waiting and len(self.running) < self.max_batch:
            seq = self._waiting[0]
            if seq in cancelled or seq.deadline <= now:
                # It never takes a block.
                self._waiting.popleft()
                cancelled.discard(seq)
                reason = FinishReason.CANCELLED if seq.deadline > now else FinishReason.TIMEOUT
                self._retire(seq, reason, retired)
                continue
            if blocks.blocks_for(len(seq.prompt) + len(seq.tokens)) > blocks.blocks:
                # Longer than the whole cache (the engine sizes it for max_seq_len): never fits.
                self._waiting.popleft()
                self._retire(seq, FinishReason.ERROR, retired)
                continue
            if not self._admit(seq):
                break  # the head of the queue waits for blocks to free; order is kept
            self._waiting.popleft()
            if seq.admitted_at is None:
                seq.admitted_at = now
            self.running.append(seq)
            end = min(seq.target, seq.computed + budget)
            chunks.append(Chunk(seq, seq.computed, end))
            budget -= end - seq.computed
        # Waiting sequences past their deadline leave the queue now, not when blocks free.
        expired = [s for s in self._waiting if s.deadline <= now]
        for seq in expired:
            self._waiting.remove(seq)
            self._retire(seq, FinishReason.TIMEOUT, retired)
        return chunks

    def _admit(self, seq: Sequence) -> bool:
        """Takes the blocks of everything the sequence has (prompt, and generated tokens after a
        preemption), its cached prefix from the prefix cache; False if they do not fit."""
        blocks = self.blocks
        assert blocks is not None
        tokens = seq.all_tokens
        target, bs = len(tokens), blocks.block_size
        seq.digests = blocks.digests(tokens, seq.digests)
        # At least one token is computed: its logits choose the next token.
        hit = blocks.cached_prefix(seq.digests, (target - 1) // bs)
        need = blocks.blocks_for(target) - len(hit)
        if need > blocks.available() - blocks.unheld(hit):
            return False
        blocks.take(hit)
        seq.blocks = hit + blocks.allocate(need)
        seq.computed, seq.registered, seq.target = len(hit) * bs, len(hit), target
        seq.cached_tokens += len(hit) * bs
        seq.running = True
        return True

    def _retire(
        self, seq: Sequence, reason: FinishReason, retired: list[tuple[Sequence, FinishReason]]
    ) -> None:
        self._free(seq)
        if seq in self.running:
            self.running.remove(seq)
        retired.append((seq, reason))

    def _free(self, seq: Sequence) -> None:
        if seq.running:
            assert self.blocks is not None
            self.blocks.release(seq.blocks)
            seq.blocks = []
            seq.running = False
