"""The HTTP face of the server (Starlette): SageMaker's /ping and /invocations, JSON or SSE.

`InvocationHandler` holds the routes; a request becomes a `RequestRecord` (what its prediction
event reports) and a `Sequence` for the engine, whose updates (text deltas and the end) arrive on
the event loop through the sequence's `Handle`. The HTTP layer relays text; the engine's
detokenizer decides what text is safe to show and how a sequence ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from inference.chat import DONE, ChatAnswer, usage
from inference.engine import Engine
from inference.events import EventPublisher
from inference.scheduler import NotAcceptingError, QueueFullError
from inference.schema import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_BODY_BYTES,
    ChatRequest,
    Invocation,
    RequestError,
    parse_request,
)
from inference.sequence import COMPLETED, FinishReason, SamplingParams, Sequence, Update
from modeling.chat import ChatTemplateError

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-kiln-request-id"
# SageMaker forwards InvokeEndpoint's InferenceId in this header; it becomes the event's id.
SAGEMAKER_INFERENCE_ID = "x-amzn-sagemaker-inference-id"
RETRY_AFTER_S = "1"
# Prompts longer than this are tokenized off the event loop, so /ping stays quick.
ENCODE_INLINE_CHARS = 64 * 1024


@dataclass(frozen=True)
class ServerSettings:
    request_timeout_s: float = 60.0
    max_body_bytes: int = MAX_BODY_BYTES
    # Upper bound on max_new_tokens (None: whatever the model's context leaves).
    max_new_tokens: int | None = None
    # The `model` of a chat completion when the request names none.
    model_name: str = "kiln"


@dataclass(frozen=True)
class Generation:
    """What a request asks of the engine, in either shape, with the names its fields have in
    that shape (for the errors)."""

    prompt: list[int]
    prompt_field: str
    max_new_tokens: int | None
    max_new_tokens_field: str
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]


@dataclass
class ServerState:
    """What /ping reports beyond the engine's own flags; serve's signal handler sets draining."""

    draining: bool = False


@dataclass
class RequestRecord:
    """One /invocations request, as its prediction event reports it."""

    request_id: str
    received_at: datetime
    started: float  # time.monotonic()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None
    prompt_text: str | None = None
    completion_text: str | None = None


class Handle:
    """The HTTP side of one sequence: updates from the engine land here on the event loop."""

    def __init__(self, streaming: bool) -> None:
        self.streaming = streaming
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.done = asyncio.Event()

    def deliver(self, update: Update) -> None:
        if self.streaming:
            self.queue.put_nowait(update)
        if update.finish is not None:
            self.done.set()


def _error(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _unavailable(code: str, message: str) -> RequestError:
    return RequestError(503, code, message, headers={"Retry-After": RETRY_AFTER_S})


def _wants_stream(accept: str) -> bool:
    """True for text/event-stream; False for JSON; a RequestError (406) for anything else."""
    if not accept.strip():
        return False
    offered = []
    for part in accept.split(","):
        media, *params = (p.strip().lower() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            offered.append(media)
    if "text/event-stream" in offered:
        return True
    if any(m in ("application/json", "application/*", "*/*") for m in offered):
        return False
    raise RequestError(
        406,
        "not_acceptable",
        f"Accept {accept!r} names nothing this server sends: use application/json, or "
        "text/event-stream to stream tokens",
    )


def _sse(data: dict[str, Any], name: str | None = None) -> bytes:
    prefix = f"event: {name}\n" if name else ""
    return f"{prefix}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _remaining(seq: Sequence) -> float:
    """How long to wait for the engine: it retires the sequence at its deadline; the margin
    covers a long step."""
    return max(0.0, seq.deadline - time.monotonic()) + 5.0


class InvocationHandler:
    """The routes of the server around one engine, its settings, state and event publisher."""

    def __init__(
        self,
        engine: Engine,
        *,
        settings: ServerSettings | None = None,
        events: EventPublisher | None = None,
        on_engine_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings or ServerSettings()
        self.events = events
        self.on_engine_failure = on_engine_failure
        self.state = ServerState()
        self.app = Starlette(
            routes=[
                Route("/ping", self.ping, methods=["GET"]),
                Route("/invocations", self.invocations, methods=["POST"]),
            ],
            lifespan=self.lifespan,
            exception_handlers={HTTPException: self.http_error, Exception: self.internal_error},
        )
        self.app.state.kiln = self.state

    # -- lifespan --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Starts the engine thread (and the events) with the app; stops them with it."""
        loop = asyncio.get_running_loop()

        def dispatch(updates: list[Update]) -> None:
            for update in updates:
                update.sequence.context.deliver(update)

        def notify(updates: list[Update]) -> None:
            # One wake-up of the event loop per engine step, whatever the batch size.
            loop.call_soon_threadsafe(dispatch, updates)

        if self.events is not None:
            self.events.start()
        self.engine.start(notify, on_failure=self._engine_failed)
        try:
            yield
        finally:
            self.state.draining = True
            await asyncio.to_thread(self.engine.stop)
            if self.events is not None:
                await asyncio.to_thread(self.events.close)

    def _engine_failed(self, err: BaseException) -> None:
        # One line, whatever the error's own layout: log searches find it whole.
        message = " ".join(str(err).split())
        engine = self.engine
        what = "engine failed serving" if engine.ready.is_set() else "model load failed from"
        log.error("%s %s: %s: %s", what, engine.model_dir, type(err).__name__, message)
        if self.on_engine_failure is not None:
            self.on_engine_failure(err)

    # -- routes ----------------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        # Cheap on purpose: it reads flags, so it answers while the engine is busy.
        if self.engine.error is not None:
            return JSONResponse({"status": "failed"}, status_code=503)
        if self.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def invocations(self, request: Request) -> Response:
        record = RequestRecord(
            request_id=request.headers.get(SAGEMAKER_INFERENCE_ID) or str(uuid.uuid4()),
            received_at=datetime.now(UTC),
            started=time.monotonic(),
        )
        headers = {REQUEST_ID_HEADER: record.request_id}
        seq: Sequence | None = None
        streaming_started = False
        try:
            if self.state.draining:
                raise _unavailable("shutting_down", "the server is shutting down; retry")
            body = await self._read_body(request)
            _check_content_type(request)
            streaming = _wants_stream(request.headers.get("accept", ""))
            parsed = parse_request(body)
            if parsed.stream is not None:  # the body's choice wins over Accept
                streaming = parsed.stream
            if not self.engine.ready.is_set():
                raise _unavailable("loading", "the model is still loading; retry")
            handle = Handle(streaming)
            chat: ChatAnswer | None = None
            if isinstance(parsed, ChatRequest):
                options = parsed.stream_options
                chat = ChatAnswer(
                    record.request_id,
                    parsed.model or self.settings.model_name,
                    include_usage=options is not None and options.include_usage,
                )
                record.prompt_text, generation = await self._chat_generation(parsed)
            else:
                record.prompt_text, generation = await self._plain_generation(parsed)
            seq = self._make_sequence(generation, record.started, handle)
            record.prompt_tokens = len(seq.prompt)
            try:
                self.engine.submit(seq)
            except QueueFullError as err:
                raise _unavailable("overloaded", f"server at capacity ({err}); retry") from err
            except NotAcceptingError as err:
                raise _unavailable("unavailable", f"not accepting requests: {err}") from err
            if streaming:
                response = await self._stream_response(seq, handle, headers, record, chat)
                streaming_started = True
                return response
            await self._wait_for_finish(request, seq, handle)
            record.completion_tokens = seq.completion_tokens
            if seq.finish in COMPLETED:
                body_json = chat.completion(seq) if chat is not None else _result_body(seq)
                record.completion_text = seq.text
                self._publish(record, 200)
                return JSONResponse(body_json, headers=headers)
            raise self._failure(seq)
        except RequestError as err:
            record.error_code = err.code
            err.headers.update(headers)
            self._publish(record, err.status)
            return _error(err)
        except asyncio.CancelledError:
            if seq is not None:
                self.engine.cancel(seq)
            raise
        finally:
            if seq is not None and seq.finish is None and not streaming_started:
                self.engine.cancel(seq)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        err = RequestError(
            exc.status_code,
            codes.get(exc.status_code, "http_error"),
            f"{request.method} {request.url.path}: {exc.detail}",
            headers=dict(exc.headers or {}),
        )
        return _error(err)

    async def internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(RequestError(500, "internal_error", "internal error; see the server log"))

    # -- one invocation --------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        limit = self.settings.max_body_bytes
        too_large = RequestError(
            413, "payload_too_large", f"request body is over the {limit}-byte limit"
        )
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # chunked bodies have no length to check up front
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _plain_generation(self, invocation: Invocation) -> tuple[str, Generation]:
        engine, p = self.engine, invocation.parameters
        if len(invocation.inputs) > ENCODE_INLINE_CHARS:
            prompt = await asyncio.to_thread(engine.encode_prompt, invocation.inputs)
        else:
            prompt = engine.encode_prompt(invocation.inputs)
        return invocation.inputs, Generation(
            prompt=prompt,
            prompt_field="inputs",
            max_new_tokens=p.max_new_tokens,
            max_new_tokens_field="parameters.max_new_tokens",
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            seed=p.seed,
            stop=tuple(p.stop),
        )

    async def _chat_generation(self, chat: ChatRequest) -> tuple[str, Generation]:
        """The conversation rendered by the model's chat template, and what the request asks."""
        engine = self.engine
        reason = engine.chat_unavailable()
        if reason is not None:
            raise RequestError(400, "no_chat_template", reason, field="messages")
        messages = [m.model_dump(exclude_none=True) for m in chat.messages]
        try:
            if sum(len(m.content) for m in chat.messages) > ENCODE_INLINE_CHARS:
                text, prompt = await asyncio.to_thread(engine.encode_chat, messages)
            else:
                text, prompt = engine.encode_chat(messages)
        except ChatTemplateError as err:
            raise RequestError(400, "invalid_request", str(err), field="messages") from err
        # top_p 1 keeps every token: the same as none (OpenAI's default).
        top_p = chat.top_p if chat.top_p is not None and chat.top_p < 1.0 else None
        return text, Generation(
            prompt=prompt,
            prompt_field="messages",
            max_new_tokens=chat.max_tokens,
            max_new_tokens_field="max_tokens",
            temperature=chat.temperature,
            top_k=None,
            top_p=top_p,
            seed=chat.seed,
            stop=tuple(chat.stop),
        )

    def _make_sequence(self, g: Generation, started: float, handle: Handle) -> Sequence:
        engine, settings, prompt = self.engine, self.settings, g.prompt
        if not prompt:
            # A model with a start token begins an empty prompt from it; one without has nothing
            # to continue.
            raise RequestError(
                400,
                "invalid_parameter",
                f"{g.prompt_field} is empty and this model has no start token to begin from: "
                "give some text to continue",
                field=g.prompt_field,
            )
        room = engine.max_seq_len - len(prompt)
        if room < 1:
            raise RequestError(
                400,
                "prompt_too_long",
                f"{g.prompt_field} is {len(prompt)} tokens; the model's context is "
                f"{engine.max_seq_len} tokens and at least 1 must be left to generate",
                field=g.prompt_field,
            )
        cap = min(room, settings.max_new_tokens or room)
        max_new = g.max_new_tokens
        if max_new is None:
            max_new = min(DEFAULT_MAX_NEW_TOKENS, cap)
        if max_new > cap:
            raise RequestError(
                400,
                "invalid_parameter",
                f"{g.max_new_tokens_field}: {max_new} is more than the {cap} this prompt "
                f"leaves (context {engine.max_seq_len}, prompt {len(prompt)} tokens"
                + (f", server limit {settings.max_new_tokens}" if settings.max_new_tokens else "")
                + ")",
                field=g.max_new_tokens_field,
            )
        vocab = engine.vocab_size
        if g.top_k is not None and g.top_k > vocab:
            raise RequestError(
                400,
                "invalid_parameter",
                f"parameters.top_k: {g.top_k} is more than the vocabulary ({vocab} tokens)",
                field="parameters.top_k",
            )
        return Sequence(
            prompt=prompt,
            params=SamplingParams(
                max_new_tokens=max_new,
                temperature=g.temperature,
                top_k=g.top_k,
                top_p=g.top_p,
                seed=g.seed,
                stop=g.stop,
            ),
            deadline=started + settings.request_timeout_s,
            context=handle,
            stream=handle.streaming,
        )

    def _failure(self, seq: Sequence) -> RequestError:
        if seq.finish is FinishReason.TIMEOUT:
            return RequestError(
                504,
                "deadline_exceeded",
                f"the request did not finish within {self.settings.request_timeout_s:g} s",
            )
        if seq.finish is FinishReason.SHUTDOWN:
            return _unavailable("shutting_down", "the server is shutting down; retry")
        if seq.finish is FinishReason.CANCELLED:
            return RequestError(499, "client_closed", "the client closed the connection")
        return RequestError(500, "internal_error", "generation failed; see the server log")

    def _publish(self, record: RequestRecord, status: int) -> None:
        if self.events is None:
            return
        self.events.publish(
            request_id=record.request_id,
            received_at=record.received_at,
            completed_at=datetime.now(UTC),
            latency_ms=(time.monotonic() - record.started) * 1000,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            status_code=status,
            error_code=record.error_code,
            prompt_text=record.prompt_text,
            completion_text=record.completion_text,
        )

    async def _wait_for_finish(self, request: Request, seq: Sequence, handle: Handle) -> None:
        """Waits for the engine to finish `seq`; cancels it if the client disconnects."""

        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        done = asyncio.ensure_future(handle.done.wait())
        try:
            await asyncio.wait(
                {watcher, done}, timeout=_remaining(seq), return_when="FIRST_COMPLETED"
            )
        finally:
            watcher.cancel()
            done.cancel()
        if seq.finish is None:
            self.engine.cancel(seq)
            if watcher.done() and not watcher.cancelled():
                seq.finish = FinishReason.CANCELLED
            else:
                seq.finish = FinishReason.TIMEOUT

    async def _stream_response(
        self,
        seq: Sequence,
        handle: Handle,
        headers: dict[str, str],
        record: RequestRecord,
        chat: ChatAnswer | None,
    ) -> Response:
        # Wait for the first token (or the end) before answering, so a request that times out
        # or fails in the queue still gets its status code rather than a broken 200 stream.
        try:
            first = await asyncio.wait_for(handle.queue.get(), _remaining(seq))
        except TimeoutError:
            self.engine.cancel(seq)
            seq.finish = FinishReason.TIMEOUT
            raise self._failure(seq) from None
        if first.finish is not None and first.finish not in COMPLETED:
            raise self._failure(seq)
        return StreamingResponse(
            self._events_out(seq, handle, first, record, chat),
            media_type="text/event-stream",
            headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events_out(
        self,
        seq: Sequence,
        handle: Handle,
        first: Update,
        record: RequestRecord,
        chat: ChatAnswer | None,
    ) -> AsyncIterator[bytes]:
        """The stream's events: each update's text, then the end (or an error event). Plain
        requests get `{"token": {"id", "text"}}` per token and the result; chat requests get
        chat.completion.chunk objects and `[DONE]`."""
        update: Update | None = first
        status, finished = 200, False
        if chat is not None:
            yield _sse(chat.chunk({"role": "assistant", "content": ""}))
        try:
            while update is not None:
                if update.token is not None:
                    if chat is None:
                        yield _sse({"token": {"id": update.token, "text": update.text}})
                    elif update.text:
                        yield _sse(chat.chunk({"content": update.text}))
                if update.finish is not None:
                    finished = True
                    if update.finish in COMPLETED:
                        record.completion_text = seq.text
                        for event in _stream_end(seq, update, chat):
                            yield event
                    else:
                        err = self._failure(seq)
                        status, record.error_code = err.status, err.code
                        yield _sse(err.body(), "error")
                    break
                try:
                    update = await asyncio.wait_for(handle.queue.get(), _remaining(seq))
                except TimeoutError:
                    self.engine.cancel(seq)
                    seq.finish = FinishReason.TIMEOUT
                    err = self._failure(seq)
                    status, record.error_code = err.status, err.code
                    yield _sse(err.body(), "error")
                    break
        finally:
            if not finished and seq.finish is None:
                self.engine.cancel(seq)  # the client went away mid-stream
                status, record.error_code = 499, "client_closed"
            record.completion_tokens = seq.completion_tokens
            self._publish(record, status)


def _stream_end(seq: Sequence, update: Update, chat: ChatAnswer | None) -> list[bytes]:
    """The events that close a completed stream: the text held back until the end, then the
    result (plain), or the finish chunk, the usage chunk if asked for, and [DONE] (chat)."""
    if chat is None:
        events = [_sse({"token": {"id": None, "text": update.tail}})] if update.tail else []
        return [*events, _sse(_result_body(seq))]
    events = [_sse(chat.chunk({"content": update.tail}))] if update.tail else []
    events.append(_sse(chat.chunk({}, seq.finish)))
    if chat.include_usage:
        events.append(_sse(chat.usage_chunk(seq)))
    return [*events, DONE]


def _result_body(seq: Sequence) -> dict[str, Any]:
    return {"generated_text": seq.text, "finish_reason": str(seq.finish), "usage": usage(seq)}


def _check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json":
        raise RequestError(
            400,
            "unsupported_content_type",
            f"Content-Type must be application/json, got {content_type or 'none'!r}",
        )


def create_app(
    engine: Engine,
    *,
    settings: ServerSettings | None = None,
    events: EventPublisher | None = None,
    on_engine_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """The ASGI app; its lifespan starts the engine thread and stops it (and the events).
    `app.state.kiln` is the `ServerState`."""
    handler = InvocationHandler(
        engine, settings=settings, events=events, on_engine_failure=on_engine_failure
    )
    return handler.app
