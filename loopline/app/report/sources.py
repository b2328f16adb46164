"""The report's Kafka inputs: the registry's state and the pipeline's alert events."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

from loopline import avro, topics
from loopline.errors import LooplineError, SchemaError
from loopline.kafka import KafkaConfig, read_to, watermarks
from loopline.registry import RegistryReader, RegistryState

log = logging.getLogger(__name__)


def read_registry(kafka: KafkaConfig) -> RegistryState:
    """The registry as it is now."""
    reader = RegistryReader(kafka, client_id="loopline-report")
    try:
        return reader.catch_up()
    finally:
        reader.close()


def read_alerts(kafka: KafkaConfig, pipeline: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """Every alert event of ``pipeline`` on ``loopline.alerts`` up to now, oldest first.

    An undecodable record is skipped and counted in the log: the topic is untrusted input.
    """
    consumer = kafka.reader("loopline-report-alerts", **{"enable.partition.eof": True})
    codec = avro.codec("alert")
    found: list[dict[str, Any]] = []
    bad = 0
    try:
        meta = consumer.list_topics(topics.ALERTS, timeout=10).topics.get(topics.ALERTS)
        if meta is None or meta.error is not None or not meta.partitions:
            return []
        parts = sorted(meta.partitions)
        high = {p: watermarks(consumer, topics.ALERTS, p)[1] for p in parts}
        position = {p: -1 for p in parts}
        consumer.assign([TopicPartition(topics.ALERTS, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + timeout_s
        while True:
            got = 0
            for m in consumer.consume(500, 0.2):
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise LooplineError(f"reading {topics.ALERTS}: {err.str()}")
                    continue
                got += 1
                position[m.partition()] = m.offset() or 0
                try:
                    alert = codec.decode(m.value())
                except SchemaError:
                    bad += 1
                    continue
                if alert["pipeline"] == pipeline:
                    found.append(alert)
            if not got and all(read_to(consumer, topics.ALERTS, p, position[p], high[p])
                               for p in parts):
                break
            if time.monotonic() > deadline:
                raise LooplineError(f"{topics.ALERTS}: not read to its end within {timeout_s:.0f}s")
    finally:
        consumer.close()
    if bad:
        log.warning("report_alerts_skipped", extra={"undecodable": bad, "topic": topics.ALERTS})
    return sorted(found, key=lambda a: a["at"])
