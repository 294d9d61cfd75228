"""Measures the event producer's throughput against librdkafka's mock brokers, beside a bare one.

Both sides send the same events through the same librdkafka settings (idempotent, acks=all):
"kiln" is `EventProducer.publish(event)` (serialization, counters, the never-raise guard);
"bare" is confluent-kafka's `produce()` of bytes serialized beforehand, the floor of what
librdkafka costs. The mock brokers run in this process on loopback, so the absolute numbers
say what the client can push, not what MSK accepts; the ratio is the overhead of our layer.
Usage: `python scripts/bench_producer.py [--events N] [--runs R]`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln_events.events import PredictionEvent
from kiln_events.producer import EventProducer, ProducerConfig

TOPIC = "bench-events"


def mock_cluster(brokers: int) -> tuple[Any, str]:
    """Starts mock brokers inside a bare client; returns it (keep it alive) and their addresses."""
    from confluent_kafka import Producer

    host = Producer({"test.mock.num.brokers": brokers, "logger": logging.getLogger("mock")})
    # The mock cluster creates the topic on first metadata request (4 partitions, 3 replicas).
    metadata = host.list_topics(TOPIC, timeout=10)
    servers = ",".join(sorted(f"{b.host}:{b.port}" for b in metadata.brokers.values()))
    return host, servers


def make_events(n: int) -> list[PredictionEvent]:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    return [
        PredictionEvent(
            request_id=f"req-{i:08d}",
            model_version="llama-7b-2026-03-01",
            endpoint_name="kiln-prod-chat",
            latency_ms=35.5 + i % 100,
            prompt_tokens=200 + i % 50,
            completion_tokens=150 + i % 70,
            request_received_at=start + timedelta(milliseconds=i),
            response_completed_at=start + timedelta(milliseconds=i + 40),
            status_code=200,
        )
        for i in range(n)
    ]


def run_kiln(servers: str, events: list[PredictionEvent]) -> tuple[float, float, int]:
    config = ProducerConfig(
        bootstrap_servers=servers,
        topic=TOPIC,
        auth="plaintext",
        max_queued_events=len(events),
        max_queued_kbytes=1_048_576,
    )
    producer = EventProducer(config)
    started = time.perf_counter()
    for event in events:
        producer.publish(event)
    produced = time.perf_counter() - started
    stats = producer.close(timeout=60.0)
    acknowledged = time.perf_counter() - started
    assert stats.delivered == len(events), stats
    return produced, acknowledged, stats.dropped


def run_bare(servers: str, events: list[PredictionEvent]) -> tuple[float, float, int]:
    from confluent_kafka import Producer

    config = ProducerConfig(
        bootstrap_servers=servers,
        topic=TOPIC,
        auth="plaintext",
        max_queued_events=len(events),
        max_queued_kbytes=1_048_576,
    ).librdkafka_config()
    delivered = 0

    def on_delivery(err: Any, msg: Any) -> None:
        nonlocal delivered
        delivered += err is None

    stop = threading.Event()
    producer = Producer({**config, "on_delivery": on_delivery, "logger": logging.getLogger("b")})
    poller = threading.Thread(target=lambda: [producer.poll(0.1) for _ in iter(stop.is_set, True)])
    poller.start()
    payloads = [(e.to_json(), e.kafka_key()) for e in events]
    started = time.perf_counter()
    for value, key in payloads:
        producer.produce(TOPIC, value=value, key=key)
    produced = time.perf_counter() - started
    stop.set()
    poller.join()
    producer.flush(60.0)
    acknowledged = time.perf_counter() - started
    assert delivered == len(events), delivered
    return produced, acknowledged, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--brokers", type=int, default=3)
    args = parser.parse_args()

    host, servers = mock_cluster(args.brokers)
    events = make_events(args.events)
    size = statistics.mean(len(e.to_json()) for e in events[:1000])
    t0 = time.perf_counter()
    for e in events:
        e.to_json()
    serialize = args.events / (time.perf_counter() - t0)
    print(
        f"{args.events} events of ~{size:.0f} bytes, {args.runs} runs, {args.brokers} mock brokers"
    )
    print(f"serialization alone: {serialize:,.0f} events/s")

    sides: dict[str, Callable[[str, list[PredictionEvent]], tuple[float, float, int]]] = {
        "bare": run_bare,
        "kiln": run_kiln,
    }
    best: dict[str, tuple[float, float]] = {}
    for name, run in sides.items():
        runs = tqdm(range(args.runs), desc=f"{name} runs", file=sys.stderr, leave=False)
        results = [run(servers, events) for _ in runs]
        produced = max(args.events / r[0] for r in results)
        acked = max(args.events / r[1] for r in results)
        dropped = sum(r[2] for r in results)
        best[name] = (produced, acked)
        print(
            f"{name:>5}: produced {produced:>10,.0f} events/s, "
            f"acknowledged {acked:>10,.0f} events/s (best of {args.runs}), dropped {dropped}"
        )
    ratio_p = best["kiln"][0] / best["bare"][0]
    ratio_a = best["kiln"][1] / best["bare"][1]
    print(f"kiln/bare: produce {ratio_p:.2f}x, acknowledged {ratio_a:.2f}x")
    del host


if __name__ == "__main__":
    main()
