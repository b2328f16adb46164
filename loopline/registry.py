"""The event-sourced registry on ``loopline.models``: pipeline specs, model versions, stage changes.

Every service rebuilds its view by reading the topic from the start (:class:`RegistryReader`).
Specs and versions are keyed so compaction keeps the latest of each; stage changes get a key
of their own each, so the full history ("which version served at time T") survives compaction.

The topic is untrusted input: any Kafka client can write it. Every record is checked (Avro,
the JSON inside it, and the rules of :mod:`loopline.registry_rules`) before it changes the state;
one that fails is skipped, logged with its offset, field and rule, and kept as a
:class:`RejectedRecord` (``RegistryReader.rejected``) for the one service that dead-letters and
alerts it. No record can stop a reader.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from loopline import avro, topics
from loopline.errors import LooplineError, RegistryRecordError, SchemaError
from loopline.kafka import AckedProducer, KafkaConfig, TopicSpec, read_to, watermarks
from loopline.registry_rules import (
    SERVING,
    STAGES,
    TRAFFIC_STAGES,
    check_common,
    check_model,
    check_rebaseline,
    check_spec,
    check_stage_change,
    model_version_key,
    rebaseline_key,
    spec_key,
    stage_change_prefix,
)
from loopline.spec import PipelineSpec
from loopline.topics import valid_name

__all__ = ["ALERTS_TOPIC", "MODELS_TOPIC", "SERVING", "STAGES", "TRAFFIC_STAGES", "RegistryReader",
           "RegistryRecordError", "RegistryState", "RejectedRecord", "model_version_key", "now_ms",
           "publish", "spec_event", "stage_change_key"]

log = logging.getLogger(__name__)

MODELS_TOPIC = TopicSpec(topics.MODELS, partitions=1, config={"cleanup.policy": "compact"})
ALERTS_TOPIC = TopicSpec(topics.ALERTS, partitions=1)
DEADLETTER_TOPIC = TopicSpec(topics.DEADLETTER, partitions=1)
#: The topics every installation has, whatever its pipelines.
GLOBAL_TOPICS = (MODELS_TOPIC, ALERTS_TOPIC, DEADLETTER_TOPIC)

#: Rejected records kept in memory per reader (the rest are counted and logged, never lost: they
#: stay on the topic).
MAX_REJECTED = 1000


def now_ms() -> int:
    """Current time, epoch milliseconds."""
    return time.time_ns() // 1_000_000


def spec_event(spec: PipelineSpec) -> tuple[bytes, dict[str, Any]]:
    """The registry key and event that publish a pipeline spec."""
    event = {
        "kind": "pipeline_spec",
        "pipeline": spec.name,
        "at": now_ms(),
        "spec": {
            "spec_json": spec.canonical_json().decode(),
            "spec_sha256": spec.sha256(),
            "features_schema_json": orjson.dumps(spec.features_schema(),
                                                 option=orjson.OPT_SORT_KEYS).decode(),
        },
        "model": None,
        "stage_change": None,
    }
    # One key per spec version: compaction keeps every version, so readers can still decode
    # events written under an older features schema.
    return spec_key(spec.name, spec.sha256()), event


def stage_change_key(pipeline: str, name: str, version: int) -> bytes:
    """A unique key, so compaction never drops a stage change."""
    suffix = f"{now_ms()}-{uuid.uuid4().hex[:8]}".encode()
    return stage_change_prefix(pipeline, name, version) + suffix


def rebaseline_event(pipeline: str, reason: str = "",
                     actor: str = "cli") -> tuple[bytes, dict[str, Any]]:
    """The registry key and event telling the monitor to take recent live traffic as reference."""
    rid = f"{now_ms()}-{uuid.uuid4().hex[:12]}"
    event = {"kind": "rebaseline", "pipeline": pipeline, "at": now_ms(), "spec": None,
             "model": None, "stage_change": None,
             "rebaseline": {"id": rid, "reason": reason, "actor": actor}}
    # A key of its own, so compaction keeps every rebaseline (a monitor replaying the topic
    # recognises the ones it applied by id).
    return rebaseline_key(pipeline, rid), event


def publish(producer: AckedProducer, key: bytes, event: dict[str, Any]) -> None:
    """Send one registry event and wait for the broker's acknowledgement."""
    producer.send(topics.MODELS, avro.codec("registry").encode(event), key=key)
    producer.confirm()


