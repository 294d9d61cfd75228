"""Tests of the prediction event schema: JSON round trip, validation errors, the raw-text policy."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from kiln_events.events import (
    MAX_TEXT_CHARS,
    SCHEMA_VERSION,
    TIMESTAMP_FORMAT,
    PayloadField,
    PredictionEvent,
    payload_fields,
)

RECEIVED = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def fields(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "request_id": "req-1",
        "model_version": "llama-7b-2026-03-01",
        "endpoint_name": "kiln-dev-chat",
        "latency_ms": 41.5,
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "request_received_at": RECEIVED,
        "response_completed_at": RECEIVED + timedelta(milliseconds=41.5),
    }
    values.update(overrides)
    return values


def error_types(err: ValidationError) -> set[str]:
    return {e["type"] for e in err.errors()}


def test_json_round_trip_is_equal_and_compact_utf8() -> None:
    event = PredictionEvent(**fields(status_code=200))
    data = event.to_json()
    assert isinstance(data, bytes)
    assert b": " not in data and b", " not in data and b"\n" not in data
    assert PredictionEvent.from_json(data) == event
    assert PredictionEvent.from_json(data.decode()) == event
    payload = json.loads(data)
    assert payload["schema_version"] == SCHEMA_VERSION
    assert payload["request_received_at"] == "2026-03-01T12:00:00.250000Z"


def test_timestamps_have_one_fixed_width_format() -> None:
    on_the_second = RECEIVED.replace(microsecond=0)
    payload = json.loads(PredictionEvent(**fields(request_received_at=on_the_second)).to_json())
    assert payload["request_received_at"] == "2026-03-01T12:00:00.000000Z"
    for key in ("request_received_at", "response_completed_at"):
        parsed = datetime.strptime(payload[key], TIMESTAMP_FORMAT)
        assert len(payload[key]) == 27 and parsed.year == 2026


def test_raw_text_round_trips_as_utf8_where_allowed() -> None:
    event = PredictionEvent(**fields()).with_raw_text(
        prompt_text="grüß dich 你好", completion_text="ok", allowed=True
    )
    data = event.to_json()
    assert "grüß dich 你好".encode() in data  # UTF-8 bytes, not \\u escapes
    assert PredictionEvent.from_json(data, allow_raw_text=True) == event


def test_event_ids_are_generated_and_unique() -> None:
    a, b = PredictionEvent(**fields()), PredictionEvent(**fields())
    assert a.event_id != b.event_id and len(a.event_id) == 36


def test_key_is_the_request_id() -> None:
    assert PredictionEvent(**fields(request_id="abc-é")).kafka_key() == "abc-é".encode()


def test_offsets_are_normalized_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    event = PredictionEvent(**fields(request_received_at=RECEIVED.astimezone(plus_two)))
    assert event.request_received_at.utcoffset() == timedelta(0)
    assert event.request_received_at == RECEIVED
    assert json.loads(event.to_json())["request_received_at"].endswith("Z")


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValidationError, match="has no timezone") as err:
        PredictionEvent(**fields(response_completed_at=datetime(2026, 3, 1, 12, 0)))
    assert error_types(err.value) == {"naive_datetime"}
    data = PredictionEvent(**fields()).to_json().replace(b'.250000Z"', b'.250000"')
    with pytest.raises(ValidationError, match="has no timezone"):
        PredictionEvent.from_json(data)


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        PredictionEvent(**fields(user_email="x@example.com"))
    assert error_types(err.value) == {"extra_forbidden"}
    payload = json.loads(PredictionEvent(**fields()).to_json())
    payload["surprise"] = 1
    with pytest.raises(ValidationError, match="surprise"):
        PredictionEvent.from_json(json.dumps(payload))


@pytest.mark.parametrize(
    ("override", "error_type"),
    [
        ({"prompt_tokens": -1}, "greater_than_equal"),
        ({"prompt_tokens": "12"}, "int_type"),  # strict: no silent coercion of strings
        ({"latency_ms": float("nan")}, "finite_number"),
        ({"request_id": ""}, "string_too_short"),
        ({"endpoint_name": "e" * 129}, "string_too_long"),
        ({"status_code": 42}, "greater_than_equal"),
        ({"schema_version": 2}, "schema_version"),
    ],
)
def test_invalid_values_are_rejected(override: dict[str, Any], error_type: str) -> None:
    with pytest.raises(ValidationError) as err:
        PredictionEvent(**fields(**override))
    assert error_types(err.value) == {error_type}


def test_newer_schema_version_is_refused_by_name() -> None:
    payload = json.loads(PredictionEvent(**fields()).to_json())
    payload["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ValidationError, match=r"schema_version 2 is not one this reader knows"):
        PredictionEvent.from_json(json.dumps(payload))


def test_events_are_frozen() -> None:
    event = PredictionEvent(**fields())
    with pytest.raises(ValidationError):
        event.latency_ms = 1.0  # type: ignore[misc]


def test_raw_text_is_refused_by_default_everywhere() -> None:
    secret = "my card number is 4111 1111 1111 1111"
    with pytest.raises(ValidationError, match="raw user text is not allowed") as err:
        PredictionEvent(**fields(prompt_text=secret))
    assert error_types(err.value) == {"raw_text_not_allowed"}
    assert "4111" not in str(err.value)  # the error must not copy user text into logs

    event = PredictionEvent(**fields())
    with pytest.raises(ValidationError, match="completion_text: raw user text") as err:
        event.with_raw_text(completion_text=secret, allowed=False)
    assert "4111" not in str(err.value)

    with_text = event.with_raw_text(prompt_text=secret, allowed=True)
    with pytest.raises(ValidationError, match="prompt_text: raw user text"):
        PredictionEvent.from_json(with_text.to_json())


def test_raw_text_is_truncated_not_rejected() -> None:
    long_text = "x" * (MAX_TEXT_CHARS + 10)
    event = PredictionEvent(**fields()).with_raw_text(prompt_text=long_text, allowed=True)
    assert event.prompt_text == "x" * MAX_TEXT_CHARS
    # Worst case UTF-8 (4 bytes a character) still fits Redshift's VARCHAR(65535).
    assert len(("😀" * MAX_TEXT_CHARS).encode()) <= 65_535


def test_payload_fields_match_the_json_keys_in_order() -> None:
    specs = payload_fields()
    payload = json.loads(PredictionEvent(**fields()).to_json())
    assert [s.name for s in specs] == list(payload)
    by_name = {s.name: s for s in specs}
    assert by_name["request_id"] == PayloadField("request_id", str, False)
    assert by_name["latency_ms"] == PayloadField("latency_ms", float, False)
    assert by_name["request_received_at"] == PayloadField("request_received_at", datetime, False)
    assert by_name["status_code"] == PayloadField("status_code", int, True)
    assert by_name["prompt_text"] == PayloadField("prompt_text", str, True)
    name, python_type, nullable = by_name["schema_version"]  # unpacks as a plain triple
    assert (name, python_type, nullable) == ("schema_version", int, False)
    nullable_keys = {s.name for s in specs if s.nullable}
    assert nullable_keys == {"status_code", "error_code", "prompt_text", "completion_text"}


def test_payload_fields_refuse_types_the_warehouse_cannot_map() -> None:
    class Nested(BaseModel):
        tags: list[str]

    with pytest.raises(TypeError, match=r"Nested.tags has type list\[str\]; allowed: str, int"):
        payload_fields(Nested)
