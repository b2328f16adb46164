"""Kafka clients on confluent-kafka: settings per broker profile, topic creation, acked producer.

Services do not consume and produce by hand: they run on :mod:`loopline.runtime`, which builds
its clients here (:meth:`KafkaConfig.delivery` and :meth:`KafkaConfig.consumer`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from loopline.broker import BrokerAddress, resolve_broker
from loopline.errors import DeliveryError, LooplineError
from loopline.settings import LooplineSettings

log = logging.getLogger(__name__)
#: The logger librdkafka's own lines go to (see loopline.observability for its rate limit).
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")

# Tansu does not answer a waiting fetch early and lists every stored batch of a partition on
# each fetch: a short fetch wait keeps latency low, large producer batches keep fetches cheap.
# Both are valid (if chattier) on Apache Kafka, where the 'kafka' profile keeps its defaults.
_EMBEDDED_CONSUMER = {"fetch.wait.max.ms": 10, "fetch.min.bytes": 1}
_EMBEDDED_PRODUCER = {"linger.ms": 5, "batch.size": 1_000_000, "batch.num.messages": 10_000}
_KAFKA_CONSUMER = {"fetch.wait.max.ms": 100}
_KAFKA_PRODUCER = {"linger.ms": 5, "batch.size": 1_000_000}


@dataclass(frozen=True)
class KafkaConfig:
    """Everything needed to build clients: broker address and settings."""

    settings: LooplineSettings
    broker: BrokerAddress
    on_error: Callable[[KafkaError], None] | None = field(default=None, compare=False)

    @classmethod
    def from_settings(cls, settings: LooplineSettings) -> KafkaConfig:
        """Resolve the broker (env or embedded state file) for these settings."""
        return cls(settings, resolve_broker(settings))

    @property
    def embedded(self) -> bool:
        """Whether clients are tuned for the embedded broker."""
        return self.broker.embedded

    @property
    def exactly_once(self) -> bool:
        """Whether services use transactions (LOOPLINE_DELIVERY, 'auto': on Kafka, not on Tansu)."""
        mode = self.settings.delivery
        return mode == "exactly-once" or (mode == "auto" and not self.embedded)

    def with_error_callback(self, on_error: Callable[[KafkaError], None]) -> KafkaConfig:
        """A copy whose clients report librdkafka errors (e.g. all brokers down) to ``on_error``."""
        return KafkaConfig(self.settings, self.broker, on_error)

    def common(self, client_id: str) -> dict[str, Any]:
        """Settings shared by producers, consumers and admin clients."""
        s = self.settings
        conf: dict[str, Any] = {
            "bootstrap.servers": self.broker.bootstrap_servers,
            "client.id": client_id,
            "security.protocol": s.security_protocol,
            # librdkafka's own log lines go through Python logging (rate-limited there), not stderr.
            "logger": LIBRDKAFKA_LOG,
        }
        if self.on_error is not None:
            conf["error_cb"] = self.on_error
        if s.sasl_mechanism:
            conf["sasl.mechanism"] = s.sasl_mechanism
        if s.sasl_username:
            conf["sasl.username"] = s.sasl_username
        if s.sasl_password is not None:
            conf["sasl.password"] = s.sasl_password.get_secret_value()
        if s.ssl_ca_location:
            conf["ssl.ca.location"] = s.ssl_ca_location
        return conf

    def producer(self, client_id: str, **overrides: Any) -> Producer:
        """An idempotent producer waiting for all in-sync replicas."""
        conf = self.common(client_id)
        conf.update({"acks": "all", "enable.idempotence": True, "compression.type": "lz4"})
        conf.update(_EMBEDDED_PRODUCER if self.embedded else _KAFKA_PRODUCER)
        conf.update(overrides)
        return Producer(conf)

    def transactional_producer(self, transactional_id: str, **overrides: Any) -> Producer:
        """A producer for one service replica's transactions."""
        # The coordinator answers CONCURRENT_TRANSACTIONS to the next transaction's first
        # AddPartitionsToTxn until the last one's markers are written; librdkafka retries after
        # retry.backoff.ms (100 by default, so every transaction took >= 100 ms when batches ran
        # back to back). Retries still back off exponentially, up to retry.backoff.max.ms.
        return self.producer(transactional_id, **{"transactional.id": transactional_id,
                                                  "transaction.timeout.ms": 60_000,
                                                  "retry.backoff.ms": 5, **overrides})

    def consumer(self, client_id: str, group_id: str, **overrides: Any) -> Consumer:
        """A group consumer whose offsets are committed by the runtime, never before its outputs.

        On exactly-once they travel inside each transaction; on at-least-once they are stored
        once the outputs are acknowledged and auto-committed from there.
        """
        conf = self.common(client_id)
        conf.update({
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": not self.exactly_once,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.commit.interval.ms": 1000,
            "session.timeout.ms": self.settings.session_timeout_ms,
            "heartbeat.interval.ms": max(100, self.settings.session_timeout_ms // 10),
            "partition.assignment.strategy": "cooperative-sticky",
        })
        conf.update(_EMBEDDED_CONSUMER if self.embedded else _KAFKA_CONSUMER)
        conf.update(overrides)
        return Consumer(conf)

    def reader(self, client_id: str, **overrides: Any) -> Consumer:
        """A consumer outside any group, for assign()-based reads (registry, tools)."""
        conf = self.common(client_id)
        conf.update({"group.id": f"{client_id}-reader", "enable.auto.commit": False,
                     "enable.auto.offset.store": False, "auto.offset.reset": "earliest"})
        conf.update(_EMBEDDED_CONSUMER if self.embedded else _KAFKA_CONSUMER)
        conf.update(overrides)
        return Consumer(conf)

    def admin(self, client_id: str = "loopline-admin") -> AdminClient:
        """An admin client."""
        return AdminClient(self.common(client_id))


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partitions and topic-level configuration."""

    name: str
    partitions: int = 1
    config: dict[str, str] = field(default_factory=dict)


def ensure_topics(admin: AdminClient, topics: Sequence[TopicSpec], replication_factor: int = 1,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet and
    wait until all are visible; return the new ones."""
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [t for t in topics if t.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(t.name, t.partitions, replication_factor, config=dict(t.config))
             for t in missing],
            operation_timeout=timeout_s, request_timeout=timeout_s,
        )
        for name, future in futures.items():
            try:
                future.result()
                created.append(name)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise LooplineError(f"could not create topic {name}: {e.args[0].str()}") from e
    deadline = time.monotonic() + timeout_s
    wanted = {t.name for t in topics}
    while True:
        metadata = admin.list_topics(timeout=timeout_s).topics
        ready = {n for n in wanted if n in metadata and metadata[n].partitions
                 and metadata[n].error is None}
        if ready == wanted:
            return created
        if time.monotonic() > deadline:
            raise LooplineError(f"topics not visible after {timeout_s:.0f}s: "
                                f"{sorted(wanted - ready)}")
        time.sleep(0.1)


