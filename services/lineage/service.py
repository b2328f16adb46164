"""The lineage service: features, predictions and feedback of every pipeline into the store.

It runs on the runtime's loop as a sink: rows are buffered per topic-partition and written at
checkpoints (:meth:`LineageService.checkpoint`), and the input offsets are committed only once
every row read so far is in a file. Files are named by topic, topic id (the incarnation: a new
broker or a recreated topic starts its offsets at 0 again), partition and offset range, so a
restart skips exactly what is already stored and a new incarnation is never mistaken for it.

Lineage is the one owner of feedback dead letters: invalid feedback (JSON or Avro, decoded by
:mod:`loopline.feedback`, like the monitor and the trainer do) is dead-lettered here, once, with
the field and the rule. Undecodable predictions are dead-lettered here too; undecodable feature
events are inference's to dead-letter (lineage counts and skips them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from confluent_kafka import Message, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from loopline import avro, feedback, topics
from loopline.errors import FeedbackError, SchemaError
from loopline.kafka import watermarks
from loopline.observability import bounded
from loopline.registry import RegistryReader
from loopline.runtime.delivery import Delivery
from loopline.runtime.incarnation import TopicIds
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.services.lineage import rows
from loopline.services.lineage.errors import StoreMismatch
from loopline.services.lineage.forgotten import EMPTY, Forgotten, ForgottenWatch
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore

log = logging.getLogger(__name__)

_TABLE_OF_KIND = {"features": "features", "predictions": "predictions", "feedback": "feedback"}


@dataclass
class _Buffer:
    """Rows of one topic-partition waiting to be written."""

    pipeline: str
    table: str
    topic_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    forgotten: Forgotten = EMPTY  # the forgotten list the first rows were checked against


def _unless_forgotten(forgotten: Forgotten, table: str, add: Callable[[dict[str, Any]], None],
                      skipped: Callable[[], None]) -> Callable[[dict[str, Any]], None]:
    """``add`` for rows of subjects not on the forgotten list; the others are counted."""
    def guarded(row: dict[str, Any]) -> None:
        if forgotten.holds(table, row):
            skipped()
        else:
            add(row)
    return guarded


class LineageService:
    """Consumes the pipelines' topics and writes them to the lineage store, idempotently."""

    def __init__(self, rt: ServiceRuntime, settings: LineageSettings,
                 delivery: Delivery | None = None) -> None:
        self.rt = rt
        self.settings = settings
        self.store = LineageStore(settings.store_dir())
        self.forgotten = ForgottenWatch(self.store.root)
        self.registry = RegistryReader(rt.kafka, client_id="loopline-lineage-registry")
        self.consumer = rt.kafka.consumer("loopline-lineage", rt.group_id)
        self.delivery = delivery or rt.delivery()
        self.topic_ids = TopicIds(rt.kafka.admin("loopline-lineage"))
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._stored: dict[tuple[str, int], int] = {}  # highest offset already in the store
        # next offset, per partition read since the commit
        self._positions: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._refused: dict[tuple[str, int], str] = {}
        self._codecs: dict[str, avro.Codec] = {}
        self._topics: list[str] = []
        self._next_poll = 0.0
        r = rt.registry
        self.rows_written = Counter("loopline_lineage_rows", "Rows written to the lineage store",
                                    ["pipeline", "table"], registry=r)
        self.skipped = Counter("loopline_lineage_duplicates_skipped",
                               "Messages skipped because the store "
                               "already holds them", ["pipeline", "table"], registry=r)
        self.rejected = Counter("loopline_lineage_deadletters",
                                "Invalid messages dead-lettered (feedback, "
                                "predictions) or skipped (features: inference dead-letters those)",
                                ["pipeline", "table", "rule"], registry=r)
        self.forgotten_skipped = Counter(
            "loopline_lineage_forgotten_skipped", "Messages or rows not stored: their subject is "
            "on the store's forgotten list", ["pipeline", "table"], registry=r)
        self.refused_partitions = Gauge("loopline_lineage_refused_partitions",
                                        "Partitions whose stored offsets "
                                        "disagree with the topic (not written until resolved)",
                                        registry=r)
        self.flush_seconds = Histogram("loopline_lineage_flush_seconds", "Time to write one file",
                                       registry=r)

    # ---- registry and subscription ------------------------------------------------------------
    def _wanted_topics(self) -> list[str]:
        state = self.registry.state
        names = self.settings.pipelines or sorted(state.specs)
        return sorted(getattr(state.specs[p].topics, kind) for p in names if p in state.specs
                      for kind in _TABLE_OF_KIND)

    def _subscribe(self) -> None:
        wanted = self._wanted_topics()
        if wanted != self._topics:
            self._topics = wanted
            self._codecs.clear()
            if wanted:
                self.rt.health.expect_assignment()
                self.consumer.subscribe(wanted, on_assign=self._on_assign,
                                        on_revoke=self._on_revoke)
                log.info("lineage_subscribed", extra={"topics": wanted})

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.rt.health.assigned()
        self.topic_ids.refresh()  # a recreated topic has a new id

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Unwritten rows of a revoked partition are dropped, not flushed: their offsets were never
        # committed, so the new owner reads them again (a flush here could race the new owner).
        for tp in partitions:
            key = (tp.topic, tp.partition)
            for table in (self._buffers, self._stored, self._positions, self._committed,
                          self._refused):
                table.pop(key, None)

    def tick(self, out: Outputs) -> None:
        """Between batches: follow the registry."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + 0.5
            if self.registry.poll(0):
                self._subscribe()

    # ---- messages -----------------------------------------------------------------------------
    def _codec(self, pipeline: str, table: str) -> avro.Codec:
        if table == "features":
            if pipeline not in self._codecs:
                self._codecs[pipeline] = self.registry.state.features_codec(pipeline)
            return self._codecs[pipeline]
        return avro.codec("prediction")

    def process(self, batch: list[Message], out: Outputs) -> None:
        """Buffer the rows of a batch, run by run of one partition; skip what the store holds."""
        for (topic, partition), run in groupby(batch, lambda m: (m.topic(), m.partition())):
            messages = list(run)
            key = (topic, partition)
            pipeline = topics.pipeline_of(topic)
            table = _TABLE_OF_KIND.get(topic.rsplit(".", 1)[-1])
            if pipeline is None or table is None or key in self._refused:
                # a refused partition's offsets are never committed: nothing of it is written
                continue
            if key not in self._stored:
                self._first_touch(pipeline, table, topic, partition)
                if key in self._refused:
                    continue
            self._positions[key] = messages[-1].offset() + 1
            done = self._stored[key]
            fresh = [m for m in messages if m.offset() > done]
            if len(fresh) < len(messages):
                self.skipped.labels(pipeline, table).inc(len(messages) - len(fresh))
            if fresh:
                self._buffer(pipeline, table, key, fresh, out)

    def _first_touch(self, pipeline: str, table: str, topic: str, partition: int) -> None:
        topic_id = self.topic_ids.get(topic)
        try:
            self._stored[(topic, partition)] = self.store.stored_upto(
                pipeline, table, topic, topic_id, partition, self._end_offset(topic, partition))
        except StoreMismatch as e:
            self._refused[(topic, partition)] = str(e)
            self.refused_partitions.set(len(self._refused))
            log.error("lineage_store_mismatch",
                      extra={"topic": topic, "partition": partition, "error": str(e)})
            self.rt.health.set_ready(False,
                                     f"lineage store disagrees with {topic}[{partition}]: {e}")

    def _end_offset(self, topic: str, partition: int) -> int | None:
        """The partition's end offset where the broker reports it exactly (Kafka), else None."""
        if self.rt.kafka.embedded:
            # Tansu reports the last batch's base offset + 1: not an end to compare with
            return None
        _, high = watermarks(self.consumer, topic, partition)
        return int(high)

    def _buffer(self, pipeline: str, table: str, key: tuple[str, int], messages: list[Message],
                out: Outputs) -> None:
        buffer = self._buffers.get(key)
        forgotten = self.forgotten.get(pipeline)
        if buffer is None:
            buffer = self._buffers[key] = _Buffer(pipeline, table, self.topic_ids.get(key[0]),
                                                  forgotten=forgotten)
        add: Callable[[dict[str, Any]], None] = buffer.rows.append
        if forgotten:  # checked before decoding: a forgotten key's tombstone is no dead letter
            skipped = self.forgotten_skipped.labels(pipeline, table)
            kept = [m for m in messages if not forgotten.message_key(m.key())]
            if len(kept) < len(messages):
                skipped.inc(len(messages) - len(kept))
            messages = kept
            add = _unless_forgotten(forgotten, table, add, skipped.inc)
        if table == "feedback":
            spec = self.registry.state.specs.get(pipeline)
            classes = spec.label.classes if spec is not None else None
            for m, record in zip(messages, feedback.decode_each(messages, classes)):
                if isinstance(record, FeedbackError):
                    self.rejected.labels(pipeline, table, record.rule).inc()
                    out.dead(m, record.rule, f"invalid feedback: {record}", record.field)
                else:
                    add(rows.feedback_row(record, m))
            return
        codec = self._codec(pipeline, table)
        for m, decoded in zip(messages, codec.decode_each([m.value() for m in messages])):
            if isinstance(decoded, SchemaError):
                self.rejected.labels(pipeline, table, "schema").inc()
                log.warning("lineage_undecodable", extra={"topic": m.topic(),
                                                          "partition": m.partition(),
                                                          "offset": m.offset(),
                                                          "error": bounded(str(decoded))})
                if table == "predictions":
                    out.dead(m, "schema", f"lineage could not decode a prediction: {decoded}")
            elif table == "features":
                add(rows.feature_row(decoded, m))
            else:
                add(rows.prediction_row(decoded, m))

    # ---- checkpoints --------------------------------------------------------------------------
    def due(self, pending: Outputs, now: float) -> bool:
        """Commit when a buffer is full or old enough (everything read so far is written then)."""
        for b in self._buffers.values():
            if (len(b.rows) >= self.settings.flush_rows
                    or now - b.since >= self.settings.flush_interval_s):
                return True
        # Dead letters are committed with the offsets of everything read, so they force a write too.
        return bool(pending) or (not self._buffers and self._positions != self._committed)

    def checkpoint(self, out: Outputs) -> list[TopicPartition]:
        """Write every buffer; return the positions of everything read (all of it is stored now)."""
        for (topic, partition), buffer in self._buffers.items():
            # A subject forgotten while its rows waited in memory is not written either.
            forgotten = self.forgotten.get(buffer.pipeline, fresh=True)
            if forgotten and forgotten is not buffer.forgotten:
                before = len(buffer.rows)
                buffer.rows = [r for r in buffer.rows if not forgotten.holds(buffer.table, r)]
                self.forgotten_skipped.labels(buffer.pipeline, buffer.table).inc(
                    before - len(buffer.rows))
            if not buffer.rows:
                continue
            schema = self._schema(buffer.pipeline, buffer.table)
            with self.flush_seconds.time():
                self.store.write(buffer.pipeline, buffer.table, topic, buffer.topic_id, partition,
                                 buffer.rows, schema)
            self.rows_written.labels(buffer.pipeline, buffer.table).inc(len(buffer.rows))
            self._stored[(topic, partition)] = buffer.rows[-1]["_offset"]
        self._buffers.clear()
        positions = [TopicPartition(t, p, o) for (t, p), o in self._positions.items()
                     if self._committed.get((t, p)) != o]
        self._committed.update(self._positions)
        return positions

    def rollback(self) -> None:
        """An aborted commit: forget what was buffered and read again from the last commit."""
        self._buffers.clear()
        self._stored.clear()  # the files written before the abort are found again on first touch
        for (topic, partition), offset in self._committed.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))
        self._positions = dict(self._committed)

    def _schema(self, pipeline: str, table: str) -> Any:
        if table == "features":
            return rows.features_schema(self.registry.state.specs[pipeline])
        return rows.PREDICTIONS if table == "predictions" else rows.FEEDBACK

    def run(self) -> None:
        """Consume until stopped; write what is buffered on the way out."""
        try:
            self.registry.catch_up()
            self._subscribe()
            self.rt.health.set_ready(True, "consuming")
            while not self._topics and not self.rt.stop.is_set():
                self.rt.stop.wait(0.5)
                self.rt.health.beat()
                if self.registry.poll(0):
                    self._subscribe()
            if self.rt.stop.is_set():
                self.consumer.close()
                self.delivery.close()
                return
            self.rt.loop(self.consumer, self.delivery, self, bisect=False, checkpointer=self).run()
        finally:
            self.registry.close()
