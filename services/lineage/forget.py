"""``lineage forget``: a data subject out of the lineage store, and what Kafka still holds of them.

The store's rows go (:func:`query.forget`), but the pipeline's topics keep the subject's
messages until their retention deletes them, and a lineage rebuild from offset 0 would read them
again. So forgetting also:

1. reads every topic of the pipeline (features, raw, predictions, feedback, deadletter, in that
   order: each adds the ids the next one is matched by) for the subject's messages: by Kafka key
   and by content (event key, event ids, prediction ids, a raw event's ``key`` or key feature, a
   dead letter's original message and where it came from);
2. adds the subject to the store's forgotten list (salted digests, see :mod:`.forgotten`), which
   the lineage service and the query views honour, so nothing of them is imported again;
3. writes a tombstone (null value) per Kafka key the subject's messages carry on every compacted
   topic, in each partition holding them, unless another subject's message uses the same key;
4. reports, per topic, how many of the subject's messages are still there and until when (the
   topic's cleanup.policy, retention.ms and retention.bytes as the broker describes them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import ConfigResource

from loopline import avro, feedback, topics
from loopline.errors import FeedbackError, LooplineError
from loopline.kafka import AckedProducer, KafkaConfig, watermarks
from loopline.registry import RegistryState, now_ms
from loopline.services.lineage import forgotten as forgotten_list
from loopline.services.lineage import query as q
from loopline.services.lineage.store import LineageStore
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

#: The order topics are read in: each one's matches give the ids the next ones are matched by.
SCAN_ORDER = ("features", "raw", "predictions", "feedback", "deadletter")
_CONFIGS = ("cleanup.policy", "retention.ms", "retention.bytes", "max.compaction.lag.ms")
_NO_BOUND = 2**63 - 1  # Kafka's default max.compaction.lag.ms: the cleaner may wait forever
Progress = Callable[[str, int, int], None]  # topic, messages read, messages expected


def _text(value: Any) -> str | None:
    """A decoded field if it is a string (hostile JSON may put anything there), else None."""
    return value if isinstance(value, str) else None


@dataclass
class Subject:
    """What identifies one subject's messages; grows as the topics are read."""

    key: str
    key_feature: str | None
    events: set[str] = field(default_factory=set)
    predictions: set[str] = field(default_factory=set)
    raw_sources: set[tuple[str, int, int]] = field(default_factory=set)  # raw positions of events
    positions: set[tuple[str, int, int]] = field(default_factory=set)  # every message found

    def ids(self) -> set[str]:
        """What the Kafka key of the subject's messages may be: key, event or prediction ids."""
        return {self.key} | self.events | self.predictions

    def raw_event(self, doc: Any) -> bool:
        """Whether a raw event (decoded JSON or Avro) is the subject's; learns its event id."""
        if not isinstance(doc, dict):
            return False
        features = doc.get("features")
        by_feature = (self.key_feature is not None and isinstance(features, dict)
                      and features.get(self.key_feature) is not None
                      and str(features[self.key_feature]) == self.key)
        event_id = _text(doc.get("event_id"))
        if doc.get("key") == self.key or by_feature or event_id in self.events:
            if event_id is not None:
                self.events.add(event_id)
            return True
        return False

    def feedback_of(self, doc: Any) -> bool:
        """Whether feedback (decoded, or loosely read JSON) refers to the subject's events."""
        return isinstance(doc, dict) and (_text(doc.get("prediction_id")) in self.predictions
                                          or _text(doc.get("event_id")) in self.events)


