"""The generation engine: one thread runs continuous batching over the decoder's KV-cache slots.

Requests wait in a bounded queue; between decode steps the engine admits waiting requests into
free slots (prefilling their prompts), runs one decode step for every running sequence, and
retires the ones that finished (length, end of sequence, a stop string, a deadline, a cancel),
freeing their slots for the next step. What happened in a step reaches the caller through one
`notify(updates)` call per step, from the engine thread.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from inference import sampling
from inference.decoder import Decoder
from modeling.artifact import WEIGHTS_FILE, load_model_dir, read_config
from modeling.config import ModelConfig
from modeling.tokenizer import TOKENIZER_FILE, ByteTokenizer

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model directory that cannot be served; the message names the file at fault."""


def read_model_files(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The config, after checking that the tokenizer and weights load, naming the bad file.

    `load_model_dir` raises the safetensors or torch error alone, which says what is wrong but
    not in which file.
    """
    cfg, raw = read_config(model_dir)  # ArtifactError names config.json
    tokenizer_file = model_dir / TOKENIZER_FILE
    try:
        ByteTokenizer.load(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{tokenizer_file}: {type(err).__name__}: {err}") from err
    weights = model_dir / raw.get("weights", WEIGHTS_FILE)
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
    except Exception as err:
        raise ModelLoadError(f"{weights}: {type(err).__name__}: {err}") from err
    if not names:
        raise ModelLoadError(f"{weights} holds no tensors")
    return cfg, raw


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is at its bound: retry later."""


class NotAcceptingError(RuntimeError):
    """The engine is still loading, failed, or is shutting down."""


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos"  # the model ended the sequence
    STOP = "stop"  # a stop string was generated
    TIMEOUT = "timeout"  # the request's deadline passed
    CANCELLED = "cancelled"  # the client went away
    SHUTDOWN = "shutdown"  # the engine stopped first
    ERROR = "error"  # the engine failed on this request


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: validated by the caller (`inference.schema`)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[bytes, ...] = ()


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. Fields past `deadline` belong to the engine thread."""

    prompt: list[int]
    params: SamplingParams
    deadline: float  # time.monotonic() after which the request is retired with TIMEOUT
    # Anything the caller wants back in its notify callback (the HTTP layer's handle).
    context: Any = None
    # Whether the caller wants each token as it comes; otherwise only the end is notified, which
    # spares the event loop a wake-up per step.
    stream: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    text: bytearray = field(default_factory=bytearray)
    generator: torch.Generator | None = None
    finish: FinishReason | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def position(self) -> int:
        """Where the last generated token goes in the cache (it is not there yet)."""
        return len(self.prompt) + len(self.tokens) - 1


@dataclass(frozen=True)
class Update:
    """What one step did to one sequence: tokens it generated, and its end if it ended."""

    sequence: Sequence
    new_tokens: tuple[int, ...]
    finish: FinishReason | None


Notify = Callable[[list[Update]], None]


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 32  # running sequences (cache slots)
    max_queue: int = 64  # waiting requests beyond the running ones
    # Prompt tokens prefilled per engine iteration (at least one whole prompt), so a burst of
    # arrivals delays the running sequences' next token by a bounded amount.
    prefill_budget: int = 2048
    # Prompts are prefilled in chunks of this many tokens: bounds the attention scratch memory.
    prefill_chunk: int = 512
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    warmup: bool = True


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    generated_tokens: int


class Engine:
    """Loads a model directory and serves generation requests from one background thread."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings or EngineSettings()
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._cancelled: set[Sequence] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._notify: Notify = lambda updates: None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.tokenizer: ByteTokenizer | None = None
        self.decoder: Decoder | None = None
        self.max_seq_len = 0
        self.vocab_size = 0
        self.model_info: dict[str, Any] = {}
        self.batch_invariant: bool | None = None
        self._running: list[Sequence] = []
        self._free_slots: list[int] = []
        self._steps = 0
        self._generated = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(
        self, notify: Notify, on_failure: Callable[[BaseException], None] | None = None
    ) -> None:
        """Starts the engine thread: it loads and warms the model (unless loaded), then serves.

        `notify` is called from the engine thread once per step with that step's updates;
        `on_failure` once if loading or the loop fails (the error is also in `self.error`).
        """
        self._notify = notify

        def run() -> None:
            try:
                if not self.ready.is_set():
                    self._load()
            except BaseException as err:
                self.error = err
                self.stopped.set()
                if on_failure is not None:
                    on_failure(err)
                return
            try:
                self._loop()
            except BaseException as err:  # a bug: fail every request rather than hang them
                log.exception("engine loop failed")
                self.error = err
                self._fail_all(FinishReason.ERROR)
                if on_failure is not None:
                    on_failure(err)
            finally:
                self.stopped.set()

        self._thread = threading.Thread(target=run, name="kiln-engine", daemon=True)
        self._thread.start()

    def load(self) -> None:
        """Loads and warms the model in the calling thread (else `start` does it in its own)."""
        self._load()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes what is running and waiting as SHUTDOWN, and ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        """Queues a sequence; raises QueueFullError or NotAcceptingError at once, never blocks."""
        with self._cond:
            if self._stopping or not self.ready.is_set():
                raise NotAcceptingError("shutting down" if self._stopping else "model not ready")
            running = self.settings.max_batch - len(self._free_slots)
            if running + len(self._waiting) >= self.settings.max_batch + self.settings.max_queue:
                raise QueueFullError(f"{running} requests running and {len(self._waiting)} waiting")
            self._waiting.append(sequence)
            self._cond.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Retires a sequence at the next step boundary (a no-op once it has finished)."""
        with self._cond:
            self._cancelled.add(sequence)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                running=len(self._running),
                waiting=len(self._waiting),
                steps=self._steps,
                generated_tokens=self._generated,
            )

    # -- loading ---------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        name = self.settings.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(name)

    def _load(self) -> None:
        started = time.monotonic()
        if self.settings.threads:
            torch.set_num_threads(self.settings.threads)
        device = self._device()
        cfg, raw = read_model_files(self.model_dir)
        model, tokenizer = load_model_dir(self.model_dir)
        # float32 on CPU (bit-exact batching, and fp32 GEMMs are the fast path there); the
        # saved dtype on GPUs, where bf16/fp16 halve the memory traffic of decode.
        saved = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(raw.get("dtype", ""))
        dtype = saved if device.type == "cuda" and saved is not None else torch.float32
        with torch.inference_mode():
            self.decoder = Decoder(model, slots=self.settings.max_batch, device=device, dtype=dtype)
        del model
        self.tokenizer = tokenizer
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.model_info = {
            "config": cfg.to_dict(),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "training": raw.get("training", {}),
        }
        with torch.inference_mode():
            self.batch_invariant = self.decoder.check_invariance()
        if not self.batch_invariant:
            log.warning(
                "decode projections are not batch-invariant on this device: greedy output may "
                "differ in the last bits between a request alone and in a batch"
            )
        self._free_slots = list(range(self.settings.max_batch - 1, -1, -1))
        if self.settings.warmup:
            self._warm_up()
        log.info(
            "model loaded from %s in %.2f s: %d layers, hidden %d, %s on %s, %d slots, "
            "KV cache %.1f MiB",
            self.model_dir,
            time.monotonic() - started,
            cfg.num_layers,
            cfg.hidden_size,
            self.model_info["dtype"],
            device,
            self.settings.max_batch,
            self.decoder.cache_bytes() / 2**20,
        )
        self.ready.set()

    def _warm_up(self) -> None:
        """Runs every code path once: prefill, decode at each padded row count, sampling."""
        assert self.decoder is not None
        with torch.inference_mode():
            prompt = torch.zeros(min(16, self.max_seq_len - 2), dtype=torch.long)
            logits = self.decoder.prefill(0, prompt)
            slots = self.settings.max_batch
            for rows in sorted({1, slots, *(r for r in self.decoder.buckets if r <= slots)}):
                logits = self.decoder.decode(list(range(rows)), [len(prompt)] * rows, [0] * rows)
            sampling.greedy(logits)
            gens = [torch.Generator().manual_seed(0) for _ in range(rows)]
            sampling.sample(
                logits,
                temperatures=[1.0] * rows,
                top_ks=[5] * rows,
                top_ps=[0.9] * rows,
                generators=gens,
            )

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._cancelled or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    admitted = self._admit(cancelled)
                updates: list[Update] = []
                now = time.monotonic()
                self._retire_early(cancelled, now, updates)
                self._prefill(admitted, updates)
                if self._running:
                    try:
                        self._decode_step(updates)
                    except Exception:
                        # A failed step (a bug, memory) fails its batch, not the server.
                        log.exception("decode step failed; failing %d requests", len(self._running))
                        for seq in self._running:
                            self._retire(seq, FinishReason.ERROR, updates)
                        self._running = []
                if updates:
                    self._notify(updates)
        self._fail_all(FinishReason.SHUTDOWN)

    def _admit(self, cancelled: set[Sequence]) -> list[Sequence]:
        """Pops waiting sequences into free slots, within the prefill budget (lock held)."""
        admitted: list[Sequence] = []
        budget = self.settings.prefill_budget
        now = time.monotonic()
        while self._waiting and self._free_slots:
            seq = self._waiting[0]
            if admitted and len(seq.prompt) > budget:
                break
            self._waiting.popleft()
            if seq in cancelled or seq.deadline <= now:
                # Reported by _prefill; it never takes a slot.
                cancelled.discard(seq)
                seq.finish = FinishReason.CANCELLED if seq.deadline > now else FinishReason.TIMEOUT
                admitted.append(seq)
                continue
            seq.slot = self._free_slots.pop()
            seq.admitted_at = now
            budget -= len(seq.prompt)
            admitted.append(seq)
        # Waiting sequences past their deadline leave the queue now, not when a slot frees.
        expired = [s for s in self._waiting if s.deadline <= now]
        for seq in expired:
            self._waiting.remove(seq)
            seq.finish = FinishReason.TIMEOUT
            admitted.append(seq)
        return admitted

    def _retire_early(self, cancelled: set[Sequence], now: float, updates: list[Update]) -> None:
        keep = []
        for seq in self._running:
            if seq in cancelled:
                self._retire(seq, FinishReason.CANCELLED, updates)
            elif seq.deadline <= now:
                self._retire(seq, FinishReason.TIMEOUT, updates)
            else:
                keep.append(seq)
        self._running = keep
        with self._cond:
            # Cancels of sequences still waiting stay pending until they are popped.
            self._cancelled |= {s for s in cancelled if s in self._waiting}

    def _retire(self, seq: Sequence, reason: FinishReason, updates: list[Update]) -> None:
        seq.finish = reason
        if seq.slot >= 0:
            with self._cond:
                self._free_slots.append(seq.slot)
                self._free_slots.sort(reverse=True)  # lowest slot first: keeps the batch dense
            seq.slot = -1
        updates.append(Update(seq, (), reason))

    def _prefill(self, admitted: list[Sequence], updates: list[Update]) -> None:
        assert self.decoder is not None
        chunk = self.settings.prefill_chunk
        for seq in admitted:
            if seq.finish is not None:  # expired or cancelled while waiting
                updates.append(Update(seq, (), seq.finish))
                continue
            try:
                ids = torch.tensor(seq.prompt, dtype=torch.long)
                for start in range(0, len(seq.prompt), chunk):
                    logits = self.decoder.prefill(seq.slot, ids[start : start + chunk], start)
                if seq.params.temperature > 0:
                    seed = seq.params.seed
                    if seed is None:
                        seed = int.from_bytes(os.urandom(8), "little") >> 1
                    seq.generator = torch.Generator().manual_seed(seed)
                token = self._choose([seq], logits.unsqueeze(0))[0]
            except Exception:
                log.exception("prefill failed for request %d", seq.id)
                self._retire(seq, FinishReason.ERROR, updates)
                continue
            seq.first_token_at = time.monotonic()
            self._running.append(seq)
            self._accept(seq, token, updates)
        self._running.sort(key=lambda s: s.slot)
        self._running = [s for s in self._running if s.finish is None]

    def _decode_step(self, updates: list[Update]) -> None:
        assert self.decoder is not None
        running = self._running
        logits = self.decoder.decode(
            [s.slot for s in running],
            [s.position for s in running],
            [s.tokens[-1] for s in running],
        )
        tokens = self._choose(running, logits)
        self._steps += 1
        for seq, token in zip(running, tokens, strict=True):
            self._accept(seq, token, updates)
        self._running = [s for s in running if s.finish is None]

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        greedy_rows = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        if len(greedy_rows) == len(seqs):
            return sampling.greedy(logits)
        tokens = [0] * len(seqs)
        if greedy_rows:
            for i, t in zip(greedy_rows, sampling.greedy(logits[greedy_rows]), strict=True):
                tokens[i] = t
        sampled_rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        picked = sampling.sample(
            logits[sampled_rows],
            temperatures=[seqs[i].params.temperature for i in sampled_rows],
            top_ks=[seqs[i].params.top_k for i in sampled_rows],
            top_ps=[seqs[i].params.top_p for i in sampled_rows],
            generators=[seqs[i].generator for i in sampled_rows],  # type: ignore[misc]
        )
        for i, t in zip(sampled_rows, picked, strict=True):
            tokens[i] = t
        return tokens

    def _accept(self, seq: Sequence, token: int, updates: list[Update]) -> None:
        """Records a generated token and retires the sequence if it ended."""
        assert self.tokenizer is not None
        self._generated += 1
        if token == self.tokenizer.eos_id:
            self._retire(seq, FinishReason.EOS, updates)
            return
        seq.tokens.append(token)
        if token < 256:
            seq.text.append(token)
            if any(seq.text.endswith(stop) for stop in seq.params.stop):
                self._retire_with(seq, token, FinishReason.STOP, updates)
                return
        if len(seq.tokens) >= seq.params.max_new_tokens:
            self._retire_with(seq, token, FinishReason.LENGTH, updates)
            return
        if seq.stream:
            updates.append(Update(seq, (token,), None))

    def _retire_with(
        self, seq: Sequence, token: int, reason: FinishReason, updates: list[Update]
    ) -> None:
        if seq.stream:
            updates.append(Update(seq, (token,), None))
        self._retire(seq, reason, updates)

    def _fail_all(self, reason: FinishReason) -> None:
        updates: list[Update] = []
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in [*self._running, *waiting]:
            if seq.finish is None:
                seq.finish = reason
                updates.append(Update(seq, (), reason))
        self._running = []
        if updates:
            with contextlib.suppress(Exception):
                self._notify(updates)


@contextlib.contextmanager
def running_engine(
    model_dir: str | Path, settings: EngineSettings | None = None
) -> Iterator[SyncClient]:
    """An engine loaded in this thread and serving from its own; yields a blocking client."""
    engine = Engine(model_dir, settings)
    client = SyncClient(engine)
    engine.load()
    engine.start(client.dispatch)
    try:
        yield client
    finally:
        engine.stop()


class SyncClient:
    """Blocking generate() over an engine, for tests and the benchmark (not the server's path)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._done: dict[Sequence, threading.Event] = {}
        self._lock = threading.Lock()

    def dispatch(self, updates: list[Update]) -> None:
        for update in updates:
            if update.finish is not None:
                with self._lock:
                    event = self._done.get(update.sequence)
                if event is not None:
                    event.set()

    def generate(self, prompt: str, params: SamplingParams, timeout: float = 60.0) -> Sequence:
        assert self.engine.tokenizer is not None
        seq = Sequence(
            prompt=self.engine.tokenizer.encode(prompt, add_bos=True),
            params=params,
            deadline=time.monotonic() + timeout,
        )
        event = threading.Event()
        with self._lock:
            self._done[seq] = event
        self.engine.submit(seq)
        if not event.wait(timeout + 5):
            raise TimeoutError(f"request {seq.id} did not finish in {timeout} s")
        with self._lock:
            del self._done[seq]
        return seq
