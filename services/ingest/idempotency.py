"""``event_id`` as the producer's idempotency key: duplicates and conflicts of recent event ids.

The index maps each recent event id (per pipeline) to the hash of the content it was accepted
with and where that copy lives on the features topic. It is bounded (least recently accepted
ids are forgotten first) and rebuilt at start from the end of the features topics, so a restart
or a rebalance does not forget what was just accepted. Entries of a batch are added only once
the batch is committed: an aborted or failed batch never makes its own retry look like a copy.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from loopline.avro import Codec
from loopline.avro.writers import content_digest
from loopline.kafka import KafkaConfig, watermarks

log = logging.getLogger(__name__)


def content_hash(key: str | None, features: bytes) -> str:
    """Hash of what makes two events with one id the same event: its key and encoded features."""
    return content_digest((key or "").encode(), features).decode()


@dataclass(frozen=True, slots=True)
class Seen:
    """Where an accepted event id's copy is: content hash and its place on the features topic."""

    content: str
    partition: int  # raw partition and offset it was read from
    offset: int


class EventIndex:
    """Recent event ids of one pipeline (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, Seen] = OrderedDict()

    def get(self, event_id: str) -> Seen | None:
        """What is known of ``event_id``, if it is recent."""
        return self._ids.get(event_id)

    def add(self, entries: Iterable[tuple[str, Seen]]) -> None:
        """Remember accepted ids (call once their batch is committed)."""
        ids = self._ids
        for event_id, seen in entries:
            ids[event_id] = seen
            ids.move_to_end(event_id)
        while len(ids) > self.capacity:
            ids.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ids)


def rebuild(kafka: KafkaConfig, topic: str, codec: Codec, capacity: int,
            progress: Callable[[int], None] | None = None) -> EventIndex:
    """An index of the last ``capacity`` events of a
    features topic (read committed, all partitions)."""
    index = EventIndex(capacity)
    if capacity == 0:
        return index
    reader = kafka.reader(f"loopline-ingest-index-{topic}", **{"enable.partition.eof": True})
    try:
        meta = reader.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return index
        parts = sorted(meta.partitions)
        share = max(1, capacity // max(1, len(parts)))
        starts, ends = [], {}
        for p in parts:
            low, high = watermarks(reader, topic, p)
            if high > low:
                starts.append(TopicPartition(topic, p, max(low, high - share)))
                ends[p] = high
        if not starts:
            return index
        reader.assign(starts)
        done: set[int] = set()
        read = 0
        while len(done) < len(ends):
            batch = reader.consume(5000, 1.0)
            if not batch:
                break  # nothing more arrives: Tansu's high watermark can overstate the end
            values, places = [], []
            for m in batch:
                if m.error() is not None:
                    done.add(m.partition())
                    continue
                values.append(m.value())
                places.append(m)
                if m.offset() + 1 >= ends.get(m.partition(), 0):
                    done.add(m.partition())
            entries = []
            for _m, record in zip(places, codec.decode_each(values, ("event_id", "source",
                                                                     "content_hash"))):
                if isinstance(record, Exception) or record.get("content_hash") is None:
                    continue  # written before ids were indexed, or not ours to judge here
                src = record["source"]
                entries.append((record["event_id"], Seen(record["content_hash"], src["partition"],
                                                         src["offset"])))
            index.add(entries)
            read += len(values)
            if progress is not None:
                progress(read)
    finally:
        reader.close()
    log.info("event_index_rebuilt", extra={"topic": topic, "events": len(index)})
    return index