@dataclass(frozen=True)
class RejectedRecord:
    """A registry record that was skipped: where it is, its exact bytes, and which rule it broke.

    Everything the owner of registry alerts needs to dead-letter it (:meth:`deadletter`) and to
    alert it once (:attr:`ident` is the same on every replay and every broker).
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None  # None: a tombstone
    kind: str | None  # the decoded record's kind, if it decoded
    pipeline: str | None  # the pipeline it names (record, else key), if that is a valid name
    field: str
    rule: str
    message: str

    @property
    def ident(self) -> str:
        """A stable id from the key and value (not the offset: a new broker restarts at 0)."""
        h = hashlib.sha256()
        for part in (self.key, self.value):
            h.update(b"-" if part is None else len(part).to_bytes(8, "little") + part)
        return h.hexdigest()[:32]

    @property
    def reason(self) -> str:
        """``field: message (rule: rule)``."""
        return f"{self.field}: {self.message} (rule: {self.rule})"

    @property
    def key_text(self) -> str | None:
        """The key as text (undecodable bytes as escapes), cut to 120 characters, for logs."""
        if self.key is None:
            return None
        text = self.key.decode("utf-8", "backslashreplace")
        return text if len(text) <= 120 else text[:120] + "..."

    def summary(self, limit: int = 300) -> str:
        """One line for people: offset, key and reason, cut to ``limit`` characters."""
        line = f"offset {self.offset}, key {self.key_text}: {self.reason}"
        return line if len(line) <= limit else line[:limit] + "..."

    def deadletter(self, service: str, at: int | None = None) -> dict[str, Any]:
        """This record as a ``schemas/deadletter.avsc`` record (original bytes kept)."""
        return {"original": self.value or b"", "original_key": self.key,
                "source": {"topic": self.topic, "partition": self.partition, "offset": self.offset},
                "source_timestamp": self.timestamp_ms, "field": self.field, "rule": self.rule,
                "message": self.message, "service": service, "at": now_ms() if at is None else at}


@dataclass
class RegistryState:
    """What the registry says now, rebuilt from its events in order."""

    specs: dict[str, PipelineSpec] = field(default_factory=dict)
    spec_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    features_schemas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    versions: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    stage_changes: list[dict[str, Any]] = field(default_factory=list)
    #: (at, pipeline, name, version, stage, traffic) for every registration and stage change, in
    #: order.
    stage_history: list[tuple[int, str, str, int, str, float]] = field(default_factory=list)
    #: Monitor rebaselines per pipeline, in order: dicts with id, reason, actor, at.
    rebaselines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    offset: int = -1
    #: Records skipped as invalid (the first MAX_REJECTED), and how many there were in all.
    rejected: list[RejectedRecord] = field(default_factory=list)
    rejected_total: int = 0

    def apply(self, event: dict[str, Any], offset: int, key: bytes | None = None) -> None:
        """Check one event, then fold it in; if invalid, raise :class:`RegistryRecordError`
        unchanged.

        ``key`` is the record's Kafka key; when given, it must be the key Loopline gives such a
        record (a foreign key could make compaction drop a real record).
        """
        # Every check runs before the first mutation: a bad record cannot leave half a change.
        kind = check_common(event)
        pipeline = event["pipeline"]
        if kind == "pipeline_spec":
            spec, schema = check_spec(self, event, key)
            self.specs[pipeline] = spec
            self.spec_events[pipeline] = event
            self.features_schemas.setdefault(pipeline, []).append(schema)
        elif kind == "model_version":
            m = check_model(self, event, key)
            ident = (pipeline, m["name"], m["version"])
            self.versions[ident] = dict(m, pipeline=pipeline, at=event["at"])
            self.stage_history.append((event["at"], *ident, m["stage"], m["traffic"]))
        elif kind == "stage_change":
            c = check_stage_change(self, event, key)
            ident = (pipeline, c["name"], c["version"])
            self.stage_changes.append(dict(c, pipeline=pipeline, at=event["at"]))
            self.stage_history.append((event["at"], *ident, c["to_stage"], c["traffic"]))
            version = self.versions[ident]
            version["stage"], version["traffic"] = c["to_stage"], c["traffic"]
        elif kind == "rebaseline":
            command = check_rebaseline(self, event, key)
            self.rebaselines.setdefault(pipeline, []).append(dict(command, at=event["at"]))
        # Any other kind (a newer schema's) carries nothing this state folds.
        self.offset = offset

    def reject(self, record: RejectedRecord) -> None:
        """Count a skipped record and keep it (up to MAX_REJECTED)."""
        self.rejected_total += 1
        if len(self.rejected) < MAX_REJECTED:
            self.rejected.append(record)

    def deployment_at(self, pipeline: str, at_ms: int) -> dict[tuple[str, int], tuple[str, float]]:
        """Stage and traffic of every version of ``pipeline`` as they stood at ``at_ms``."""
        plan: dict[tuple[str, int], tuple[str, float]] = {}
        for at, p, name, version, stage, traffic in self.stage_history:
            if p == pipeline and at <= at_ms:
                plan[(name, version)] = (stage, traffic)
        return plan

    def features_codec(self, pipeline: str) -> avro.Codec:
        """Codec of a pipeline's features topic that also reads events written under older specs."""
        # Every published schema, the latest included: an upgrade of schemas/features.avsc changes
        # the schema the current spec generates, and events written before it must stay readable.
        return avro.Codec(self.specs[pipeline].features_schema(),
                          writers=self.features_schemas[pipeline])


