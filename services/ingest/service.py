"""The ingest service: raw topics in, validated features and dead letters out.

One process serves every pipeline in the registry (or those in ``LOOPLINE_PIPELINES``): it
subscribes to their raw topics, validates each message against its pipeline's spec, writes good
events to ``loopline.<p>.features`` and everything else to ``loopline.<p>.deadletter``. It runs on
the runtime's loop (:mod:`loopline.runtime.loop`): exactly once on Kafka, at least once elsewhere,
and the metrics count a batch only once it is committed, so ``events = accepted + rejected +
duplicates`` holds in the metrics and in the topics.

``event_id`` is the producer's idempotency key (:mod:`.idempotency`): an id seen recently with the
same content is a counted duplicate and not forwarded; with other content it is dead-lettered as a
conflict, naming where the first copy is.
"""

from __future__ import annotations

import logging
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from hashlib import sha1 as _sha1
from itertools import groupby
from operator import methodcaller
from typing import Any

from confluent_kafka import Consumer, Message
from msgspec import MsgspecError
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from loopline.avro.writers import FeaturesEncoder, long_bytes
from loopline.errors import LooplineError
from loopline.registry import RegistryReader, now_ms
from loopline.runtime.delivery import Delivery
from loopline.runtime.outputs import DEADLETTER_OVERHEAD, Out, Outputs, kafka_timestamp
from loopline.runtime.service import ServiceRuntime
from loopline.services.ingest.idempotency import EventIndex, Seen, rebuild
from loopline.services.ingest.ids import DerivedIds, fast_uuid5, uuid5_many, uuid5_of
from loopline.services.ingest.settings import IngestSettings
from loopline.spec import PipelineSpec
from loopline.topics import PipelineTopics, pipeline_of
from loopline.validation import Accepted, Rejection, Validator

log = logging.getLogger("loopline.ingest")

SERVICE = "ingest"
#: Namespace of derived event ids: uuid5(EVENT_NAMESPACE, "topic:partition:offset").
EVENT_NAMESPACE = uuid.UUID("6f1c52a4-1d0e-5b7e-9a57-2c4f0e8a1b01")
_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_topic_of = methodcaller("topic")


def derived_event_id(topic: str, partition: int, offset: int) -> str:
    """The event id of a raw message that carries none: the same on every re-read."""
    return fast_uuid5(_NAMESPACE_BYTES, f"{topic}:{partition}:{offset}")


