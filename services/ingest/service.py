"""The ingest loop: raw topics in, validated features and dead letters out, at least once.

One process serves every pipeline in the registry (or those in ``LOOPLINE_PIPELINES``): it
subscribes to their raw topics, validates each message against its pipeline's spec, writes good
events to ``loopline.<p>.features`` and everything else to ``loopline.<p>.deadletter``. Each batch
is confirmed by Kafka before its offsets are stored and before the metrics count it, so
``events = accepted + rejected`` holds in the metrics and in the topics.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message
from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram

from loopline import avro
from loopline.errors import LooplineError
from loopline.kafka import AckedProducer, KafkaConfig, StopFlag, run_batches
from loopline.observability import Health
from loopline.registry import RegistryReader, now_ms
from loopline.spec import PipelineSpec
from loopline.topics import PipelineTopics, pipeline_of

from loopline.avro.writers import FeaturesEncoder, long_bytes
from loopline.services.ingest.ids import fast_uuid5
from loopline.services.ingest.settings import IngestSettings
from loopline.validation import Accepted, Rejection, Validator

log = logging.getLogger("loopline.ingest")

SERVICE = "ingest"
#: Namespace of derived event ids: uuid5(EVENT_NAMESPACE, "topic:partition:offset").
EVENT_NAMESPACE = uuid.UUID("6f1c52a4-1d0e-5b7e-9a57-2c4f0e8a1b01")
_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_DEADLETTER_OVERHEAD = 4096  # room for the record's other fields and the truncation note


def derived_event_id(topic: str, partition: int, offset: int) -> str:
    """The event id of a raw message that carries none: the same on every re-read."""
    return fast_uuid5(_NAMESPACE_BYTES, f"{topic}:{partition}:{offset}")


class IngestMetrics:
    """The service's Prometheus metrics, in the process's private registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = PromCounter("loopline_ingest_events_total", "Raw messages handled (accepted + rejected)",
                                  ["pipeline"], registry=registry)
        self.accepted = PromCounter("loopline_ingest_accepted_total", "Events written to the features topic",
                                    ["pipeline"], registry=registry)
        self.rejected = PromCounter("loopline_ingest_rejected_total", "Messages written to the dead-letter topic",
                                    ["pipeline", "rule"], registry=registry)
        self.dropped_fields = PromCounter(
            "loopline_ingest_dropped_fields_total", "Unknown fields dropped from accepted events "
            "(unknown_fields: drop)", ["pipeline"], registry=registry)
        self.truncated = PromCounter(
            "loopline_ingest_deadletter_truncated_total", "Dead letters whose original was too large to "
            "keep whole", ["pipeline"], registry=registry)
        self.batch_size = Histogram("loopline_ingest_batch_size", "Messages per handled batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
                                    registry=registry)
        self.batch_seconds = Histogram("loopline_ingest_batch_seconds", "Time to handle and confirm a batch",
                                       registry=registry)
        self.pipelines = Gauge("loopline_ingest_pipelines", "Pipelines this process serves", registry=registry)


@dataclass
class _Pipeline:
    """What the loop needs about one served pipeline."""

    spec: PipelineSpec
    topics: PipelineTopics
    validator: Validator
    encoder: FeaturesEncoder

    @classmethod
    def build(cls, spec: PipelineSpec) -> _Pipeline:
        return cls(spec, spec.topics, Validator(spec), FeaturesEncoder(spec.features_schema()))


@dataclass
class _Tally:
    """Counts of one pipeline in one batch, added to the metrics once the batch is confirmed."""

    accepted: int = 0
    dropped: int = 0
    truncated: int = 0

    def __post_init__(self) -> None:
        self.rejected: Counter[str] = Counter()