def _pipeline_named(event: dict[str, Any] | None, key: bytes | None) -> str | None:
    """The pipeline a record is about: the record's if valid, else its key's (pipeline/<name>/)."""
    if event is not None and valid_name(event.get("pipeline")):
        return str(event["pipeline"])
    if key is not None:
        parts = key.split(b"/", 2)
        if len(parts) > 2 and parts[0] == b"pipeline":
            name = parts[1].decode(errors="replace")
            if valid_name(name):
                return name
    return None


def _offset(m: Message) -> int:
    """A consumed message's offset (the client types it optional; a consumed message has one)."""
    offset = m.offset()
    return -1 if offset is None else offset


class RegistryReader:
    """Reads ``loopline.models`` from the beginning and keeps following it."""

    def __init__(self, kafka: KafkaConfig, client_id: str = "loopline-registry") -> None:
        self._consumer: Consumer = kafka.reader(client_id, **{"enable.partition.eof": True})
        self._consumer.assign([TopicPartition(topics.MODELS, 0, OFFSET_BEGINNING)])
        self._codec = avro.codec("registry")
        self.state = RegistryState()
        self._position = -1  # last offset read, applied or skipped
        self._untaken: list[RejectedRecord] = []
        self._untaken_dropped = 0

    @property
    def rejected(self) -> list[RejectedRecord]:
        """Every record skipped so far (the first MAX_REJECTED), in offset order."""
        return self.state.rejected

    def take_rejected(self) -> list[RejectedRecord]:
        """Records skipped since the last call (for the service that dead-letters and alerts)."""
        taken, self._untaken = self._untaken, []
        if self._untaken_dropped:
            log.error("registry_rejected_overflow", extra={"dropped": self._untaken_dropped,
                                                           "kept": MAX_REJECTED})
            self._untaken_dropped = 0
        return taken

    def poll(self, timeout_s: float = 0.0, max_messages: int = 1000) -> int:
        """Apply newly arrived events; return how many (invalid ones are skipped: ``rejected``)."""
        applied = 0
        for m in self._consumer.consume(max_messages, timeout_s):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("registry_read_error", extra={"error": err.str()})
                continue
            self._position = _offset(m)
            if self._apply(m):
                applied += 1
        return applied

    def _apply(self, m: Message) -> bool:
        """Decode, check and apply one record; on any failure reject it. Never raises."""
        key, value = m.key(), m.value()
        event: dict[str, Any] | None = None
        try:
            if value is None:
                raise RegistryRecordError("value", "tombstone", "a tombstone (null value); "
                                          "Loopline never deletes registry records")
            try:
                event = self._codec.decode(value)
            except SchemaError as e:
                raise RegistryRecordError("value", "schema", str(e)) from e
            self.state.apply(event, _offset(m), key)
            return True
        except RegistryRecordError as e:
            self._reject(m, event, e.field, e.rule, e.message)
        except Exception as e:  # the last line of defence: no record stops a reader
            log.exception("registry_check_failed", extra={"offset": _offset(m)})
            self._reject(m, event, "(record)", "unexpected", f"{type(e).__name__}: {e}")
        return False

    def _reject(self, m: Message, event: dict[str, Any] | None, field_: str, rule: str,
                message: str) -> None:
        ts_type, ts = m.timestamp()
        record = RejectedRecord(
            topic=m.topic() or topics.MODELS, partition=m.partition() or 0, offset=_offset(m),
            timestamp_ms=ts if ts_type else None, key=m.key(), value=m.value(),
            kind=str(event["kind"]) if event is not None else None,
            pipeline=_pipeline_named(event, m.key()), field=field_, rule=rule,
            message=message[:2000])
        self.state.reject(record)
        if len(self._untaken) < MAX_REJECTED:
            self._untaken.append(record)
        else:
            self._untaken_dropped += 1
        # A warning in every reader: the record is skipped, the service goes on; the monitor owns
        # its dead letter and its alert (once, for every replica and restart).
        log.warning("registry_record_rejected", extra={
            "topic": record.topic, "partition": record.partition, "offset": record.offset,
            "key": record.key_text, "kind": record.kind, "pipeline": record.pipeline,
            "field": field_[:120], "rule": rule, "reason": message[:300], "ident": record.ident})

    def catch_up(self, timeout_s: float = 30.0) -> RegistryState:
        """Read until the end of the topic as it was when called; return the state."""
        deadline = time.monotonic() + timeout_s
        _, high = watermarks(self._consumer, topics.MODELS, 0, timeout_s)
        # Tansu reports the high watermark as the last batch's base offset + 1, so reaching it is
        # not the end: read on until a poll brings nothing more (on Kafka that costs one short
        # poll).
        while True:
            before = self._position
            self.poll(0.2)
            if self._position == before and read_to(self._consumer, topics.MODELS, 0,
                                                    self._position, high):
                return self.state
            if time.monotonic() > deadline:
                raise LooplineError(f"registry: read up to offset {self._position} of {high} "
                                    f"within {timeout_s:.0f}s")

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()