@dataclass
class Holding:
    """What one topic holds of the subject."""

    kind: str
    topic: str
    exists: bool = True
    read: int = 0
    messages: int = 0
    newest_ms: int | None = None
    keys: dict[bytes, set[int]] = field(default_factory=dict)  # Kafka key -> partitions
    unkeyed: int = 0
    shared: set[bytes] = field(default_factory=set)  # keys other subjects' messages use too
    config: dict[str, str] = field(default_factory=dict)
    tombstones: int = 0

    @property
    def compacted(self) -> bool:
        """Whether the topic's cleanup.policy includes compaction."""
        return "compact" in self.config.get("cleanup.policy", "delete")

    def untombstonable(self) -> int:
        """Subject keys that get no tombstone (others use them too), +1 for no-key messages."""
        return len(self.shared & self.keys.keys()) + (1 if self.unkeyed else 0)

    def kept_until(self) -> str:
        """Until when the topic keeps the subject's messages, in words."""
        if not self.exists:
            return "topic does not exist"
        if not self.messages:
            return "-"
        policy = self.config.get("cleanup.policy", "delete")
        parts = []
        if "compact" in policy:
            if self.tombstones and not self.untombstonable():
                parts.append(f"tombstoned: removed {self._compacted_by()}")
            elif self.tombstones:
                parts.append(f"tombstoned, except {self.untombstonable()} key(s) other subjects "
                             "use too: those messages stay")
            else:
                parts.append("compacted, no tombstones written: kept")
        if "delete" in policy:
            ms, size = self.config.get("retention.ms"), self.config.get("retention.bytes")
            if ms is None:
                parts.append("retention not reported by the broker (its default applies; "
                             "assume indefinitely)")
            elif int(ms) < 0:
                parts.append("kept indefinitely (retention -1)")
            else:
                until = datetime.fromtimestamp(((self.newest_ms or 0) + int(ms)) / 1000, UTC)
                parts.append(f"kept until about {until.isoformat(timespec='minutes')} "
                             f"(retention.ms {ms})")
            if size is not None and int(size) >= 0:
                parts.append(f"or until a partition passes {size} bytes")
        elif "compact" in policy and not parts[0].startswith("tombstoned: "):
            parts[-1] += " indefinitely"
        return "; ".join(parts)

    def _compacted_by(self) -> str:
        """When the log cleaner must have removed what the tombstones (written now) replace."""
        lag = self.config.get("max.compaction.lag.ms")
        if lag is None or int(lag) >= _NO_BOUND:
            return "once the log cleaner compacts them (no max.compaction.lag.ms set)"
        until = datetime.fromtimestamp((now_ms() + int(lag)) / 1000, UTC)
        return f"by about {until.isoformat(timespec='minutes')} (max.compaction.lag.ms {lag})"

    def summary(self) -> dict[str, Any]:
        """This holding as plain values (the JSON report)."""
        return {"topic": self.topic, "kind": self.kind, "exists": self.exists, "read": self.read,
                "messages": self.messages,
                "newest": datetime.fromtimestamp(self.newest_ms / 1000, UTC).isoformat()
                if self.newest_ms is not None else None,
                "cleanup_policy": self.config.get("cleanup.policy"),
                "retention_ms": self.config.get("retention.ms"),
                "retention_bytes": self.config.get("retention.bytes"),
                "kafka_keys": len(self.keys), "unkeyed": self.unkeyed,
                "shared_keys": len(self.shared & self.keys.keys()),
                "tombstones": self.tombstones, "kept_until": self.kept_until()}


@dataclass
class ForgetReport:
    """Everything one forget did and found."""

    pipeline: str
    key: str
    store: dict[str, Any]
    holdings: list[Holding]
    forgotten: dict[str, int] | None  # digests added to the forgotten list (None: not blocked)
    forgotten_file: str
    dry_run: bool


def _read(kafka: KafkaConfig, topic: str, visit: Callable[[list[Message]], None],
          progress: Progress | None = None, quiet_timeout_s: float = 30.0) -> int | None:
    """Read every partition of ``topic`` from its start to its end; None if there is no topic."""
    reader = kafka.reader("loopline-lineage-forget", **{"enable.partition.eof": True})
    try:
        meta = reader.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        parts = sorted(meta.partitions)
        marks = {p: watermarks(reader, topic, p) for p in parts}
        expected = sum(high - low for low, high in marks.values())
        done = {p for p, (low, high) in marks.items() if high <= low}
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        read, quiet, last = 0, 0, time.monotonic()
        # Tansu's high watermark can understate a partition's end: read on until polls are empty.
        while len(done) < len(parts) or quiet < 2:
            batch = reader.consume(2000, 0.2)
            if not batch:
                quiet += 1
                if len(done) < len(parts) and time.monotonic() - last > quiet_timeout_s:
                    raise LooplineError(f"{topic}: partitions {sorted(set(parts) - done)} gave "
                                        f"nothing for {quiet_timeout_s:.0f}s before their end")
                continue
            quiet, last = 0, time.monotonic()
            data = []
            for m in batch:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise LooplineError(f"{topic}[{m.partition()}]: {err.str()}")
                    done.add(cast(int, m.partition()))
                else:
                    data.append(m)
            if data:
                visit(data)
                read += len(data)
            if progress is not None:
                progress(topic, read, max(expected, read))
        return read
    finally:
        reader.close()


