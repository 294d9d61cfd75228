"""`kiln invoke`: one prompt or conversation to the environment's endpoint, answered whole or
streamed.

The inference server takes `{"inputs": prompt, "parameters": {...}}` and answers
`{"generated_text", "finish_reason", "usage"}`; streamed (`"stream": true`) it sends
`data: {"token": {"id", "text"}}` per token and then `data: {"generated_text", ...}`, which
InvokeEndpointWithResponseStream relays in PayloadPart chunks that may cut a line (or a
UTF-8 character) anywhere. A conversation goes as the Messages API, `{"messages": [{"role",
"content"}], "max_tokens", ...}`, answered as a chat completion (`choices[0].message.content`),
or streamed (`"stream": true`) as `chat.completion.chunk` events ending with `data: [DONE]`.

The same requests work against SageMaker's LMI container (`serving.engine: lmi`), whose answers
differ in form only: `{"generated_text", "details": {"finish_reason", "generated_tokens", ...}}`
(a one-element list with TGI compatibility on), and streams as JSON Lines (`{"token": {...},
"generated_text": null}` per token, the last line carrying `generated_text`; chat chunks one
per line, without `data:` or `[DONE]`). The parser reads both forms.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kiln.contract import Outputs
from kiln_cli.operate.aws import Aws, AwsError, OperateError
from kiln_cli.operate.endpoint import is_missing

JSON = "application/json"
EVENT_STREAM = "text/event-stream"


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    seconds: float
    body: dict[str, Any] | None = None  # the whole JSON answer, when there was one


@dataclass(frozen=True)
class Event:
    """One server-sent event: its type (`message` unless named) and its data lines joined."""

    type: str
    data: str


class SseParser:
    """Incremental server-sent-events parser (WHATWG rules for `event:` and `data:` fields)
    that also reads JSON Lines, as LMI streams: a line that starts with `{` is one event (no
    SSE field name can start with `{`, so the two forms cannot be confused)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._type = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += self._decoder.decode(chunk)
        events: list[Event] = []
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return events
            line, self._buffer = self._buffer[: cut[0]], self._buffer[cut[1] :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def close(self) -> list[Event]:
        """Whatever the stream left without a final blank line."""
        tail = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        events: list[Event] = []
        for line in [*tail.replace("\r\n", "\n").replace("\r", "\n").split("\n"), ""]:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            if not self._data:
                self._type = ""
                return None
            event = Event(self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        if line.startswith("{") and not self._data:
            return Event("message", line)  # a JSON Lines record
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        return None


_NEWLINE = re.compile(r"[\r\n]")


def _line_end(text: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next) for \\n, \\r\\n or \\r; None if incomplete."""
    found = _NEWLINE.search(text)
    if found is None:
        return None
    index = found.start()
    if text[index] == "\n":
        return index, index + 1
    if index + 1 == len(text):
        return None  # a \n may follow in the next chunk
    return index, index + (2 if text[index + 1] == "\n" else 1)


def request_body(prompt: str, parameters: dict[str, Any], *, stream: bool = False) -> bytes:
    """`{"inputs", "parameters"}`; streamed, with `"stream": true`, which LMI needs (it does
    not read the Accept header) and kiln's server accepts."""
    body: dict[str, Any] = {
        "inputs": prompt,
        "parameters": {k: v for k, v in parameters.items() if v is not None},
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def _finish_and_usage(answer: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The finish reason and token usage of a kiln answer (`finish_reason`, `usage`) or an LMI
    one (`details.finish_reason`, `details.generated_tokens`, `details.input_length`)."""
    usage = answer.get("usage") or {}
    finish = answer.get("finish_reason")
    details = answer.get("details")
    if isinstance(details, dict):
        finish = finish or details.get("finish_reason")
        if not usage and details.get("generated_tokens") is not None:
            usage = {"completion_tokens": details["generated_tokens"]}
            if details.get("input_length") is not None:
                usage["prompt_tokens"] = details["input_length"]
    return (None if finish is None else str(finish)), usage


def parse_message(text: str) -> dict[str, str]:
    """`ROLE:CONTENT` (as `--message user:"Hello"` gives it) as a message."""
    role, colon, content = text.partition(":")
    if not colon or role.strip() not in ROLES:
        raise OperateError(
            f"--message {text!r}: write it as ROLE:TEXT with ROLE one of {', '.join(ROLES)}, "
            'e.g. --message user:"Hello"',
            exit_code=2,
        )
    return {"role": role.strip(), "content": content}


def read_messages(text: str, source: str) -> list[dict[str, Any]]:
    """A conversation file: a JSON list of `{"role", "content"}`, or an object whose `messages`
    is one (a Messages API request body)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise OperateError(f"{source} is not JSON: {err}", exit_code=2) from err
    messages = data.get("messages") if isinstance(data, dict) else data
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
    ):
        raise OperateError(
            f'{source} must hold a list of messages like [{{"role": "user", "content": "..."}}] '
            '(or {"messages": [...]})',
            exit_code=2,
        )
    return messages


def chat_body(messages: list[dict[str, Any]], options: dict[str, Any], *, stream: bool) -> bytes:
    """The Messages API request; streamed, it asks for the usage chunk too."""
    body: dict[str, Any] = {"messages": messages}
    body |= {k: v for k, v in options.items() if v is not None}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


def _server_error(body: str) -> str:
    """The inference server's `{"error": {"code", "message"}}` in words, else the body."""
    try:
        error = json.loads(body).get("error", {})
    except (json.JSONDecodeError, AttributeError):
        return body.strip()[:500]
    if isinstance(error, dict) and error.get("message"):
        return f"{error['message']} ({error.get('code', 'error')})"
    return body.strip()[:500]


def _explain(err: AwsError, name: str, env: str) -> OperateError | None:
    """Advice for the endpoint's own failures; None leaves `err`'s advice as it is."""
    if is_missing(err):
        return OperateError(
            f"endpoint {name} does not exist: deploy a model first (`kiln deploy-model --env "
            f"{env} --artifact s3://.../model.tar.gz`)"
        )
    if err.code == "ModelError":
        return OperateError(f"the model server answered with an error: {_model_error(err)}")
    if err.code == "ModelNotReadyException":
        return OperateError(f"endpoint {name} is not ready yet: retry in a minute")
    return None


def _model_error(err: AwsError) -> str:
    cause = err.__cause__
    response = getattr(cause, "response", {}) or {}
    status = response.get("OriginalStatusCode")
    body = response.get("OriginalMessage") or err.aws_message
    prefix = f"HTTP {status}: " if status else ""
    return prefix + _server_error(str(body))


def endpoint_name(aws: Aws) -> str:
    return aws.output(Outputs.ENDPOINT_NAME)


def _call_endpoint(aws: Aws, name: str, operation: str, accept: str, body: bytes) -> dict[str, Any]:
    """One runtime call to endpoint `name`; its failures become advice about the endpoint."""
    try:
        return aws.call(
            "sagemaker-runtime",
            operation,
            EndpointName=name,
            ContentType=JSON,
            Accept=accept,
            Body=body,
        )
    except AwsError as err:
        advice = _explain(err, name, aws.settings.name)
        if advice is None:
            raise
        raise advice from err


def invoke(
    aws: Aws,
    prompt: str,
    parameters: dict[str, Any],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Answer:
    """InvokeEndpoint; the answer's text, finish reason and token usage."""
    name = endpoint_name(aws)
    started = clock()
    response = _call_endpoint(aws, name, "invoke_endpoint", JSON, request_body(prompt, parameters))
    raw = response["Body"].read().decode("utf-8", errors="replace")
    try:
        body = json.loads(raw)
        if isinstance(body, list) and len(body) == 1:
            body = body[0]  # LMI with TGI compatibility answers a one-element list
        text = body["generated_text"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise OperateError(
            f"endpoint {name} answered something other than kiln's JSON: {raw[:300]!r}"
        ) from err
    finish, usage = _finish_and_usage(body)
    _refuse_error_finish(name, finish)
    return Answer(str(text), finish, usage, clock() - started)


def chat(
    aws: Aws,
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Answer:
    """InvokeEndpoint with a conversation; the assistant's answer."""
    name = endpoint_name(aws)
    started = clock()
    body = chat_body(messages, options, stream=False)
    response = _call_endpoint(aws, name, "invoke_endpoint", JSON, body)
    raw = response["Body"].read().decode("utf-8", errors="replace")
    try:
        answer = json.loads(raw)
        choice = answer["choices"][0]
        text = choice["message"]["content"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise OperateError(
            f"endpoint {name} answered something other than a chat completion: {raw[:300]!r}"
        ) from err
    return Answer(
        str(text),
        choice.get("finish_reason"),
        answer.get("usage") or {},
        clock() - started,
        answer,
    )


def chat_stream(
    aws: Aws,
    messages: list[dict[str, Any]],
    options: dict[str, Any],
    write: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Answer:
    """InvokeEndpointWithResponseStream with a conversation; writes each delta as it arrives."""
    name = endpoint_name(aws)
    started = clock()
    body = chat_body(messages, options, stream=True)
    response = _call_endpoint(aws, name, "invoke_endpoint_with_response_stream", EVENT_STREAM, body)
    pieces: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] = {}
    done = False
    for event in _events(response["Body"], SseParser(), name):
        if event.type == "error":
            raise OperateError(f"the model server stopped the stream: {_server_error(event.data)}")
        if event.data.strip() == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(event.data)
            choices = chunk.get("choices") or []
        except (json.JSONDecodeError, AttributeError) as err:
            raise OperateError(
                f"endpoint {name} sent an event that is not a chat completion chunk: "
                f"{event.data[:300]!r}"
            ) from err
        if isinstance(chunk, dict) and chunk.get("error"):
            raise OperateError(f"the model server stopped the stream: {_server_error(event.data)}")
        usage = chunk.get("usage") or usage
        for choice in choices:
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                pieces.append(text)
                write(text)
            finish = choice.get("finish_reason") or finish
    if not done and finish is None:
        raise OperateError(
            f"the stream from {name} ended before its last chunk ({len(pieces)} pieces came)"
        )
    return Answer("".join(pieces), finish, usage, clock() - started)


def stream(
    aws: Aws,
    prompt: str,
    parameters: dict[str, Any],
    write: Callable[[str], None],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Answer:
    """InvokeEndpointWithResponseStream; writes each token's text as its event arrives."""
    name = endpoint_name(aws)
    started = clock()
    body = request_body(prompt, parameters, stream=True)
    response = _call_endpoint(aws, name, "invoke_endpoint_with_response_stream", EVENT_STREAM, body)
    parser = SseParser()
    pieces: list[str] = []
    final: dict[str, Any] | None = None
    for event in _events(response["Body"], parser, name):
        if event.type == "error":
            raise OperateError(f"the model server stopped the stream: {_server_error(event.data)}")
        try:
            data = json.loads(event.data)
        except json.JSONDecodeError as err:
            raise OperateError(
                f"endpoint {name} sent an event that is not JSON: {event.data!r}"
            ) from err
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("error"), dict | str):
            raise OperateError(f"the model server stopped the stream: {_server_error(event.data)}")
        token = data.get("token")
        # kiln sends the text in a last event of its own; LMI puts it on the last token's line.
        if isinstance(token, dict):
            text = str(token.get("text", ""))
            pieces.append(text)
            if text:
                write(text)
        if data.get("generated_text") is not None:
            final = data
    seconds = clock() - started
    if final is None:
        raise OperateError(
            f"the stream from {name} ended before its final event ({len(pieces)} tokens came)"
        )
    finish, usage = _finish_and_usage(final)
    _refuse_error_finish(name, finish)
    return Answer(str(final["generated_text"]), finish, usage, seconds)


def _refuse_error_finish(name: str, finish: str | None) -> None:
    """LMI reports a failed generation as an empty answer with `finish_reason: error`."""
    if finish == "error":
        raise OperateError(
            f"the model server on {name} failed the generation (finish_reason: error); its "
            "log group /aws/sagemaker/Endpoints/" + name + " says why"
        )


def _events(body: Iterable[dict[str, Any]], parser: SseParser, name: str) -> Iterable[Event]:
    from botocore.exceptions import EventStreamError  # type: ignore[import-untyped]

    try:
        for part in body:
            if "PayloadPart" in part:
                yield from parser.feed(part["PayloadPart"].get("Bytes", b""))
            for failure in ("ModelStreamError", "InternalStreamFailure"):
                if failure in part:
                    raise OperateError(f"{name}: {failure}: {part[failure].get('Message', '')}")
    except EventStreamError as err:
        code = err.response.get("Error", {}).get("Code", "")
        message = err.response.get("Error", {}).get("Message", str(err))
        raise OperateError(f"the stream from {name} failed: {code}: {message}") from err
    yield from parser.close()
