"""The /invocations request bodies, their validation, and the JSON errors clients get back.

Two shapes, as SageMaker LMI accepts them: `{"inputs", "parameters"}` (`Invocation`) and the
Messages API, `{"messages": [{"role", "content"}], ...}` (`ChatRequest`, OpenAI's chat
completions request); a body with `messages` is the second.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

# SageMaker's own limit on an InvokeEndpoint payload.
MAX_BODY_BYTES = 6 * 1024 * 1024
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128
MAX_TEMPERATURE = 100.0
# OpenAI's range for the Messages API's temperature; its default samples.
MAX_CHAT_TEMPERATURE = 2.0
DEFAULT_CHAT_TEMPERATURE = 1.0
MAX_SEED = 2**63 - 1
# Used when a request names no max_new_tokens (within what the context leaves).
DEFAULT_MAX_NEW_TOKENS = 64


class RequestError(Exception):
    """A request the server refuses; rendered as `{"error": {"code", "message"[, "field"]}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class Parameters(BaseModel):
    """Generation parameters; strict: `5.0` is not an integer and `true` is not a number."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    max_new_tokens: int | None = Field(None, ge=1)
    # 0 means greedy decoding; top_k and top_p apply only when sampling (temperature > 0).
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        return _stop_strings(value)


def _stop_strings(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    for s in items:
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return list(items)


class Invocation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    inputs: str
    parameters: Parameters = Field(default_factory=Parameters)
    # LMI's: stream the answer (as `Accept: text/event-stream` does); None leaves it to Accept.
    stream: bool | None = None


class Message(BaseModel):
    """One message of a conversation, as the model's chat template reads it."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    # A last chunk with `usage` (and no choices) before `data: [DONE]`, as OpenAI sends it.
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The Messages API request (OpenAI's chat completions, as LMI accepts it on /invocations)."""

    model_config = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)

    messages: list[Message] = Field(min_length=1)
    model: str | None = None  # echoed in the answer; one model is served
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(
        DEFAULT_CHAT_TEMPERATURE, ge=0.0, le=MAX_CHAT_TEMPERATURE, allow_inf_nan=False
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = Field(default_factory=list)
    stream: bool | None = None  # None leaves it to the Accept header
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one answer per request
    user: str | None = None  # accepted, unused

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        return _stop_strings(value)


# Fields of the Messages API that LMI takes and this server does not implement: refused by name
# rather than ignored, since ignoring them would change the answer silently.
UNSUPPORTED_CHAT_FIELDS = (
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
)


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model class that holds the field at `loc` (list indices skipped)."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info: FieldInfo | None = model.model_fields.get(str(part))
        if info is None:
            break
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
    return model


def _describe(root: type[BaseModel], error: Any) -> tuple[str, str]:
    """(field, message) for one pydantic error, in the request's own terms."""
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent, _, name = loc.rpartition(".")
        where = "parameter" if parent == "parameters" else "field"
        known = _model_at(root, tuple(error["loc"])).model_fields
        shown = name if parent in ("", "parameters") else loc
        return loc, f"unknown {where} {shown!r}; known: {', '.join(known)}"
    if error["type"] == "missing":
        return loc, f"{loc} is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    if isinstance(value, int | float) and len(repr(value)) <= 40:
        message = f"{message} (got {value!r})"
    return loc, f"{loc}: {message}"


def parse_request(body: bytes) -> Invocation | ChatRequest:
    """The validated request, of either shape, or a RequestError (400) naming the problems."""
    try:
        # Decoded first: json.loads would guess UTF-16 or UTF-32 from bytes; JSON is UTF-8.
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(
            400, "invalid_json", f"body is not UTF-8: {err.reason} at byte {err.start}"
        ) from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(
            400,
            "invalid_json",
            f"body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
        ) from err
    if not isinstance(data, dict):
        raise RequestError(
            400,
            "invalid_request",
            'body must be a JSON object like {"inputs": "..."} or {"messages": [...]}, got '
            f"{type(data).__name__}",
        )
    model: type[Invocation | ChatRequest] = Invocation
    if "messages" in data:
        model = ChatRequest
        for name in UNSUPPORTED_CHAT_FIELDS:
            if name in data:
                raise RequestError(
                    400,
                    "invalid_parameter",
                    f"{name} is not supported by this server; leave it out",
                    field=name,
                )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = [_describe(model, e) for e in err.errors(include_url=False)]
        raise RequestError(
            400,
            "invalid_parameter",
            "; ".join(message for _, message in problems[:5]),
            field=problems[0][0],
        ) from err