class Scanner:
    """Finds the subject's messages in each of a pipeline's topics."""

    def __init__(self, spec: PipelineSpec, features: avro.Codec, subject: Subject) -> None:
        self.spec = spec
        self.subject = subject
        self.codecs = {"features": features, "predictions": avro.codec("prediction"),
                       "raw": avro.Codec(spec.raw_schema()), "feedback": avro.codec("feedback"),
                       "deadletter": avro.codec("deadletter")}

    def _decode(self, kind: str, value: bytes | None) -> Any:
        """A message of ``kind`` decoded loosely: a dict, or None when unreadable."""
        if value is None:
            return None
        if kind == "feedback":
            try:
                return feedback.decode(value, "", 0)
            except FeedbackError:
                pass  # invalid feedback may still name a prediction: read it as plain JSON
        if value[:2] == avro.MAGIC and kind in self.codecs:
            try:
                return self.codecs[kind].decode(value)
            except LooplineError:
                return None
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None

    def matches(self, kind: str, kafka_key: bytes | None, value: bytes | None,
                position: tuple[str, int, int], ids: set[str]) -> bool:
        """Whether a message of ``kind`` is the subject's; learns the ids it carries."""
        s = self.subject
        by_key = kafka_key is not None and kafka_key.decode("utf-8", "replace") in ids
        doc = self._decode(kind, value)
        if kind == "raw":
            return by_key or position in s.raw_sources or s.raw_event(doc)
        if kind == "feedback":
            return by_key or s.feedback_of(doc)
        if not isinstance(doc, dict):
            return by_key
        event_id, prediction_id = _text(doc.get("event_id")), _text(doc.get("prediction_id"))
        source = doc.get("source") if isinstance(doc.get("source"), dict) else None
        if kind == "deadletter":  # the subject's when its original was, judged as its source's kind
            if by_key or source is None:
                return by_key
            origin = (source["topic"], source["partition"], source["offset"])
            source_kind = source["topic"].rsplit(".", 1)[-1]
            return (origin in s.positions or origin in s.raw_sources
                    or (source_kind in SCAN_ORDER[:-1]
                        and self.matches(source_kind, doc.get("original_key"), doc.get("original"),
                                         origin, ids)))
        # features and predictions: the event's key, or ids already known to be the subject's
        if not (by_key or doc.get("key") == s.key or event_id in s.events
                or prediction_id in s.predictions):
            return False
        if event_id is not None:
            s.events.add(event_id)
        if prediction_id is not None and kind == "predictions":
            s.predictions.add(prediction_id)
        if kind == "features" and source is not None:
            s.raw_sources.add((source["topic"], source["partition"], source["offset"]))
        return True

    def scan(self, kafka: KafkaConfig, kind: str, progress: Progress | None = None) -> Holding:
        """Read one topic; count and locate the subject's messages and the keys they carry."""
        topic = getattr(self.spec.topics, kind)
        holding = Holding(kind, topic)
        ids = self.subject.ids()  # fixed per topic: others' keys are checked against it
        watched = {i.encode() for i in ids}
        extra: set[bytes] = set()

        def visit(batch: list[Message]) -> None:
            for m in batch:
                if m.value() is None:
                    continue  # a tombstone (an earlier forget's, perhaps): no one's data
                partition, k = cast(int, m.partition()), m.key()
                position = (topic, partition, cast(int, m.offset()))
                if not self.matches(kind, k, m.value(), position, ids):
                    if k is not None and k in watched:
                        holding.shared.add(k)
                    continue
                holding.messages += 1
                self.subject.positions.add(position)
                ts_type, ts = m.timestamp()
                if ts_type and ts >= 0:
                    holding.newest_ms = max(holding.newest_ms or 0, ts)
                if k is None:
                    holding.unkeyed += 1
                else:
                    holding.keys.setdefault(k, set()).add(partition)
                    if k not in watched:
                        extra.add(k)

        read = _read(kafka, topic, visit, progress)
        if read is None:
            holding.exists = False
            return holding
        holding.read = read
        if extra:  # keys that are not the subject's ids: does anyone else's message carry them?
            def others(batch: list[Message]) -> None:
                for m in batch:
                    k = m.key()
                    where = (topic, m.partition(), m.offset())
                    if k in extra and m.value() is not None and where not in self.subject.positions:
                        holding.shared.add(k)
            _read(kafka, topic, others)
        return holding


