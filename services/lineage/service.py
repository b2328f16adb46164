"""The lineage service loop: features, predictions and feedback of every pipeline into the store."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition
from prometheus_client import Counter, Histogram

from loopline import avro, topics
from loopline.errors import SchemaError
from loopline.kafka import AckedProducer
from loopline.registry import RegistryReader, now_ms
from loopline.runtime.service import ServiceRuntime
from loopline.services.lineage import rows
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore

log = logging.getLogger(__name__)

_TABLE_OF_KIND = {"features": "features", "predictions": "predictions", "feedback": "feedback"}


@dataclass
class _Buffer:
    """Rows of one topic-partition waiting to be written."""

    pipeline: str
    table: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_offset: int = -1
    since: float = field(default_factory=time.monotonic)


class LineageService:
    """Consumes the pipelines' topics and writes them to the lineage store, idempotently."""

    def __init__(self, rt: ServiceRuntime, settings: LineageSettings) -> None:
        self.rt = rt
        self.settings = settings
        self.store = LineageStore(settings.store_dir())
        self.registry = RegistryReader(rt.kafka, client_id="loopline-lineage-registry")
        self.consumer = rt.kafka.consumer("loopline-lineage", rt.group_id)
        self.deadletters = AckedProducer(rt.kafka.producer("loopline-lineage"))
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        self._stored: dict[tuple[str, int], int] = {}
        self._codecs: dict[str, avro.Codec] = {}
        self._topics: list[str] = []
        r = rt.registry
        self.rows_written = Counter("loopline_lineage_rows_total", "Rows written to the lineage store",
                                    ["pipeline", "table"], registry=r)
        self.skipped = Counter("loopline_lineage_duplicates_skipped_total",
                               "Messages skipped because the store already holds them", ["pipeline", "table"],
                               registry=r)
        self.rejected = Counter("loopline_lineage_deadletters_total", "Undecodable messages dead-lettered",
                                ["pipeline", "table"], registry=r)
        self.flush_seconds = Histogram("loopline_lineage_flush_seconds", "Time to write one file", registry=r)

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
                self.consumer.subscribe(wanted, on_assign=self.rt.health.assigned, on_revoke=self._on_revoke)
                log.info("lineage_subscribed", extra={"topics": wanted})

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Unwritten rows of a revoked partition are dropped, not flushed: their offsets were never
        # stored, so the new owner reads them again (a flush here could race the new owner).
        for tp in partitions:
            self._buffers.pop((tp.topic, tp.partition), None)
            self._stored.pop((tp.topic, tp.partition), None)

    def _codec(self, pipeline: str, table: str) -> avro.Codec:
        if table == "features":
            if pipeline not in self._codecs:
                self._codecs[pipeline] = self.registry.state.features_codec(pipeline)
            return self._codecs[pipeline]
        return avro.codec("prediction" if table == "predictions" else "feedback")

    def handle(self, msg: Message) -> None:
        """Buffer one message's row, unless the store already holds its offset."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        pipeline = topics.pipeline_of(topic)
        table = _TABLE_OF_KIND.get(topic.rsplit(".", 1)[-1])
        if pipeline is None or table is None:
            return
        key = (topic, partition)
        if key not in self._stored:
            self._stored[key] = self.store.stored_upto(pipeline, table, topic, partition)
        if offset <= self._stored[key]:
            self.skipped.labels(pipeline, table).inc()
            return
        buffer = self._buffers.setdefault(key, _Buffer(pipeline, table))
        buffer.last_offset = max(buffer.last_offset, offset)
        try:
            record = self._codec(pipeline, table).decode(msg.value() or b"")
        except SchemaError as e:
            self._dead_letter(pipeline, table, msg, str(e))
            return
        if table == "features":
            buffer.rows.append(rows.feature_row(record, msg))
        elif table == "predictions":
            buffer.rows.append(rows.prediction_row(record, msg))
        else:
            buffer.rows.append(rows.feedback_row(record, msg))

    def _dead_letter(self, pipeline: str, table: str, msg: Message, reason: str) -> None:
        self.rejected.labels(pipeline, table).inc()
        timestamp = msg.timestamp()[1]
        record = {"original": msg.value() or b"", "original_key": msg.key(),
                  "source": {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()},
                  "source_timestamp": timestamp if timestamp >= 0 else None, "field": None,
                  "rule": "schema", "message": f"lineage could not decode a {table} record: {reason}",
                  "service": "lineage", "at": now_ms()}
        self.deadletters.send(topics.PipelineTopics(pipeline).deadletter,
                              avro.codec("deadletter").encode(record), key=msg.key())
        log.warning("lineage_deadletter", extra={"topic": msg.topic(), "partition": msg.partition(),
                                                 "offset": msg.offset(), "reason": reason})

    def flush(self, force: bool = False) -> int:
        """Write every buffer that is full, old enough, or all if ``force``; return rows written."""
        now = time.monotonic()
        due = [k for k, b in self._buffers.items()
               if force or len(b.rows) >= self.settings.flush_rows
               or now - b.since >= self.settings.flush_interval_s]
        if not due:
            return 0
        self.deadletters.confirm()
        written, offsets = 0, []
        for key in due:
            buffer = self._buffers.pop(key)
            topic, partition = key
            if buffer.rows:
                schema = self._schema(buffer.pipeline, buffer.table)
                with self.flush_seconds.time():
                    self.store.write(buffer.pipeline, buffer.table, topic, partition, buffer.rows, schema)
                self.rows_written.labels(buffer.pipeline, buffer.table).inc(len(buffer.rows))
                written += len(buffer.rows)
            self._stored[key] = buffer.last_offset
            offsets.append(TopicPartition(topic, partition, buffer.last_offset + 1))
        self.consumer.store_offsets(offsets=offsets)
        return written

    def _schema(self, pipeline: str, table: str) -> Any:
        if table == "features":
            return rows.features_schema(self.registry.state.specs[pipeline])
        return rows.PREDICTIONS if table == "predictions" else rows.FEEDBACK

    def run(self) -> None:
        """Consume until stopped; flush what is buffered on the way out."""
        self.registry.catch_up()
        self._subscribe()
        self.rt.health.set_ready(True, "consuming")
        try:
            while not self.rt.stop.is_set():
                if self.registry.poll(0):
                    self._subscribe()
                if not self._topics:
                    self.rt.stop.wait(0.5)
                    self.rt.health.beat()
                    continue
                for msg in self.consumer.consume(self.settings.batch_size, self.settings.batch_timeout_s):
                    err = msg.error()
                    if err is None:
                        self.handle(msg)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consume_error", extra={"error": err.str()})
                self.flush()
                self.rt.health.beat()
            self.flush(force=True)
        finally:
            self.consumer.close()
            self.registry.close()