class AckedProducer:
    """A producer that knows whether everything it sent was acknowledged.

    ``send`` never blocks for long (it polls while librdkafka's queue is full);
    ``confirm`` flushes and raises :class:`DeliveryError` if any send failed since the last call.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self._failures: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failures.append(f"{msg.topic()}: {err.str()}")
        else:
            self.delivered += 1

    def send(self, topic: str, value: bytes | None, key: bytes | str | None = None,
             headers: list[tuple[str, bytes]] | None = None, partition: int | None = None) -> None:
        """Queue one message for delivery."""
        kwargs: dict[str, Any] = {"key": key, "headers": headers, "on_delivery": self._on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self.producer.produce(topic, value, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)

    def confirm(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued message is acknowledged; raise if any was not."""
        remaining = self.producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if remaining:
            raise DeliveryError(f"{remaining} message(s) not acknowledged within {timeout_s:.0f}s")
        if failures:
            raise DeliveryError(f"{len(failures)} message(s) failed delivery, first: {failures[0]}")


_MOMENTARY = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT, KafkaError._TRANSPORT)


def watermarks(consumer: Consumer, topic: str, partition: int,
               timeout_s: float = 10.0) -> tuple[int, int]:
    """(low, high) offsets of a partition; a retriable answer (a broker that just started, or a
    partition whose leader moves: "not leader") is asked again until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=max(0.5, deadline - time.monotonic()))
            return int(low), int(high)
        except KafkaException as e:
            err = e.args[0]
            # librdkafka does not flag these retriable here, yet each is a moment: a topic just
            # created, or a partition whose leader is being elected.
            if not (err.retriable() or err.code() in _MOMENTARY) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_to(consumer: Consumer, topic: str, partition: int, last_read: int, high: int) -> bool:
    """True when an assigned partition is read up to ``high``, its end when reading began.

    Either the last offset read is ``high - 1`` (Tansu's high watermark is its last batch's
    base offset + 1, so that is as far as it says), or the consumer's position has passed
    ``high``: on Kafka a transaction's commit marker takes the last offset and is never
    delivered, so the last record read stays one short of it.
    """
    if last_read + 1 >= high:
        return True
    (tp,) = consumer.position([TopicPartition(topic, partition)])
    position: int = tp.offset
    return position >= high


def release_producer(producer: Producer) -> None:
    """Drop whatever a producer still has queued and close it now (confirm what matters first).

    A producer left to the garbage collector keeps reconnecting, and logging refused
    connections, after its broker is gone; a cycle through a callback may keep it forever.
    """
    producer.purge()
    close = getattr(producer, "close", None)  # confluent-kafka >= 2.12; older ones close on GC
    if close is not None:
        close()


class StopFlag:
    """A stop request shared by signal handlers and the loop (a thin threading.Event)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self, *_: object) -> None:
        """Ask the loop to stop; usable directly as a signal handler."""
        self._event.set()

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` unless a stop is requested first."""
        return self._event.wait(timeout_s)
