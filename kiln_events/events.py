"""The versioned schema of prediction events that endpoints publish to Kafka, and its JSON form."""

from __future__ import annotations

import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Bump on any change a reader must know about (a field added, renamed or retyped); a reader
# rejects versions it does not know instead of guessing.
SCHEMA_VERSION = 1

# Identifiers and names: generous for uuids, SageMaker endpoint names (63) and model versions,
# small enough that the warehouse can type them as short VARCHARs.
MAX_ID_CHARS = 128
# Raw text is truncated (not rejected) to this many characters: 4 bytes per character at most
# in UTF-8, so it fits Redshift's largest VARCHAR (65,535 bytes). A long prompt must never make
# building an event fail.
MAX_TEXT_CHARS = 16_000

# Every datetime is written in one fixed-width form (microseconds, `Z`), so the warehouse and
# Athena parse one format.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_CONTEXT_KEY = "allow_raw_text"
_TEXT_FIELDS = ("prompt_text", "completion_text")

IdStr = typing.Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise PydanticCustomError(
            "naive_datetime",
            "{value} has no timezone; give an aware time, e.g. datetime.now(UTC)",
            {"value": value.isoformat()},
        )
    # Any offset is accepted and stored as UTC, so equal instants compare and serialize equal.
    return value.astimezone(UTC)


# A plain `datetime` to whoever reads the annotation (payload_fields), aware and UTC once valid.
UtcDatetime = typing.Annotated[datetime, AfterValidator(_aware_utc)]


class PredictionEvent(BaseModel):
    """One served prediction: who served it, how fast, how many tokens; no user text by default.

    Raw prompt/completion text is refused unless the caller says its environment permits it:
    build the event without text, then `event.with_raw_text(..., allowed=...)`; parse with
    `PredictionEvent.from_json(data, allow_raw_text=...)`. Text where it is not allowed is an
    error, not silently dropped: dropping would hide the bug that put it there (a code path that
    should have left it out), and the error is the same on every call, so tests catch it.
    """

    # hide_input_in_errors: a validation error must not copy user text into a log line.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, hide_input_in_errors=True)

    schema_version: int = SCHEMA_VERSION
    event_id: IdStr = Field(default_factory=lambda: str(uuid.uuid4()))
    request_id: IdStr
    model_version: IdStr
    endpoint_name: IdStr
    latency_ms: float = Field(ge=0, allow_inf_nan=False)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    request_received_at: UtcDatetime
    response_completed_at: UtcDatetime
    # HTTP status the endpoint answered with, and an error code of ours when it failed.
    status_code: int | None = Field(None, ge=100, le=599)
    error_code: IdStr | None = None
    prompt_text: str | None = None
    completion_text: str | None = None

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise PydanticCustomError(
                "schema_version",
                "schema_version {value} is not one this reader knows; allowed: {known}",
                {"value": value, "known": SCHEMA_VERSION},
            )
        return value

    @field_validator("prompt_text", "completion_text")
    @classmethod
    def _truncate(cls, value: str | None) -> str | None:
        return value[:MAX_TEXT_CHARS] if value is not None else None

    @model_validator(mode="after")
    def _raw_text_policy(self, info: ValidationInfo) -> PredictionEvent:
        # No context (plain construction) means not allowed: opting in must be explicit.
        allowed = bool(info.context and info.context.get(_CONTEXT_KEY))
        present = [name for name in _TEXT_FIELDS if getattr(self, name) is not None]
        if present and not allowed:
            raise PydanticCustomError(
                "raw_text_not_allowed",
                "{fields}: raw user text is not allowed here; leave it out, or, where the "
                "environment's config permits raw text, use event.with_raw_text(..., "
                "allowed=True) or PredictionEvent.from_json(data, allow_raw_text=True)",
                {"fields": ", ".join(present)},
            )
        return self

    @field_serializer("request_received_at", "response_completed_at")
    def _timestamp(self, value: datetime) -> str:
        # isoformat always writes the 6 fraction digits here; "+00:00" becomes "Z".
        return value.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"

    def with_raw_text(
        self,
        *,
        prompt_text: str | None = None,
        completion_text: str | None = None,
        allowed: bool,
    ) -> PredictionEvent:
        """A copy carrying raw text; raises a ValidationError unless `allowed` is true.

        `allowed` comes from the environment's config, so the call site shows the decision.
        """
        data = dict(self)  # the values themselves: model_dump() would serialize the datetimes
        data.update(prompt_text=prompt_text, completion_text=completion_text)
        return PredictionEvent.model_validate(data, context={_CONTEXT_KEY: allowed})

    def to_json(self) -> bytes:
        """Compact UTF-8 JSON: the Kafka message value."""
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str, *, allow_raw_text: bool = False) -> PredictionEvent:
        """Parses and validates one message value; raw text only where `allow_raw_text`."""
        return cls.model_validate_json(data, context={_CONTEXT_KEY: allow_raw_text})

    def kafka_key(self) -> bytes:
        """The message key: the request id, so one request's events share a partition."""
        return self.request_id.encode("utf-8")


class PayloadField(NamedTuple):
    """One key of the JSON payload: its name, the Python type of its value, and if it may be null.

    `datetime` values are strings in `TIMESTAMP_FORMAT` (UTC) in the JSON.
    """

    name: str
    python_type: type
    nullable: bool


_SIMPLE_TYPES: tuple[type, ...] = (str, int, float, bool, datetime)


def payload_fields(model: type[BaseModel] = PredictionEvent) -> list[PayloadField]:
    """The JSON payload's keys in order, for code that generates SQL (Redshift views) from them.

    Every key is always present in the payload (null where a value is absent). Types are plain
    Python types (str, int, float, bool, datetime), so callers need no pydantic knowledge.
    """
    fields = []
    for name, info in model.model_fields.items():
        python_type, nullable = _unwrap_optional(info.annotation)
        if python_type not in _SIMPLE_TYPES:
            # A guard for whoever adds a field: the warehouse only maps simple types.
            raise TypeError(
                f"{model.__name__}.{name} has type {python_type!r}; allowed: "
                f"{', '.join(t.__name__ for t in _SIMPLE_TYPES)}, or None of those"
            )
        fields.append(PayloadField(name, python_type, nullable))
    return fields


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, _ = _unwrap_optional(args[0]) if len(args) == 1 else (annotation, True)
        return inner, True
    return annotation, False