def describe(kafka: KafkaConfig, topics: list[str]) -> dict[str, dict[str, str]]:
    """cleanup.policy, retention.ms and retention.bytes of each topic, as the broker says."""
    admin = kafka.admin("loopline-lineage-forget")
    out: dict[str, dict[str, str]] = {}
    futures = admin.describe_configs([ConfigResource("topic", t) for t in topics])
    for resource, future in futures.items():
        try:
            entries = future.result()
        except KafkaException as e:
            raise LooplineError(f"could not read the configs of {resource.name}: "
                                f"{e.args[0].str()}") from e
        out[resource.name] = {k: e.value for k, e in entries.items()
                              if k in _CONFIGS and e.value is not None}
    return out


def write_tombstones(kafka: KafkaConfig, holdings: Iterable[Holding]) -> None:
    """A null-value message per subject key and partition on compacted topics (not shared keys)."""
    producer = AckedProducer(kafka.producer("loopline-lineage-forget"))
    for h in holdings:
        if not h.compacted:
            continue
        for k, partitions in sorted(h.keys.items()):
            if k in h.shared:
                continue
            for p in sorted(partitions):
                producer.send(h.topic, None, key=k, partition=p)
                h.tombstones += 1
    producer.confirm()


def forget_subject(kafka: KafkaConfig, store: LineageStore, state: RegistryState, pipeline: str,
                   key: str, *, tombstones: bool = True, block: bool = True, dry_run: bool = False,
                   progress: Progress | None = None) -> ForgetReport:
    """Forget one data subject: store rows, forgotten list, tombstones; report what Kafka keeps."""
    spec = state.specs.get(pipeline)
    if spec is None:
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry "
                            f"(known: {', '.join(sorted(state.specs)) or 'none'})")
    events, predictions = q.subject_ids(store, pipeline, key)
    subject = Subject(key, spec.key, set(events), set(predictions))
    scanner = Scanner(spec, state.features_codec(pipeline), subject)
    scanned = {kind: scanner.scan(kafka, kind, progress) for kind in SCAN_ORDER}
    holdings = [scanned[kind] for kind in topics.KINDS]  # reported in the order data flows
    configs = describe(kafka, [h.topic for h in holdings if h.exists])
    for h in holdings:
        h.config = configs.get(h.topic, {})
    path = forgotten_list.path_of(store.root, pipeline)
    added = None
    if not dry_run and block:
        # Before the rows go: a running lineage service stops importing the subject first.
        # The subject's key only: another Kafka key their messages carried (a device id, say) may be
        # someone else's tomorrow, and blocking it would drop that someone's rows.
        _, added = forgotten_list.add(path, [key],
                                      subject.events, subject.predictions, now_ms())
    removed = q.forget(store, state, pipeline, key, subject.events, subject.predictions,
                       remove=not dry_run)
    if not dry_run and tombstones:
        write_tombstones(kafka, holdings)
    log.info("lineage_forget", extra={
        "pipeline": pipeline, "dry_run": dry_run, "events": len(subject.events),
        "predictions": len(subject.predictions), "removed": removed["removed"],
        "held": {h.kind: h.messages for h in holdings},
        "tombstones": sum(h.tombstones for h in holdings)})
    return ForgetReport(pipeline, key, removed, holdings, added, str(path), dry_run)
