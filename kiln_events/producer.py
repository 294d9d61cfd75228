"""A producer of prediction events to MSK (IAM auth) that never blocks or fails its caller.

Design: one bounded buffer, librdkafka's own queue (`queue.buffering.max.messages` and
`.kbytes`). `publish()` serializes the event and calls the non-blocking `produce()`: when the
queue is full librdkafka answers at once (BufferError) and the event is dropped and counted.
A daemon thread calls `poll()` to serve delivery reports (the delivered/failed counters), errors
and logs. A Python queue in front would add a second bound, a copy per event, and a thread that
must itself wait when librdkafka's queue fills; librdkafka already batches, retries and, with
idempotence, keeps order and writes each message once.

confluent-kafka and the MSK signer are imported when a producer is made, never on import of
this module: the infrastructure path imports `kiln` and must stay light.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kiln_events.events import PredictionEvent

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message

log = logging.getLogger(__name__)

REGION_PATTERN = r"^[a-z]{2}(-gov)?-[a-z]+-\d$"
# Kafka's own rule for topic names.
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"

# librdkafka keys that carry this producer's guarantees (IAM over TLS, idempotence, acks=all,
# the bounded queue, our callbacks): `overrides` may tune anything else, never these.
_PROTECTED_KEYS = frozenset(
    {
        "bootstrap.servers",
        "metadata.broker.list",
        "security.protocol",
        "enable.idempotence",
        "acks",
        "request.required.acks",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "message.timeout.ms",
        "delivery.timeout.ms",
        "enable.ssl.certificate.verification",
        "ssl.endpoint.identification.algorithm",
        "oauth_cb",
        "on_delivery",
        "error_cb",
        "logger",
    }
)
_PROTECTED_PREFIXES = ("sasl.", "test.")

_LOOPBACK_NAMES = frozenset({"localhost"})
# Repeated warnings (a full queue, a broker down) are logged at most this often per kind.
_WARN_INTERVAL_S = 30.0

OverrideValue = str | int | float | bool


class ProducerStartError(RuntimeError):
    """The producer could not start: no MSK IAM token could be signed, or librdkafka refused."""


class ProducerConfig(BaseModel):
    """Where and how to publish events; IAM auth over TLS unless plaintext is asked for by name.

    `auth="plaintext"` is for tests against a local cluster (librdkafka's mock brokers) and is
    refused for any address that is not loopback, so it can never reach MSK by mistake.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = Field(min_length=1)
    topic: str = Field(pattern=TOPIC_PATTERN)
    auth: Literal["iam", "plaintext"] = "iam"
    region: str | None = Field(None, pattern=REGION_PATTERN)
    client_id: str = Field("kiln-events", min_length=1, max_length=255)
    # The bound of the in-memory queue; past it publish() drops and counts.
    max_queued_events: int = Field(100_000, ge=1, le=10_000_000)
    max_queued_kbytes: int = Field(65_536, ge=1, le=2_097_151)
    # Batching delay: events are analytics, a few ms more latency buys larger batches.
    linger_ms: float = Field(20.0, ge=0, le=900_000)
    # How long librdkafka retries one event (through broker outages) before it counts as failed.
    delivery_timeout_ms: int = Field(120_000, ge=1_000, le=2_147_483_647)
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    # "probe" finds the system's CA bundle; the wheel's bundled OpenSSL does not know where it is.
    ssl_ca_location: str = "probe"
    overrides: dict[str, OverrideValue] = Field(default_factory=dict)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise PydanticCustomError(
                    "bootstrap_servers",
                    "{server!r} is not host:port; give a comma-separated list like "
                    "b-1.example.kafka.us-east-1.amazonaws.com:9098,b-2...:9098",
                    {"server": server},
                )
        return value

    @field_validator("overrides")
    @classmethod
    def _not_protected(cls, value: dict[str, OverrideValue]) -> dict[str, OverrideValue]:
        protected = sorted(
            key for key in value if key in _PROTECTED_KEYS or key.startswith(_PROTECTED_PREFIXES)
        )
        if protected:
            raise PydanticCustomError(
                "protected_override",
                "overrides may not set {keys}: they carry the producer's guarantees (IAM over "
                "TLS, idempotence, acks=all, the bounded queue); use the named fields instead",
                {"keys": ", ".join(protected)},
            )
        return value

    @model_validator(mode="after")
    def _auth(self) -> ProducerConfig:
        if self.auth == "iam" and self.region is None:
            raise PydanticCustomError(
                "region_required",
                "auth='iam' needs the MSK cluster's region (e.g. region='us-east-1'): "
                "the IAM token is signed for it",
            )
        if self.auth == "plaintext":
            remote = [s for s in self.bootstrap_servers.split(",") if not _is_loopback(s)]
            if remote:
                raise PydanticCustomError(
                    "plaintext_not_loopback",
                    "auth='plaintext' is only for local test clusters, and {servers} is not a "
                    "loopback address; MSK needs auth='iam' with a region",
                    {"servers": ", ".join(remote)},
                )
        return self

    def librdkafka_config(self) -> dict[str, Any]:
        """The librdkafka settings, without callbacks (the producer adds those)."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "enable.idempotence": True,
            "acks": "all",
            "queue.buffering.max.messages": self.max_queued_events,
            "queue.buffering.max.kbytes": self.max_queued_kbytes,
            "linger.ms": self.linger_ms,
            "message.timeout.ms": self.delivery_timeout_ms,
            "compression.type": self.compression,
        }
        if self.auth == "iam":
            conf.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "OAUTHBEARER",
                    "ssl.ca.location": self.ssl_ca_location,
                }
            )
        else:
            conf["security.protocol"] = "PLAINTEXT"
        conf.update(self.overrides)
        return conf


def _is_loopback(server: str) -> bool:
    host = server.strip().rpartition(":")[0].strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ProducerStats:
    """Counters since start: `published` = `delivered` + `failed` + `pending`, always."""

    published: int  # accepted into the queue
    delivered: int  # acknowledged by all in-sync replicas
    failed: int  # accepted, then not delivered (timed out, rejected, purged at close)
    dropped: int  # never accepted: queue full, producer closed, or not serializable
    pending: int  # accepted, not yet delivered or failed


class MskIamToken:
    """The OAUTHBEARER token callback: signs a token for the region with the MSK IAM signer.

    The first token is signed when this is made, so missing credentials fail the producer's
    start at once with the signer's own message (librdkafka would otherwise wait 10 s and say
    only that no token was set).
    """

    # A cached first token is handed out only while it has this long left.
    _MIN_REMAINING_S = 60.0

    def __init__(self, region: str) -> None:
        self.region = region
        try:
            self._first: tuple[str, float] | None = self._sign()
        except Exception as err:
            raise ProducerStartError(
                f"could not sign an MSK IAM token for region {region!r}: {err}. The process "
                "needs AWS credentials (an instance or task role, or AWS_* variables) allowed "
                "kafka-cluster:Connect and kafka-cluster:WriteData on the topic"
            ) from err

    def __call__(self, oauthbearer_config: str | None) -> tuple[str, float]:
        """librdkafka calls this for each token refresh; it wants (token, expiry in epoch s)."""
        first, self._first = self._first, None
        if first is not None and first[1] - time.time() > self._MIN_REMAINING_S:
            return first
        try:
            return self._sign()
        except Exception:
            # librdkafka reports the failure through error_cb and retries; log why here.
            log.warning("MSK IAM token refresh failed for region %s", self.region, exc_info=True)
            raise

    def _sign(self) -> tuple[str, float]:
        from aws_msk_iam_sasl_signer import (  # type: ignore[import-untyped]
            MSKAuthTokenProvider,
        )

        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(self.region)
        return str(token), float(expiry_ms) / 1000.0


class EventProducer:
    """Publishes prediction events; `publish()` never blocks and never raises.

    Use as a context manager, or call `close()` on shutdown: it waits up to its timeout for
    queued events and counts the rest as failed.
    """

    def __init__(self, config: ProducerConfig) -> None:
        from confluent_kafka import KafkaException, Producer

        self.config = config
        # Guards the counters and `_closed`; held only for non-blocking calls.
        self._lock = threading.Lock()
        self._published = self._delivered = self._failed = self._dropped = 0
        self._closed = False
        self._last_warning: dict[str, float] = {}
        self.token: MskIamToken | None = None

        conf = config.librdkafka_config()
        # librdkafka's own log lines (a refused connection at ERROR on every retry) get a logger
        # of their own, so operators can quiet them without losing ours.
        conf.update(
            on_delivery=self._on_delivery,
            error_cb=self._on_error,
            logger=logging.getLogger(f"{__name__}.librdkafka"),
        )
        if config.auth == "iam":
            assert config.region is not None  # the config's validator guarantees it
            self.token = MskIamToken(config.region)
            conf["oauth_cb"] = self.token
        try:
            self._producer = Producer(conf)
        except (KafkaException, ValueError, TypeError) as err:
            raise ProducerStartError(f"librdkafka refused the producer's config: {err}") from err

        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="kiln-events", daemon=True)
        self._poller.start()

    def publish(self, event: PredictionEvent) -> bool:
        """Queues one event; False when it was dropped (queue full, closed, unserializable)."""
        try:
            value, key = event.to_json(), event.kafka_key()
        except Exception:
            return self._drop("unserializable", "an event could not be serialized")
        with self._lock:
            if self._closed:
                self._dropped += 1
                return False
            try:
                self._producer.produce(self.config.topic, value=value, key=key)
            except BufferError:
                self._dropped += 1
                refused = None
            except Exception as err:
                # Too large, or a fatal idempotence error: the caller still must not fail.
                self._dropped += 1
                refused = err
            else:
                self._published += 1
                return True
        if refused is None:
            self._warn(
                "full", "event queue full (%d events): dropping", self.config.max_queued_events
            )
        else:
            self._warn("produce", "an event was refused by librdkafka: dropping", exc_info=refused)
        return False

    def stats(self) -> ProducerStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            published, delivered, failed = self._published, self._delivered, self._failed
            dropped = self._dropped
        return ProducerStats(
            published=published,
            delivered=delivered,
            failed=failed,
            dropped=dropped,
            pending=published - delivered - failed,
        )

    def close(self, timeout: float = 10.0) -> ProducerStats:
        """Stops accepting events, waits up to `timeout` s for queued ones, fails the rest."""
        with self._lock:
            already_closed, self._closed = self._closed, True
        if already_closed:
            return self.stats()
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._poller.join()
        remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if remaining:
            log.warning("closing with %d events unacknowledged: counted as failed", remaining)
            # Purged events get delivery reports with an error, so the counters stay whole.
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(1.0)
        self._producer.close()
        return self.stats()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:
                # A failing callback must not end delivery reporting for the process' lifetime.
                log.exception("serving producer callbacks failed")

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is None:
                self._delivered += 1
            else:
                self._failed += 1
        if err is not None:
            self._warn("delivery", "event not delivered: %s", err.str())

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("producer fatal error, events will be dropped: %s", err.str())
        else:
            # Client-level errors (brokers down, auth) that librdkafka retries by itself.
            self._warn(f"error-{err.code()}", "producer error (retrying): %s", err.str())

    def _drop(self, kind: str, message: str) -> bool:
        with self._lock:
            self._dropped += 1
        self._warn(kind, message, exc_info=True)
        return False

    def _warn(
        self, kind: str, message: str, *args: object, exc_info: BaseException | bool = False
    ) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(kind, -_WARN_INTERVAL_S) >= _WARN_INTERVAL_S:
            self._last_warning[kind] = now
            log.warning(message, *args, exc_info=exc_info)