class IngestService:
    """Validates raw events of the served pipelines; call :meth:`run` until ``stop`` is set."""

    def __init__(self, kafka: KafkaConfig, settings: IngestSettings, registry: CollectorRegistry,
                 health: Health, stop: StopFlag, group_id: str,
                 producer: AckedProducer | None = None) -> None:
        self.kafka = kafka
        self.settings = settings
        self.health = health
        self.stop = stop
        self.group_id = group_id
        self.metrics = IngestMetrics(registry)
        self.wanted = set(settings.pipelines)
        # A 5 MB rejected message is dead-lettered whole: the producer must accept that size.
        self.producer = producer or AckedProducer(kafka.producer(
            "loopline-ingest", **{"message.max.bytes": settings.deadletter_max_bytes + _DEADLETTER_OVERHEAD}))
        self.deadletter = avro.codec("deadletter")
        self.pipelines: dict[str, _Pipeline] = {}  # by raw topic
        self._reader: RegistryReader | None = None
        self._consumer: Consumer | None = None
        self._subscribed: list[str] = []
        self._next_refresh = 0.0
        self._outs: list[tuple[str, bytes, str | bytes | None, list[tuple[str, bytes]] | None]] = []

    # --- registry and subscription -------------------------------------------------------

    def _served(self, name: str) -> bool:
        return not self.wanted or name in self.wanted

    def refresh(self, force: bool = False) -> None:
        """Pick up new or changed pipeline specs and re-subscribe if the raw topics changed."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return
        self._next_refresh = now + self.settings.registry_poll_s
        assert self._reader is not None
        self._reader.poll(0)
        for name, spec in self._reader.state.specs.items():
            if not self._served(name):
                continue
            current = self.pipelines.get(spec.topics.raw)
            if current is None or current.spec.sha256() != spec.sha256():
                self.pipelines[spec.topics.raw] = _Pipeline.build(spec)
                log.info("pipeline_loaded", extra={"pipeline": name, "spec_sha256": spec.sha256()[:12],
                                                   "raw_topic": spec.topics.raw,
                                                   "change": "new" if current is None else "updated"})
        topics = sorted(self.pipelines)
        if topics and topics != self._subscribed and self._consumer is not None:
            self.health.expect_assignment()
            self._consumer.subscribe(topics, on_assign=self.health.assigned)
            self._subscribed = topics
            self.metrics.pipelines.set(len(topics))
            log.info("subscribed", extra={"topics": topics, "group_id": self.group_id})
        missing = sorted(self.wanted - {p.spec.name for p in self.pipelines.values()})
        if self._subscribed:
            self.health.set_ready(True, f"serving {len(self._subscribed)} pipeline(s)"
                                  + (f"; waiting for {missing} in the registry" if missing else ""))
        else:
            self.health.set_ready(False, "no pipeline to serve yet: waiting for "
                                  + (f"{missing}" if missing else "a pipeline spec") + " in the registry")
        self.health.beat()

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``stop``; raises (offsets of the failed batch unstored) if Kafka fails."""
        self._reader = RegistryReader(self.kafka, client_id="loopline-ingest-registry")
        try:
            self._reader.catch_up()
            self._consumer = self.kafka.consumer("loopline-ingest", self.group_id)
            self.refresh(force=True)
            while not self._subscribed and not self.stop.is_set():
                self.stop.wait(min(self.settings.registry_poll_s, 0.5))
                self.refresh()
            if self.stop.is_set():
                self._consumer.close()
                return
            run_batches(self._consumer, self.producer, self.handle, self.stop,
                        batch_size=self.settings.batch_size, batch_timeout_s=self.settings.batch_timeout_s,
                        on_idle=self.refresh)
        finally:
            self.health.set_ready(False, "stopped")
            self._reader.close()

    def handle(self, batch: list[Message]) -> None:
        """Validate a batch, produce its results, wait for Kafka's acks, then count it."""
        started = time.perf_counter()
        at = now_ms()
        at_bytes = long_bytes(at)
        tallies: dict[str, _Tally] = {}
        # Outputs are produced after the whole batch is validated, in one tight loop: producing
        # while validating wakes librdkafka's threads per message (measured: ~1.5x the process CPU).
        outs: list[tuple[str, bytes, str | bytes | None, list[tuple[str, bytes]] | None]] = []
        self._outs = outs
        emit = outs.append
        last_topic, p, tally = None, None, None
        for m in batch:
            topic = m.topic()
            if topic != last_topic:  # batches are mostly runs of one topic: look things up per run
                p = self.pipelines.get(topic)
                if p is None:
                    self._unknown_topic(m, at, tallies)
                    last_topic = None
                    continue
                last_topic, tally = topic, tallies.get(p.spec.name)
                if tally is None:
                    tally = tallies[p.spec.name] = _Tally()
                fast, validate, encode = p.validator.fast, p.validator.validate, p.encoder.encode
                out_topic, topic_bytes, spec_key = p.topics.features, p.encoder.source_prefix(topic), p.spec.key
            value = m.value()
            doc = fast(value)
            if doc is not None:  # plainly valid JSON: no verdict object needed
                features, event_id, key, ts, dropped = doc["features"], doc.get("event_id"), doc.get("key"), \
                    doc.get("ts"), 0
            else:
                try:
                    verdict = validate(value)
                except Exception as e:  # noqa: BLE001 - a validator bug must not become a crash loop
                    log.exception("validation_failed", extra={"topic": topic, "partition": m.partition(),
                                                              "offset": m.offset()})
                    verdict = Rejection(None, "internal", f"ingest could not validate this message "
                                        f"({type(e).__name__}: {e}); please report it")
                if type(verdict) is not Accepted:
                    self._dead(m, p.spec.name, verdict, at, tallies)  # type: ignore[arg-type, union-attr]
                    continue
                features, event_id, key, ts, dropped = verdict.features, verdict.event_id, verdict.key, \
                    verdict.ts, verdict.dropped  # type: ignore[union-attr]
            partition, offset = m.partition(), m.offset()
            if event_id is None:
                event_id = derived_event_id(topic, partition, offset)
            if key is None:
                key_value = features.get(spec_key) if spec_key is not None else None
                if key_value is not None:
                    key = str(key_value)
                else:
                    raw_key = m.key()
                    key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
            if ts is None:
                kind, kafka_ts = m.timestamp()
                ts = kafka_ts if kind != TIMESTAMP_NOT_AVAILABLE and kafka_ts >= 0 else at
            try:
                out = encode(event_id, key, ts, at_bytes, topic_bytes, partition, offset, features)
            except (TypeError, ValueError, OverflowError, AttributeError, struct.error) as e:
                # Validation makes this unreachable; if it ever is, the event is dead-lettered, not lost.
                self._dead(m, p.spec.name, Rejection(  # type: ignore[union-attr]
                    None, "schema", f"valid event could not be encoded: {type(e).__name__}: {e}"), at, tallies)
                continue
            emit((out_topic, out, key or event_id, None))
            tally.accepted += 1  # type: ignore[union-attr]
            if dropped:
                tally.dropped += dropped  # type: ignore[union-attr]
        send = self.producer.send
        for topic, value, key, headers in outs:
            send(topic, value, key=key, headers=headers)
        self.producer.confirm()
        self._count(tallies, len(batch), time.perf_counter() - started)
        self.refresh()

    def _unknown_topic(self, m: Message, at: int, tallies: dict[str, _Tally]) -> None:
        """A message from a raw topic whose spec is not (yet) loaded: dead-letter it, never drop it."""
        pipeline = pipeline_of(m.topic())
        if pipeline is None:  # only raw topics are subscribed; anything else is a bug worth stopping for
            raise LooplineError(f"ingest received a message from {m.topic()}, which is no pipeline's "
                                f"raw topic (partition {m.partition()}, offset {m.offset()})")
        self._dead(m, pipeline, Rejection(None, "schema", f"no pipeline spec is registered for "
                                          f"{m.topic()}"), at, tallies)

    def _dead(self, m: Message, pipeline: str, why: Rejection, at: int, tallies: dict[str, _Tally]) -> None:
        """Produce the dead letter of one rejected message (truncated only if it cannot fit)."""
        tally = tallies.get(pipeline)
        if tally is None:
            tally = tallies[pipeline] = _Tally()
        original = m.value()
        original = b"" if original is None else original  # a tombstone has no bytes to keep
        kind, kafka_ts = m.timestamp()
        record: dict[str, Any] = {
            "original": original, "original_key": m.key(),
            "source": {"topic": m.topic(), "partition": m.partition(), "offset": m.offset()},
            "source_timestamp": kafka_ts if kind != TIMESTAMP_NOT_AVAILABLE and kafka_ts >= 0 else None,
            "field": why.field, "rule": why.rule, "message": why.message, "service": SERVICE, "at": at,
        }
        limit = self.settings.deadletter_max_bytes
        if len(original) + _DEADLETTER_OVERHEAD + len(why.message.encode()) > limit:
            keep = max(0, limit - _DEADLETTER_OVERHEAD - len(why.message.encode()))
            record["original"] = original[:keep]
            record["message"] = (f"{why.message} [original truncated to its first {keep} of {len(original)} "
                                 f"bytes to fit deadletter_max_bytes={limit}; sha256 of the full original: "
                                 f"{hashlib.sha256(original).hexdigest()}]")
            tally.truncated += 1
        tally.rejected[why.rule] += 1
        # The reason also travels as headers, so plain Kafka tools (kcat -f '%h') can show it.
        headers = [("loopline.rule", why.rule.encode()), ("loopline.field", (why.field or "").encode()),
                   ("loopline.reason", record["message"].encode())]
        self._outs.append((PipelineTopics(pipeline).deadletter, self.deadletter.encode(record), m.key(), headers))
        log.debug("rejected", extra={"pipeline": pipeline, "topic": m.topic(), "partition": m.partition(),
                                     "offset": m.offset(), "field": why.field, "rule": why.rule})

    def _count(self, tallies: dict[str, _Tally], size: int, seconds: float) -> None:
        """Add a confirmed batch to the metrics (per pipeline and rule)."""
        m = self.metrics
        for pipeline, t in tallies.items():
            rejected = sum(t.rejected.values())
            m.events.labels(pipeline).inc(t.accepted + rejected)
            m.accepted.labels(pipeline).inc(t.accepted)
            for rule, n in t.rejected.items():
                m.rejected.labels(pipeline, rule).inc(n)
            if t.dropped:
                m.dropped_fields.labels(pipeline).inc(t.dropped)
            if t.truncated:
                m.truncated.labels(pipeline).inc(t.truncated)
            if rejected:
                log.info("batch_rejections", extra={"pipeline": pipeline, "rejected": dict(t.rejected)})
        m.batch_size.observe(size)
        m.batch_seconds.observe(seconds)
        self.health.beat()
