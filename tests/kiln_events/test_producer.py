"""Tests of the event producer against librdkafka's mock cluster: real Kafka brokers on loopback.

The mock cluster is made through librdkafka's C API (ctypes, on the library the confluent-kafka
wheel ships), because confluent-kafka's Python API can start mock brokers but cannot take one
down and bring it back; the C API can (`rd_kafka_mock_broker_set_down`/`_up`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kiln_events.events import PredictionEvent
from kiln_events.producer import (
    EventProducer,
    MskIamToken,
    ProducerConfig,
    ProducerStartError,
    ProducerStats,
)

TOPIC = "prediction-events"
# Fast reconnects after a broker comes back; everything else is the producer's own config.
FAST_RECONNECT = {"reconnect.backoff.ms": 10, "reconnect.backoff.max.ms": 200}


def _load_librdkafka() -> ctypes.CDLL:
    import confluent_kafka

    site = Path(confluent_kafka.__file__).resolve().parent.parent
    bundled = sorted(site.glob("confluent_kafka.libs/librdkafka*.so*"))
    path = str(bundled[0]) if bundled else ctypes.util.find_library("rdkafka")
    if path is None:
        pytest.fail("librdkafka not found: neither in the confluent-kafka wheel nor the system")
    lib = ctypes.CDLL(path)
    vp, cp, i32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32
    signatures: dict[str, tuple[list[Any], Any]] = {
        "rd_kafka_conf_new": ([], vp),
        "rd_kafka_conf_set": ([vp, cp, cp, cp, ctypes.c_size_t], ctypes.c_int),
        "rd_kafka_new": ([ctypes.c_int, vp, cp, ctypes.c_size_t], vp),
        "rd_kafka_destroy": ([vp], None),
        "rd_kafka_mock_cluster_new": ([vp, ctypes.c_int], vp),
        "rd_kafka_mock_cluster_destroy": ([vp], None),
        "rd_kafka_mock_cluster_bootstraps": ([vp], cp),
        "rd_kafka_mock_topic_create": ([vp, cp, ctypes.c_int, ctypes.c_int], ctypes.c_int),
        "rd_kafka_mock_broker_set_down": ([vp, i32], ctypes.c_int),
        "rd_kafka_mock_broker_set_up": ([vp, i32], ctypes.c_int),
        "rd_kafka_mock_partition_set_leader": ([vp, cp, i32, i32], ctypes.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


class MockCluster:
    """librdkafka mock brokers on loopback (ids 1..n), with brokers that can go down and up."""

    def __init__(self, brokers: int = 3) -> None:
        self._lib = lib = _load_librdkafka()
        conf = lib.rd_kafka_conf_new()
        errstr = ctypes.create_string_buffer(512)
        lib.rd_kafka_conf_set(conf, b"log_level", b"0", errstr, len(errstr))
        self._rk = lib.rd_kafka_new(0, conf, errstr, len(errstr))  # 0: a producer handle
        assert self._rk, errstr.value.decode()
        self._cluster = lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        assert self._cluster
        self.broker_ids = list(range(1, brokers + 1))
        self.bootstrap_servers: str = lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()

    def create_topic(self, name: str, partitions: int, replication_factor: int) -> None:
        err = self._lib.rd_kafka_mock_topic_create(
            self._cluster, name.encode(), partitions, replication_factor
        )
        assert err == 0, f"mock topic create failed: {err}"

    def set_down(self, broker_id: int) -> None:
        assert self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id) == 0

    def set_up(self, broker_id: int) -> None:
        assert self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id) == 0

    def set_leader(self, topic: str, partition: int, broker_id: int) -> None:
        err = self._lib.rd_kafka_mock_partition_set_leader(
            self._cluster, topic.encode(), partition, broker_id
        )
        assert err == 0, f"mock set leader failed: {err}"

    def destroy(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._rk)


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    mock = MockCluster(brokers=3)
    mock.create_topic(TOPIC, partitions=3, replication_factor=3)
    yield mock
    mock.destroy()


@pytest.fixture
def unreachable() -> Iterator[str]:
    """A loopback address that refuses connections: bound (nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def plaintext(bootstrap: str, **overrides: Any) -> ProducerConfig:
    return ProducerConfig(
        bootstrap_servers=bootstrap,
        topic=TOPIC,
        auth="plaintext",
        linger_ms=5,
        overrides=FAST_RECONNECT,
        **overrides,
    )


def make_event(i: int, request_id: str | None = None) -> PredictionEvent:
    received = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=i)
    return PredictionEvent(
        request_id=request_id or f"req-{i}",
        model_version="v7",
        endpoint_name="kiln-test-chat",
        latency_ms=10.0 + i,
        prompt_tokens=i,
        completion_tokens=2 * i,
        request_received_at=received,
        response_completed_at=received + timedelta(milliseconds=10 + i),
        status_code=200,
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Polls a condition with a bound, so a slow machine waits longer but never hangs."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def read_topic(bootstrap: str, expected: int, timeout: float = 15.0) -> list[tuple[bytes, bytes]]:
    """Every (key, value) in the topic, read from the start of each partition.

    The partitions' watermarks give the exact number of records stored, so a duplicate (a
    retried produce written twice) shows up as a count above `expected`.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "logger": logging.getLogger("test.consumer"),
        }
    )
    try:
        partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        stored = sum(
            high - low
            for low, high in (
                consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)
                for p in partitions
            )
        )
        assert stored == expected, f"{stored} records stored, {expected} expected"
        consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in partitions])
        records: list[tuple[bytes, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                assert msg.error() is None, msg.error()
                key, value = msg.key(), msg.value()
                assert key is not None and value is not None
                records.append((key, value))
        return records
    finally:
        consumer.close()


def test_import_of_kiln_and_its_events_stays_light() -> None:
    code = (
        "import sys, kiln, kiln_events.events, kiln_events.producer\n"
        "heavy = {'confluent_kafka', 'aws_msk_iam_sasl_signer', 'botocore', 'torch'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


def test_events_round_trip_through_kafka(cluster: MockCluster) -> None:
    events = [make_event(i) for i in range(300)]
    # Two events of one request share a key, so they land on one partition, in order.
    events.append(make_event(300, request_id="req-7"))
    with EventProducer(plaintext(cluster.bootstrap_servers)) as producer:
        assert all(producer.publish(event) for event in events)
        wait_for(lambda: producer.stats().delivered == len(events), "acknowledgements")
    assert producer.stats() == ProducerStats(
        published=len(events), delivered=len(events), failed=0, dropped=0, pending=0
    )

    records = read_topic(cluster.bootstrap_servers, expected=len(events))
    received = {}
    for key, value in records:
        event = PredictionEvent.from_json(value)
        assert key == event.kafka_key()
        received[event.event_id] = event
    assert received == {event.event_id: event for event in events}
    same_request = [PredictionEvent.from_json(v).event_id for k, v in records if k == b"req-7"]
    assert same_request == [events[7].event_id, events[300].event_id]


def test_full_queue_drops_and_counts_without_blocking(unreachable: str) -> None:
    producer = EventProducer(plaintext(unreachable, max_queued_events=10))
    slowest, started = 0.0, time.perf_counter()
    accepted = []
    for i in range(2_000):
        t0 = time.perf_counter()
        accepted.append(producer.publish(make_event(i)))
        slowest = max(slowest, time.perf_counter() - t0)
    total = time.perf_counter() - started
    # Generous bounds for a busy 2-core machine; a blocking publish would take seconds.
    assert total < 2.0 and slowest < 0.25, (total, slowest)
    assert accepted == [True] * 10 + [False] * 1_990
    assert producer.stats() == ProducerStats(
        published=10, delivered=0, failed=0, dropped=1_990, pending=10
    )

    t0 = time.perf_counter()
    final = producer.close(timeout=0.2)
    assert time.perf_counter() - t0 < 3.0
    # What was queued and never acknowledged is counted as failed, not lost silently.
    assert final == ProducerStats(published=10, delivered=0, failed=10, dropped=1_990, pending=0)
    assert producer.publish(make_event(0)) is False  # closed: dropped, never raised
    assert producer.stats().dropped == 1_991
    assert producer.close().dropped == 1_991  # closing twice is harmless


def test_undeliverable_events_fail_after_the_delivery_timeout(unreachable: str) -> None:
    producer = EventProducer(plaintext(unreachable, delivery_timeout_ms=1_000))
    for i in range(5):
        assert producer.publish(make_event(i))
    assert producer.publish("not an event") is False  # type: ignore[arg-type]
    wait_for(lambda: producer.stats().failed == 5, "delivery timeouts")
    assert producer.close(timeout=1.0) == ProducerStats(
        published=5, delivered=0, failed=5, dropped=1, pending=0
    )


def test_an_event_librdkafka_refuses_is_dropped_and_logged(
    unreachable: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = plaintext(unreachable)
    config = config.model_copy(
        update={"overrides": {**config.overrides, "message.max.bytes": 1000}}
    )
    producer = EventProducer(config)
    big = make_event(1).with_raw_text(prompt_text="x" * 2_000, allowed=True)
    with caplog.at_level(logging.WARNING, logger="kiln_events.producer"):
        assert producer.publish(big) is False
    assert producer.close(timeout=0.1).dropped == 1
    assert "refused by librdkafka" in caplog.text and "MSG_SIZE_TOO_LARGE" in caplog.text


def test_broker_outage_loses_no_acknowledged_event_and_duplicates_none(
    cluster: MockCluster,
) -> None:
    producer = EventProducer(plaintext(cluster.bootstrap_servers))
    before = [make_event(i) for i in range(200)]
    for event in before:
        assert producer.publish(event)
    wait_for(lambda: producer.stats().delivered == 200, "acknowledgements before the outage")

    for broker in cluster.broker_ids:  # every broker: nothing can be written anywhere
        cluster.set_down(broker)
    during = [make_event(i) for i in range(200, 400)]
    started = time.perf_counter()
    assert all(producer.publish(event) for event in during)
    assert time.perf_counter() - started < 2.0  # publishing into an outage does not block
    time.sleep(0.3)  # long enough for librdkafka to try the downed brokers and fail
    assert producer.stats() == ProducerStats(
        published=400, delivered=200, failed=0, dropped=0, pending=200
    )

    for broker in cluster.broker_ids:
        cluster.set_up(broker)
    wait_for(lambda: producer.stats().delivered == 400, "acknowledgements after the outage")
    final = producer.close(timeout=5.0)
    assert final == ProducerStats(published=400, delivered=400, failed=0, dropped=0, pending=0)

    # Every acknowledged event is in the log exactly once (read_topic checks the count).
    records = read_topic(cluster.bootstrap_servers, expected=400)
    stored_ids = {PredictionEvent.from_json(value).event_id for _, value in records}
    assert stored_ids == {event.event_id for event in before + during}


def test_leader_failover_loses_and_duplicates_nothing(cluster: MockCluster) -> None:
    """A broker stops and its partitions' leadership moves, as in an MSK rolling patch."""
    for partition in range(3):
        cluster.set_leader(TOPIC, partition, 1)
    producer = EventProducer(plaintext(cluster.bootstrap_servers))
    events = [make_event(i) for i in range(400)]
    for event in events[:200]:
        assert producer.publish(event)
    wait_for(lambda: producer.stats().delivered == 200, "acknowledgements before the failover")

    cluster.set_down(1)
    for partition in range(3):
        cluster.set_leader(TOPIC, partition, 2)
    for event in events[200:]:
        assert producer.publish(event)
    wait_for(lambda: producer.stats().delivered == 400, "acknowledgements after the failover")
    assert producer.close(timeout=5.0) == ProducerStats(
        published=400, delivered=400, failed=0, dropped=0, pending=0
    )
    records = read_topic(cluster.bootstrap_servers, expected=400)
    assert {PredictionEvent.from_json(v).event_id for _, v in records} == {
        e.event_id for e in events
    }


def test_concurrent_publishers_and_close_keep_the_counters_whole(cluster: MockCluster) -> None:
    producer = EventProducer(plaintext(cluster.bootstrap_servers, max_queued_events=500))
    barrier = threading.Barrier(5)

    def publish_many(offset: int) -> None:
        barrier.wait()
        for i in range(400):
            producer.publish(make_event(offset + i))

    threads = [threading.Thread(target=publish_many, args=(n * 1_000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    barrier.wait()
    time.sleep(0.02)
    producer.close(timeout=10.0)  # races the publishers on purpose
    for thread in threads:
        thread.join(timeout=10)
    final = producer.stats()
    assert final.published + final.dropped == 1_600
    assert final.published == final.delivered and final.failed == 0 and final.pending == 0
    read_topic(cluster.bootstrap_servers, expected=final.delivered)


class FakeSigner:
    """Stands in for MSKAuthTokenProvider.generate_auth_token: records regions, signs nothing."""

    def __init__(self, lifetime_s: float, error: Exception | None = None) -> None:
        self.regions: list[str] = []
        self.lifetime_s = lifetime_s
        self.error = error

    def __call__(self, region: str) -> tuple[str, int]:
        self.regions.append(region)
        if self.error is not None:
            raise self.error
        return f"token-for-{region}", int((time.time() + self.lifetime_s) * 1000)


@pytest.fixture
def fake_signer(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeSigner]:
    from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # type: ignore[import-untyped]

    def install(lifetime_s: float = 900.0, error: Exception | None = None) -> FakeSigner:
        signer = FakeSigner(lifetime_s, error)
        monkeypatch.setattr(MSKAuthTokenProvider, "generate_auth_token", signer)
        return signer

    return install


def test_librdkafka_gets_its_token_from_the_signer_for_the_region(
    fake_signer: Callable[..., FakeSigner], unreachable: str
) -> None:
    # A token with under a minute left is not reused, so librdkafka's own call signs again.
    signer = fake_signer(lifetime_s=30.0)
    config = ProducerConfig(bootstrap_servers=unreachable, topic=TOPIC, region="eu-west-1")
    producer = EventProducer(config)
    try:
        wait_for(lambda: len(signer.regions) >= 2, "librdkafka's token refresh", timeout=10)
        assert set(signer.regions) == {"eu-west-1"}
        assert producer.publish(make_event(1))  # queued while the broker is unreachable
    finally:
        producer.close(timeout=0.1)


def test_token_callback_returns_expiry_in_seconds(fake_signer: Callable[..., FakeSigner]) -> None:
    fake_signer(lifetime_s=900.0)
    callback = MskIamToken("us-east-1")
    token, expiry = callback("")
    assert token == "token-for-us-east-1"
    assert time.time() + 800 < expiry < time.time() + 1_000  # epoch seconds, not milliseconds
    again, later_expiry = callback("")  # the next refresh signs anew
    assert again == token and abs(later_expiry - expiry) < 5


def test_missing_aws_credentials_fail_the_start_at_once_and_clearly(
    fake_signer: Callable[..., FakeSigner], unreachable: str
) -> None:
    fake_signer(error=RuntimeError("Unable to locate credentials"))
    config = ProducerConfig(bootstrap_servers=unreachable, topic=TOPIC, region="us-east-1")
    started = time.perf_counter()
    with pytest.raises(ProducerStartError, match=r"region 'us-east-1': Unable to locate cred"):
        EventProducer(config)
    assert time.perf_counter() - started < 2.0


def test_iam_is_the_default_and_plaintext_an_explicit_opt_in() -> None:
    iam = ProducerConfig(bootstrap_servers="b-1.msk.example:9098", topic=TOPIC, region="us-east-1")
    conf = iam.librdkafka_config()
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "OAUTHBEARER"
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["queue.buffering.max.messages"] == iam.max_queued_events
    local = plaintext("127.0.0.1:9092").librdkafka_config()
    assert local["security.protocol"] == "PLAINTEXT"
    assert local["enable.idempotence"] is True and local["acks"] == "all"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bootstrap_servers": "b-1:9098", "topic": TOPIC}, "auth='iam' needs the MSK cluster's"),
        (
            {"bootstrap_servers": "b-1.msk.example:9092", "topic": TOPIC, "auth": "plaintext"},
            "b-1.msk.example:9092 is not a loopback address",
        ),
        ({"bootstrap_servers": "b-1.msk.example", "topic": TOPIC}, "is not host:port"),
        ({"bootstrap_servers": "b:1", "topic": "bad topic!", "region": "us-east-1"}, "pattern"),
        ({"bootstrap_servers": "b:1", "topic": TOPIC, "region": "useast1"}, "pattern"),
        (
            {
                "bootstrap_servers": "b:1",
                "topic": TOPIC,
                "region": "us-east-1",
                "overrides": {"acks": "1", "sasl.mechanism": "PLAIN"},
            },
            "overrides may not set acks, sasl.mechanism",
        ),
        (
            {"bootstrap_servers": "b:1", "topic": TOPIC, "region": "us-east-1", "linger": 5},
            "Extra inputs are not permitted",
        ),
        (
            {
                "bootstrap_servers": "b:1",
                "topic": TOPIC,
                "region": "us-east-1",
                "max_queued_events": 0,
            },
            "greater than or equal to 1",
        ),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ProducerConfig(**fields)


def test_a_config_librdkafka_refuses_is_a_start_error(unreachable: str) -> None:
    config = ProducerConfig(
        bootstrap_servers=unreachable,
        topic=TOPIC,
        auth="plaintext",
        overrides={"no.such.property": 1},
    )
    with pytest.raises(ProducerStartError, match=r"no\.such\.property"):
        EventProducer(config)
