"""The generation engine: one thread steps continuous batching over the decoder's paged KV cache.

Each step is schedule, run, postprocess: the scheduler (`inference.scheduler`) retires cancelled
and expired sequences, gives the decoding ones room for their next token (preempting when the
cache is full) and plans prefill chunks within a token budget, admitting waiting sequences whose
blocks fit (`inference.blocks`, with its prefix cache); the model runner (`inference.runner`)
prefills the chunks and decodes one token for every decoding sequence; each sequence's
detokenizer (`inference.detokenizer`) turns its token into text and decides whether it ended.
What happened in a step reaches the caller through one `notify(updates)` call per step, from the
engine thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference.blocks import BlockManager, BlockStats
from inference.decoder import Decoder
from inference.detokenizer import Detokenizer
from inference.runner import ModelRunner, RunnerOutput
from inference.scheduler import ScheduledStep, Scheduler
from inference.sequence import FinishReason, SamplingParams, Sequence, Update
from modeling.chat import ChatTemplate, ChatTemplateError
from modeling.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Notify = Callable[[list[Update]], None]


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 32  # running sequences
    max_queue: int = 64  # waiting requests beyond the running ones
    # Prompt tokens prefilled per engine step, in chunks across steps: a long prompt or a burst
    # of arrivals delays the running sequences' next token by a bounded amount.
    prefill_chunk: int = 512
    # The KV cache's memory; None: room for max_batch sequences of max_seq_len, at most half
    # the memory available after loading the weights.
    kv_cache_gib: float | None = None
    block_size: int = 16  # positions per KV-cache block
    prefix_cache: bool = True  # reuse the cached blocks of a shared prompt prefix
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    warmup: bool = True
    # Context served, at most the model's own: the KV cache is sized for it (a Llama 3.1 config
    # says 131072 tokens, far more cache than most instances hold).
    max_seq_len: int | None = None
    weight_dtype: str = "auto"  # auto | float32 | bfloat16 | int8 (modeling.served)
    # Decode through fixed buffers captured as CUDA graphs (inference.graphs); None: on CUDA.
    cuda_graphs: bool | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    steps: int
    generated_tokens: int
    # The KV cache (`inference.blocks.BlockStats`): blocks in all, free, cached for reuse, and
    # prompt tokens taken from the prefix cache since the start; None before loading.
    cache: BlockStats | None = None


class Engine:
    """Loads a model directory and serves generation requests from one background thread."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings = settings or EngineSettings()
        self.scheduler = Scheduler(
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            prefill_chunk=settings.prefill_chunk,
        )
        self.runner = ModelRunner(
            self.model_dir,
            slots=settings.max_batch,
            device=settings.device,
            prefill_chunk=settings.prefill_chunk,
            threads=settings.threads,
            max_seq_len=settings.max_seq_len,
            kv_cache_gib=settings.kv_cache_gib,
            block_size=settings.block_size,
            weight_dtype=settings.weight_dtype,
            cuda_graphs=settings.cuda_graphs,
        )
        self._thread: threading.Thread | None = None
        self._notify: Notify = lambda updates: None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self._generated = 0

    # What the loaded model is (set by `load`).

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.runner.tokenizer

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self.runner.chat_template

    @property
    def decoder(self) -> Decoder | None:
        return self.runner.decoder

    @property
    def max_seq_len(self) -> int:
        return self.runner.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def model_info(self) -> dict[str, Any]:
        return self.runner.model_info

    @property
    def batch_invariant(self) -> bool | None:
        return self.runner.batch_invariant

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
                    self.load()
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
                self._end_all(FinishReason.ERROR)
                if on_failure is not None:
                    on_failure(err)
            finally:
                self.stopped.set()

        self._thread = threading.Thread(target=run, name="kiln-engine", daemon=True)
        self._thread.start()

    def load(self) -> None:
        """Loads and warms the model in the calling thread (else `start` does it in its own)."""
        self.runner.load(warmup=self.settings.warmup)
        self.scheduler.blocks = BlockManager(
            self.runner.cache_blocks,
            self.settings.block_size,
            prefix_cache=self.settings.prefix_cache,
        )
        self.scheduler.accepting = True
        self.ready.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes what is running and waiting as SHUTDOWN, and ends the thread."""
        self.scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- requests --------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """The prompt's token ids as the model reads them (BOS first, if the tokenizer has one)."""
        if self.tokenizer is None:
            raise RuntimeError("the model is not loaded")
        return self.tokenizer.encode(text, add_bos=True)

    def chat_unavailable(self) -> str | None:
        """Why this model cannot answer a conversation (None when it can)."""
        if self.runner.chat_template is not None:
            return None
        return self.runner.chat_template_error or (
            "this model has no chat template (neither tokenizer_config.json's chat_template nor "
            'a chat_template.jinja): send a plain prompt as {"inputs": ...} instead'
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        """The prompt text of a conversation, rendered by the model's chat template with the
        assistant's turn opened (`add_generation_prompt`), and its ids. The text holds whatever
        BOS the template writes, so none is added. ChatTemplateError when the model has no
        usable template or the template refuses the messages."""
        template, tokenizer = self.runner.chat_template, self.tokenizer
        if template is None or tokenizer is None:
            raise ChatTemplateError(self.chat_unavailable() or "the model is not loaded")
        text = template.render(messages, add_generation_prompt=True)
        return text, tokenizer.encode(text, add_bos=False)

    def submit(self, sequence: Sequence) -> None:
        """Queues a sequence; raises QueueFullError or NotAcceptingError at once, never blocks."""
        if self.tokenizer is not None:
            sequence.detokenizer = Detokenizer(self.tokenizer, sequence)
        self.scheduler.submit(sequence)

    def cancel(self, sequence: Sequence) -> None:
        """Retires a sequence at the next step boundary (a no-op once it has finished)."""
        self.scheduler.cancel(sequence)

    def stats(self) -> EngineStats:
        running, waiting = self.scheduler.counts()
        return EngineStats(
            running=running,
            waiting=waiting,
            steps=self.runner.steps,
            generated_tokens=self._generated,
            cache=self.scheduler.blocks.stats() if self.scheduler.blocks is not None else None,
        )

    # -- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while (step := self.scheduler.schedule()) is not None:
                output = self.runner.run(step)
                updates = self._postprocess(step, output)
                if updates:
                    self._notify(updates)
        self._end_all(FinishReason.SHUTDOWN)

    def _postprocess(self, step: ScheduledStep, output: RunnerOutput) -> list[Update]:
        """Each sampled token through its sequence's detokenizer; frees the blocks of those that
        ended. Returns what to notify: ends, and the tokens of streamed sequences."""
        updates = [_detokenizer(seq).end(reason) for seq, reason in step.retired]
        for seq in output.failed:
            updates.append(_detokenizer(seq).end(FinishReason.ERROR))
            self.scheduler.release(seq)
        self._generated += len(output.sampled)
        for seq, token in output.sampled:
            update = _detokenizer(seq).add(token)
            if update is not None:
                if update.finish is not None:
                    self.scheduler.release(seq)
                updates.append(update)
        self.scheduler.end_step()
        return updates

    def _end_all(self, reason: FinishReason) -> None:
        updates = [_detokenizer(seq).end(reason) for seq in self.scheduler.drain()]
        if updates:
            with contextlib.suppress(Exception):
                self._notify(updates)


def _detokenizer(seq: Sequence) -> Detokenizer:
    assert seq.detokenizer is not None, "sequences enter the engine through Engine.submit"
    return seq.detokenizer


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
        seq = Sequence(
            prompt=self.engine.encode_prompt(prompt),
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
