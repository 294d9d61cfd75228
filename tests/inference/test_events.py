"""Event settings from the environment, MSK broker lookup, and a producer that starts late."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from inference.events import (
    EventConfigError,
    EventPublisher,
    EventSettings,
    msk_bootstrap_servers,
)
from kiln_events.events import PredictionEvent

ARN = "arn:aws:kafka:eu-west-1:123456789012:cluster/kiln-dev/0b5e1c2d-1111-2222-3333-444455556666-2"


def settings(**env: str) -> EventSettings:
    return EventSettings.from_env(env, default_model_version="model-dir")


def test_no_topic_means_events_off() -> None:
    assert not settings().enabled
    assert settings().model_version == "model-dir"


def test_serving_stack_variables() -> None:
    s = settings(
        KILN_EVENTS_CLUSTER_ARN=ARN,
        KILN_EVENTS_TOPIC="prediction-events",
        KILN_EVENTS_REGION="eu-west-1",
        KILN_ALLOW_RAW_TEXT="true",
        KILN_ENDPOINT_NAME="kiln-dev-chat",
        KILN_MODEL_VERSION="abc123",
    )
    assert s.enabled and s.auth == "iam" and s.allow_raw_text
    assert (s.cluster_arn, s.region, s.endpoint_name, s.model_version) == (
        ARN,
        "eu-west-1",
        "kiln-dev-chat",
        "abc123",
    )


@pytest.mark.parametrize(
    ("env", "mentions"),
    [
        ({"KILN_EVENTS_TOPIC": "t"}, "neither KILN_EVENTS_CLUSTER_ARN"),
        ({"KILN_EVENTS_BOOTSTRAP": "b:9098"}, "without KILN_EVENTS_TOPIC"),
        ({"KILN_EVENTS_TOPIC": "t", "KILN_EVENTS_CLUSTER_ARN": ARN}, "KILN_EVENTS_REGION"),
        ({"KILN_ALLOW_RAW_TEXT": "maybe"}, "KILN_ALLOW_RAW_TEXT='maybe'"),
        ({"KILN_EVENTS_AUTH": "scram"}, "KILN_EVENTS_AUTH='scram'"),
        (
            {
                "KILN_EVENTS_TOPIC": "t",
                "KILN_EVENTS_BOOTSTRAP": "b-1.kafka.example.com:9092",
                "KILN_EVENTS_AUTH": "plaintext",
            },
            "not a loopback address",
        ),
        (
            {"KILN_EVENTS_TOPIC": "bad topic!", "KILN_EVENTS_BOOTSTRAP": "127.0.0.1:9092"},
            "topic",
        ),
    ],
)
def test_inconsistent_settings_fail_with_the_variable_named(
    env: dict[str, str], mentions: str
) -> None:
    env.setdefault("KILN_EVENTS_AUTH", "plaintext" if "KILN_EVENTS_BOOTSTRAP" in env else "iam")
    with pytest.raises(EventConfigError) as info:
        settings(**env)
    assert mentions in str(info.value)


def test_msk_bootstrap_lookup_asks_for_the_iam_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("kafka", region_name="eu-west-1")
    stub = Stubber(client)
    brokers = "b-1.kiln.abc.c2.kafka.eu-west-1.amazonaws.com:9098"
    stub.add_response(
        "get_bootstrap_brokers", {"BootstrapBrokerStringSaslIam": brokers}, {"ClusterArn": ARN}
    )
    stub.add_response("get_bootstrap_brokers", {"BootstrapBrokerStringTls": "x:9094"})
    monkeypatch.setattr(boto3, "client", lambda *a, **k: client)
    with stub:
        assert msk_bootstrap_servers(ARN, None) == brokers
        with pytest.raises(RuntimeError, match="no IAM-auth listener"):
            msk_bootstrap_servers(ARN, "eu-west-1")


class FakeProducer:
    def __init__(self, config: Any) -> None:
        self.config = config
        self.events: list[PredictionEvent] = []

    def publish(self, event: PredictionEvent) -> bool:
        self.events.append(event)
        return True

    def close(self, timeout: float = 0) -> Any:
        return "closed"


def event_fields(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "request_id": "r-1",
        "received_at": now,
        "completed_at": now,
        "latency_ms": 12.5,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "status_code": 200,
        "prompt_text": "hello",
        "completion_text": "world",
    }
    fields.update(overrides)
    return fields


def test_publisher_retries_the_lookup_and_starts_late() -> None:
    s = settings(
        KILN_EVENTS_CLUSTER_ARN=ARN, KILN_EVENTS_TOPIC="prediction-events", AWS_REGION="eu-west-1"
    )
    calls: list[str] = []
    started = threading.Event()

    def resolve(arn: str, region: str | None) -> str:
        calls.append(arn)
        if len(calls) < 3:
            raise RuntimeError("no credentials yet")
        return "127.0.0.1:9098"

    def factory(config: Any) -> FakeProducer:
        started.set()
        return FakeProducer(config)

    publisher = EventPublisher(s, producer_factory=factory, resolve=resolve, retry_s=0.01)
    assert publisher.publish(**event_fields()) is False  # not started: counted, not raised
    assert publisher.dropped_before_start == 1
    publisher.start()
    assert started.wait(10)
    while publisher.producer is None:
        pass
    assert publisher.publish(**event_fields())
    event = publisher.producer.events[0]
    assert (event.request_id, event.completion_tokens, event.status_code) == ("r-1", 4, 200)
    assert event.prompt_text is None  # KILN_ALLOW_RAW_TEXT is off
    assert publisher.producer.config.bootstrap_servers == "127.0.0.1:9098"
    publisher.close()
    assert publisher.publish(**event_fields()) is False


def test_raw_text_only_where_allowed() -> None:
    s = settings(
        KILN_EVENTS_BOOTSTRAP="127.0.0.1:9092",
        KILN_EVENTS_AUTH="plaintext",
        KILN_EVENTS_TOPIC="prediction-events",
        KILN_ALLOW_RAW_TEXT="true",
    )
    publisher = EventPublisher(s, producer_factory=FakeProducer)
    publisher.start()
    while publisher.producer is None:
        pass
    assert publisher.publish(**event_fields(status_code=504, error_code="deadline_exceeded"))
    event = publisher.producer.events[0]
    assert (event.prompt_text, event.completion_text) == ("hello", "world")
    assert (event.status_code, event.error_code) == (504, "deadline_exceeded")
    publisher.close()
