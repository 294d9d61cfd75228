"""Prediction events from the server: settings from the environment, a producer started off-path.

The serving stack sets `KILN_EVENTS_CLUSTER_ARN` (MSK's bootstrap brokers are not a
CloudFormation attribute, so the server asks `kafka:GetBootstrapBrokers` for the IAM listener),
`KILN_EVENTS_TOPIC`, `KILN_EVENTS_REGION` and `KILN_ALLOW_RAW_TEXT`; `KILN_EVENTS_BOOTSTRAP`
names brokers directly instead (and, with `KILN_EVENTS_AUTH=plaintext`, a loopback test cluster).
No topic means no events. The producer is made on a background thread, retried until it
starts, so neither a slow broker lookup nor missing credentials delay or fail serving; events
of requests served before it starts are counted as dropped.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from kiln.contract import EVENT_FLUSH_SECONDS, ServerEnv
from kiln_events.events import MAX_ID_CHARS, PredictionEvent
from kiln_events.producer import EventProducer, ProducerConfig

log = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class EventConfigError(ValueError):
    """The environment's event settings are inconsistent; the message names the variable."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise EventConfigError(f"{name}={env[name]!r}: use true or false")


@dataclass(frozen=True)
class EventSettings:
    """Where events go and what they may carry, as the environment variables give them."""

    topic: str | None = None
    bootstrap_servers: str | None = None
    cluster_arn: str | None = None
    region: str | None = None
    auth: Literal["iam", "plaintext"] = "iam"
    allow_raw_text: bool = False
    endpoint_name: str = "local"
    model_version: str = "unversioned"

    @property
    def enabled(self) -> bool:
        return self.topic is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, default_model_version: str) -> EventSettings:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        auth = get(ServerEnv.EVENTS_AUTH) or "iam"
        if auth not in ("iam", "plaintext"):
            raise EventConfigError(f"KILN_EVENTS_AUTH={auth!r}: use iam or plaintext")
        settings = cls(
            topic=get(ServerEnv.EVENTS_TOPIC),
            bootstrap_servers=get(ServerEnv.EVENTS_BOOTSTRAP),
            cluster_arn=get(ServerEnv.EVENTS_CLUSTER_ARN),
            region=get(ServerEnv.EVENTS_REGION) or get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
            auth=auth,  # type: ignore[arg-type]
            allow_raw_text=_flag(env, ServerEnv.ALLOW_RAW_TEXT),
            endpoint_name=(get(ServerEnv.ENDPOINT_NAME) or "local")[:MAX_ID_CHARS],
            model_version=(get(ServerEnv.MODEL_VERSION) or default_model_version)[:MAX_ID_CHARS],
        )
        if settings.topic is None:
            if settings.bootstrap_servers or settings.cluster_arn:
                raise EventConfigError(
                    "KILN_EVENTS_BOOTSTRAP or KILN_EVENTS_CLUSTER_ARN is set without "
                    "KILN_EVENTS_TOPIC: name the topic, or unset both to turn events off"
                )
            return settings
        if not (settings.bootstrap_servers or settings.cluster_arn):
            raise EventConfigError(
                "KILN_EVENTS_TOPIC is set, but neither KILN_EVENTS_CLUSTER_ARN (MSK) nor "
                "KILN_EVENTS_BOOTSTRAP (host:port,...) says where to send events"
            )
        if settings.auth == "iam" and settings.region is None:
            raise EventConfigError(
                "events use MSK IAM auth, which needs KILN_EVENTS_REGION (or AWS_REGION)"
            )
        if settings.bootstrap_servers:
            # Validates the broker list and auth now, so a bad value fails the start, not later.
            settings.producer_config(settings.bootstrap_servers)
        return settings

    def producer_config(self, bootstrap_servers: str) -> ProducerConfig:
        try:
            return ProducerConfig(
                bootstrap_servers=bootstrap_servers,
                topic=self.topic,
                auth=self.auth,
                region=self.region if self.auth == "iam" else None,
                client_id=f"kiln-inference-{self.endpoint_name}"[:255],
            )
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()
            )
            raise EventConfigError(f"event producer settings: {problems}") from err


