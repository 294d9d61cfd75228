"""Fixtures of the server tests: the tiny model, a mock Kafka cluster, a running server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.support import Server, start_server, write_model

EVENTS_TOPIC = "prediction-events"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """librdkafka's mock cluster (one broker on loopback), alive while its handle lives."""
    from confluent_kafka import Producer

    handle = Producer({"test.mock.num.brokers": 1, "logger": logging.getLogger("mock.kafka")})
    brokers = handle.list_topics(timeout=10).brokers.values()
    yield ",".join(f"{b.host}:{b.port}" for b in brokers)
    handle.flush(1)


@pytest.fixture(scope="module")
def server(
    model_dir: Path, kafka: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The server as an endpoint runs it, publishing events to the mock cluster."""
    env = {
        "KILN_EVENTS_BOOTSTRAP": kafka,
        "KILN_EVENTS_AUTH": "plaintext",
        "KILN_EVENTS_TOPIC": EVENTS_TOPIC,
        "KILN_ENDPOINT_NAME": "kiln-test-chat",
        "KILN_MODEL_VERSION": "v-test",
        "KILN_ALLOW_RAW_TEXT": "false",
    }
    srv = start_server(model_dir, tmp_path_factory.mktemp("server") / "server.log", env=env)
    yield srv
    assert srv.stop() == 0, srv.log()