class IngestMetrics:
    """The service's Prometheus metrics, in the process's private registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = PromCounter(
            "loopline_ingest_events_total",
            "Raw messages handled (accepted + rejected + duplicates)", ["pipeline"],
            registry=registry)
        self.accepted = PromCounter(
            "loopline_ingest_accepted_total", "Events written to the features topic", ["pipeline"],
            registry=registry)
        self.rejected = PromCounter(
            "loopline_ingest_rejected_total", "Messages written to the dead-letter topic",
            ["pipeline", "rule"], registry=registry)
        self.duplicates = PromCounter(
            "loopline_ingest_duplicates_total", "Events re-sent with an event_id already accepted "
            "with the same content (counted, not forwarded)", ["pipeline"], registry=registry)
        self.dropped_fields = PromCounter(
            "loopline_ingest_dropped_fields_total", "Unknown fields dropped from accepted events "
            "(unknown_fields: drop)", ["pipeline"], registry=registry)
        self.truncated = PromCounter(
            "loopline_ingest_deadletter_truncated_total", "Dead letters whose original was too "
            "large to keep whole", ["pipeline"], registry=registry)
        self.batch_size = Histogram("loopline_ingest_batch_size", "Messages per handled batch",
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
                                    registry=registry)
        self.batch_seconds = Histogram("loopline_ingest_batch_seconds",
                                       "Time to validate and encode a batch", registry=registry)
        self.pipelines = Gauge("loopline_ingest_pipelines", "Pipelines this process serves",
                               registry=registry)


@dataclass
class _Pipeline:
    """What the loop needs about one served pipeline."""

    spec: PipelineSpec
    topics: PipelineTopics
    validator: Validator
    encoder: FeaturesEncoder
    index: EventIndex

    @classmethod
    def build(cls, spec: PipelineSpec, index: EventIndex) -> _Pipeline:
        validator = Validator(spec)
        encoder = FeaturesEncoder(spec.features_schema(), validator.attributes)
        return cls(spec, spec.topics, validator, encoder, index)


@dataclass
class _Tally:
    """Counts of one pipeline in one batch, added to the metrics once the batch is committed."""

    accepted: int = 0
    dropped: int = 0
    truncated: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    # event ids to remember once the batch is sent
    seen: list[tuple[str, Seen]] = field(default_factory=list)
    pending: dict[str, Seen] = field(default_factory=dict)  # ids accepted earlier in this batch


class IngestService:
    """Validates raw events of the served pipelines; :meth:`run` serves until the runtime stops."""

    def __init__(self, rt: ServiceRuntime, settings: IngestSettings,
                 delivery: Delivery | None = None) -> None:
        self.rt = rt
        self.settings = settings
        self.health = rt.health
        self.metrics = IngestMetrics(rt.registry)
        self.wanted = set(settings.pipelines)
        # A large rejected message is dead-lettered whole: the producer must accept that size.
        self.delivery = delivery or rt.delivery(
            **{"message.max.bytes": settings.deadletter_max_bytes + DEADLETTER_OVERHEAD})
        self.pipelines: dict[str, _Pipeline] = {}  # by raw topic
        self._reader: RegistryReader | None = None
        self._consumer: Consumer | None = None
        self._subscribed: list[str] = []
        self._next_refresh = 0.0

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
                index = current.index if current is not None else self._rebuild_index(spec)
                self.pipelines[spec.topics.raw] = _Pipeline.build(spec, index)
                log.info("pipeline_loaded", extra={
                    "pipeline": name, "spec_sha256": spec.sha256()[:12],
                    "raw_topic": spec.topics.raw,
                    "change": "new" if current is None else "updated"})
        topics = sorted(self.pipelines)
        if topics and topics != self._subscribed and self._consumer is not None:
            self.health.expect_assignment()
            self._consumer.subscribe(topics, on_assign=self.health.assigned)
            self._subscribed = topics
            self.metrics.pipelines.set(len(topics))
            log.info("subscribed", extra={"topics": topics, "group_id": self.rt.group_id})
        missing = sorted(self.wanted - {p.spec.name for p in self.pipelines.values()})
        if self._subscribed:
            self.health.set_ready(True, f"serving {len(self._subscribed)} pipeline(s)"
                                  + (f"; waiting for {missing} in the registry" if missing else ""))
        else:
            waiting = f"{missing}" if missing else "a pipeline spec"
            self.health.set_ready(
                False, f"no pipeline to serve yet: waiting for {waiting} in the registry")

    def _rebuild_index(self, spec: PipelineSpec) -> EventIndex:
        assert self._reader is not None
        codec = self._reader.state.features_codec(spec.name)
        return rebuild(self.rt.kafka, spec.topics.features, codec, self.settings.idempotency_window)

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the runtime's stop flag; raise if Kafka fails (the batch stays open)."""
        self._reader = RegistryReader(self.rt.kafka, client_id="loopline-ingest-registry")
        try:
            self._reader.catch_up()
            self._consumer = self.rt.kafka.consumer("loopline-ingest", self.rt.group_id)
            self.refresh(force=True)
            while not self._subscribed and not self.rt.stop.is_set():
                self.rt.stop.wait(min(self.settings.registry_poll_s, 0.5))
                self.health.beat()
                self.refresh()
            if self.rt.stop.is_set():
                self._consumer.close()
                self.delivery.close()
                return
            self.rt.loop(self._consumer, self.delivery, self,
                         max_deadletter_bytes=self.settings.deadletter_max_bytes).run()
        finally:
            self.health.set_ready(False, "stopped")
            self._reader.close()

    def tick(self, out: Outputs) -> None:
        """Between batches: follow the registry."""
        self.refresh()

    def process(self, batch: list[Message], out: Outputs) -> None:
        """Validate a batch; queue features, dead letters, and the counts for its commit."""
        started = time.perf_counter()
        at_bytes = long_bytes(now_ms())
        tallies: dict[str, _Tally] = {}
        for topic, messages in groupby(batch, _topic_of):  # mostly one long run of one topic
            run = list(messages)
            p = self.pipelines.get(topic)
            if p is None:
                for m in run:
                    self._unknown_topic(m, out, tallies)
                continue
            tally = tallies.get(p.spec.name)
            if tally is None:
                tally = tallies[p.spec.name] = _Tally()
            self._process_run(p, topic, run, out, tally, at_bytes)
        size, seconds = len(batch), time.perf_counter() - started
        # The next batch must know these event ids even before this one is confirmed.
        out.on_sent(lambda: self._remember(tallies))
        out.on_commit(lambda: self._count(tallies, size, seconds))

    def _process_run(self, p: _Pipeline, topic: str, run: list[Message], out: Outputs,
                     tally: _Tally, at_bytes: bytes) -> None:
        """Validate consecutive messages of one raw topic (see :meth:`process`)."""
        validator, encoder, spec_key = p.validator, p.encoder, p.spec.key
        decode, max_bytes = validator.decode_fast, validator.max_bytes
        # msgspec first, for all: it takes the plainly valid JSON events and raises for the rest.
        events: list[Any] = []
        add = events.append
        for m in run:
            value = m.value()
            try:
                add(decode(value) if len(value) <= max_bytes else None)
            except (MsgspecError, TypeError):  # TypeError: a tombstone (None) has no length
                add(None)
        # The derived ids of those that carry none, hashed one by one and formatted together.
        prefixes = DerivedIds(_NAMESPACE_BYTES, topic)
        digests = [_sha1(prefixes[m.partition()] + str(m.offset()).encode()).digest()
                   for m, e in zip(run, events) if e is not None and e.event_id is None]
        next_id = iter(uuid5_many(digests)).__next__
        validate, struct_event, key_attr = validator.validate, encoder.struct_event, None
        if spec_key is not None:
            key_attr = validator.attributes[spec_key]
        middle = at_bytes + encoder.source_prefix(topic)  # ingested_at and source topic
        out_topic, index, pending = p.topics.features, p.index, tally.pending
        emit = out.items.append
        accepted = dropped = 0
        for m, event in zip(run, events):
            if event is not None:  # plainly valid: no verdict object needed
                features, event_id, key, ts = event.features, event.event_id, event.key, event.ts
                encode, unknown = struct_event, 0
                if key is None and key_attr is not None:
                    key_value = getattr(features, key_attr)
                    if key_value is not None:
                        key = str(key_value)
                eid = next_id() if event_id is None else None
            else:
                try:
                    verdict = validate(m.value())
                except Exception as e:  # a validator bug must not crash-loop ingest
                    log.exception("validation_failed", extra={
                        "topic": topic, "partition": m.partition(), "offset": m.offset()})
                    verdict = Rejection(None, "internal", f"ingest could not validate this message "
                                        f"({type(e).__name__}: {e}); please report it")
                if not isinstance(verdict, Accepted):
                    self._dead(m, out, verdict, tally)
                    continue
                features, event_id, key = verdict.features, verdict.event_id, verdict.key
                ts = verdict.ts
                encode, unknown = encoder.event, verdict.dropped
                if key is None and spec_key is not None:
                    key_value = features.get(spec_key)
                    if key_value is not None:
                        key = str(key_value)
                eid = None
                if event_id is None:
                    eid = uuid5_of(prefixes[m.partition()] + str(m.offset()).encode()).encode()
            partition, offset = m.partition(), m.offset()
            if key is None:
                raw_key = m.key()
                key = raw_key.decode("utf-8", "replace") if raw_key is not None else None
            if ts is None:
                ts = kafka_timestamp(m)
                if ts is None:
                    ts = now_ms()
            try:
                record, content = encode(features, eid or event_id.encode(),  # type: ignore[misc]  # set on both paths
                                         key.encode() if key is not None else None, ts, middle,
                                         partition, offset)
                if eid is None:  # the producer's id: the idempotency key
                    text = content.decode()
                    seen = pending.get(event_id) or index.get(event_id)
                    if seen is not None:
                        if seen.content == text:
                            tally.duplicates += 1
                            continue
                        self._dead(m, out, Rejection("event_id", "conflict", self._conflict(
                            p.spec, event_id, seen, text)), tally)
                        continue
                    pending[event_id] = Seen(text, partition, offset)
                    tally.seen.append((event_id, pending[event_id]))
            except (TypeError, ValueError, OverflowError, AttributeError, struct.error) as e:
                # Validation makes this unreachable; if it ever is, the event is dead-lettered.
                self._dead(m, out, Rejection(None, "schema", f"valid event could not be encoded: "
                                             f"{type(e).__name__}: {e}"), tally)
                continue
            # Keyed by the event id (its bytes) when there is no key. Out straight onto the
            # outputs: out.send without a Python call per event.
            emit(Out(out_topic, record, key or eid or event_id))
            accepted += 1
            dropped += unknown  # counted for forwarded events only
        tally.accepted += accepted
        tally.dropped += dropped

    @staticmethod
    def _conflict(spec: PipelineSpec, event_id: str, seen: Seen, content: str) -> str:
        return (f"event_id {event_id!r} was already accepted with other content (content hash "
                f"{seen.content}, read from {spec.topics.raw} partition {seen.partition} offset "
                f"{seen.offset}: its features are on {spec.topics.features} with that source); "
                f"this copy (content hash {content}) is kept here. An event id names one event: "
                "send a new id for a new event")

    def _unknown_topic(self, m: Message, out: Outputs, tallies: dict[str, _Tally]) -> None:
        """A message of a raw topic whose spec is not loaded (yet): dead-letter it, never drop."""
        pipeline = pipeline_of(m.topic())
        # Only raw topics are subscribed: anything else is a bug worth stopping for.
        if pipeline is None:
            raise LooplineError(f"ingest received a message from {m.topic()}, which is no "
                                f"pipeline's raw topic (partition {m.partition()}, offset "
                                f"{m.offset()})")
        tally = tallies.setdefault(pipeline, _Tally())
        why = Rejection(None, "schema", f"no pipeline spec is registered for {m.topic()}")
        self._dead(m, out, why, tally)

    def _dead(self, m: Message, out: Outputs, why: Rejection, tally: _Tally) -> None:
        """Queue the dead letter of one rejected message (truncated only if it cannot fit)."""
        limit = self.settings.deadletter_max_bytes
        if len(m.value() or b"") + DEADLETTER_OVERHEAD + len(why.message.encode()) > limit:
            tally.truncated += 1
        tally.rejected[why.rule] += 1
        out.dead(m, why.rule, why.message, why.field)
        if log.isEnabledFor(logging.DEBUG):  # no record's fields to build when nobody reads them
            log.debug("rejected", extra={"topic": m.topic(), "partition": m.partition(),
                                         "offset": m.offset(), "field": why.field,
                                         "rule": why.rule})

    def _remember(self, tallies: dict[str, _Tally]) -> None:
        """Add the event ids a sent batch accepted to the index (duplicates of them are dropped)."""
        for pipeline, t in tallies.items():
            if t.seen:
                p = self.pipelines.get(PipelineTopics(pipeline).raw)
                if p is not None:
                    p.index.add(t.seen)

    def _count(self, tallies: dict[str, _Tally], size: int, seconds: float) -> None:
        """Add a committed batch to the metrics (per pipeline and rule)."""
        m = self.metrics
        for pipeline, t in tallies.items():
            rejected = sum(t.rejected.values())
            m.events.labels(pipeline).inc(t.accepted + rejected + t.duplicates)
            m.accepted.labels(pipeline).inc(t.accepted)
            for rule, n in t.rejected.items():
                m.rejected.labels(pipeline, rule).inc(n)
            if t.duplicates:
                m.duplicates.labels(pipeline).inc(t.duplicates)
            if t.dropped:
                m.dropped_fields.labels(pipeline).inc(t.dropped)
            if t.truncated:
                m.truncated.labels(pipeline).inc(t.truncated)
            # Debug, not info: every rejection is on the dead-letter topic with its reason, and
            # counted by rule and pipeline; at info this repeated them once per batch (with 5 % bad
            # input, a line for nearly every batch, and 2 % of ingest's time spent formatting it).
            if (rejected or t.duplicates) and log.isEnabledFor(logging.DEBUG):
                log.debug("batch_rejections", extra={
                    "pipeline": pipeline, "rejected": dict(t.rejected), "duplicates": t.duplicates})
        m.batch_size.observe(size)
        m.batch_seconds.observe(seconds)