def msk_bootstrap_servers(cluster_arn: str, region: str | None) -> str:
    """The IAM-auth bootstrap brokers of an MSK cluster (kafka:GetBootstrapBrokers)."""
    import boto3

    client = boto3.client("kafka", region_name=region or cluster_arn.split(":")[3])
    response = client.get_bootstrap_brokers(ClusterArn=cluster_arn)
    brokers = response.get("BootstrapBrokerStringSaslIam") or response.get(
        "BootstrapBrokerStringPublicSaslIam"
    )
    if not brokers:
        raise RuntimeError(f"MSK cluster {cluster_arn} has no IAM-auth listener")
    return str(brokers)


ProducerFactory = Callable[[ProducerConfig], Any]


class EventPublisher:
    """Builds one PredictionEvent per served request and hands it to the producer, never blocking.

    `start()` makes the producer on a thread (resolving MSK's brokers first when only the
    cluster ARN is known), retrying every `retry_s` until it succeeds or `close()` is called.
    """

    def __init__(
        self,
        settings: EventSettings,
        *,
        producer_factory: ProducerFactory = EventProducer,
        resolve: Callable[[str, str | None], str] = msk_bootstrap_servers,
        retry_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self._factory, self._resolve, self._retry_s = producer_factory, resolve, retry_s
        self._producer: Any = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.dropped_before_start = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.settings.enabled:
            log.info("prediction events are off (no KILN_EVENTS_TOPIC)")
            return
        self._thread = threading.Thread(target=self._connect, name="kiln-events-start", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        while not self._closed.is_set():
            try:
                servers = self.settings.bootstrap_servers or self._resolve(
                    self.settings.cluster_arn or "", self.settings.region
                )
                producer = self._factory(self.settings.producer_config(servers))
            except Exception as err:
                log.warning(
                    "prediction events: producer not started (%s); retrying in %.0f s",
                    err,
                    self._retry_s,
                )
                self._closed.wait(self._retry_s)
                continue
            with self._lock:
                if self._closed.is_set():
                    producer.close(timeout=0)
                    return
                self._producer = producer
            log.info(
                "prediction events: publishing to topic %s (%s auth)",
                self.settings.topic,
                self.settings.auth,
            )
            return

    @property
    def producer(self) -> Any:
        return self._producer

    def publish(
        self,
        *,
        request_id: str,
        received_at: datetime,
        completed_at: datetime,
        latency_ms: float,
        prompt_tokens: int,
        completion_tokens: int,
        status_code: int,
        error_code: str | None = None,
        prompt_text: str | None = None,
        completion_text: str | None = None,
    ) -> bool:
        """Queues one event; False when events are off, not started yet, or the queue is full."""
        if not self.settings.enabled:
            return False
        producer = self._producer
        if producer is None:
            with self._lock:
                self.dropped_before_start += 1
            return False
        try:
            event = PredictionEvent(
                request_id=request_id[:MAX_ID_CHARS] or str(uuid.uuid4()),
                model_version=self.settings.model_version,
                endpoint_name=self.settings.endpoint_name,
                latency_ms=max(0.0, latency_ms),
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                request_received_at=received_at,
                response_completed_at=completed_at,
                status_code=status_code,
                error_code=error_code,
            )
            if self.settings.allow_raw_text and (prompt_text or completion_text):
                event = event.with_raw_text(
                    prompt_text=prompt_text, completion_text=completion_text, allowed=True
                )
        except ValidationError:
            log.exception("prediction event could not be built; dropped")
            return False
        return bool(producer.publish(event))

    def close(self, timeout: float = EVENT_FLUSH_SECONDS) -> None:
        """Stops retrying and flushes the producer for up to `timeout` seconds."""
        with self._lock:
            self._closed.set()
            producer, self._producer = self._producer, None
        if producer is not None:
            stats = producer.close(timeout=timeout)
            log.info("prediction events: producer closed: %s", stats)
