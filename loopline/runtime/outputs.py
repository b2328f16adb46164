"""What a service produces for a batch, buffered until the loop commits it; and dead letters.

Handlers never produce directly: they append to :class:`Outputs`, and the loop sends everything
at commit time (inside the transaction on exactly-once, before storing offsets on at-least-once).
So a handler that fails half-way leaves nothing behind, and a poison batch can be bisected.

A dead letter is built one way only (:func:`dead_letter`): the original bytes and key, where it
was read, its Kafka timestamp (None when the broker gave none), the field and rule that failed,
the service, and a ``deadletter_id`` that is the same for every retried copy of one rejection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message, TopicPartition

from loopline import avro, topics
from loopline.avro.writers import record_encoder
from loopline.registry import now_ms

#: Room for a dead letter's other fields and a truncation note, beyond the original's bytes.
DEADLETTER_OVERHEAD = 4096
Headers = list[tuple[str, bytes]]


class Out(msgspec.Struct, gc=False):
    """One message to produce.

    A msgspec struct, not a dataclass: ingest queues one per event, and its constructor runs in
    C (a fifth of a dataclass's cost). ``gc=False``: an Out never takes part in a reference
    cycle, so the collector need not track the thousands a batch holds.
    """

    topic: str
    value: bytes | None
    key: bytes | str | None = None
    headers: Headers | None = None
    partition: int | None = None


def kafka_timestamp(m: Message) -> int | None:
    """A message's Kafka timestamp in epoch ms, or None when the broker gave none."""
    kind, ts = m.timestamp()
    return ts if kind != TIMESTAMP_NOT_AVAILABLE and ts >= 0 else None


def deadletter_id(service: str, topic: str, partition: int, offset: int,
                  incarnation: str = "") -> str:
    """The id of one service's rejection of one message: equal across retries, unique otherwise."""
    text = f"{service}|{incarnation}|{topic}|{partition}|{offset}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def dead_letter(m: Message, service: str, rule: str, message: str, field_name: str | None = None,
                max_bytes: int | None = None, incarnation: str = "") -> tuple[str, dict[str, Any]]:
    """The dead-letter topic and record of a rejected
    message (the original truncated only to fit)."""
    original = m.value() or b""  # a tombstone has no bytes to keep
    if (max_bytes is not None
            and len(original) + DEADLETTER_OVERHEAD + len(message.encode()) > max_bytes):
        keep = max(0, max_bytes - DEADLETTER_OVERHEAD - len(message.encode()))
        message = (f"{message} [original truncated to its first {keep} of {len(original)} bytes to "
                   f"fit deadletter_max_bytes={max_bytes}; sha256 of the full original: "
                   f"{hashlib.sha256(original).hexdigest()}]")
        original = original[:keep]
    topic, partition, offset = m.topic(), m.partition(), m.offset()
    record = {
        "original": original, "original_key": m.key(),
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "source_timestamp": kafka_timestamp(m), "field": field_name, "rule": rule,
        "message": message, "service": service, "at": now_ms(),
        "deadletter_id": deadletter_id(service, topic, partition, offset, incarnation),
    }
    return deadletter_topic(topic), record


@lru_cache(maxsize=1)
def _deadletter_encoder() -> Callable[[dict[str, Any]], bytes]:
    """The dead-letter codec's encode, compiled (fastavro costs 10 us a record, a fifth of ingest's
    whole cost of a rejected message)."""
    return record_encoder(avro.codec("deadletter"))


@lru_cache(maxsize=4096)
def deadletter_topic(topic: str) -> str:
    """Where dead letters of ``topic`` go: its pipeline's dead-letter topic, else the shared one."""
    pipeline = topics.pipeline_of(topic)
    return topics.PipelineTopics(pipeline).deadletter if pipeline else topics.DEADLETTER


@dataclass
class Outputs:
    """Messages a handler wants produced, in order, plus how many dead letters are among them."""

    service: str
    items: list[Out] = field(default_factory=list)
    dead_letters: int = 0
    max_deadletter_bytes: int | None = None
    callbacks: list[Callable[[], None]] = field(default_factory=list)
    sent_callbacks: list[Callable[[], None]] = field(default_factory=list)
    #: Partitions to rewind to (and pause at) instead of committing past them: input kept for later.
    held: list[TopicPartition] = field(default_factory=list)

    def hold(self, positions: Sequence[TopicPartition]) -> None:
        """Do not commit past these positions; rewind
        there and pause (the handler resumes later)."""
        self.held.extend(positions)

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once these outputs are committed (e.g. count them in the metrics)."""
        self.callbacks.append(callback)

    def on_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once these outputs are handed to Kafka for good: before the next batch
        is processed, perhaps before the commit (state the next batch must see, e.g. event ids)."""
        self.sent_callbacks.append(callback)

    def send(self, topic: str, value: bytes | None, key: bytes | str | None = None,
             headers: Headers | None = None, partition: int | None = None) -> None:
        """Queue one message."""
        self.items.append(Out(topic, value, key, headers, partition))

    def dead(self, m: Message, rule: str, message: str, field_name: str | None = None) -> None:
        """Queue the dead letter of ``m``; its reason also travels as headers (for kcat -f '%h')."""
        topic, record = dead_letter(m, self.service, rule, message, field_name,
                                    self.max_deadletter_bytes)
        headers = [("loopline.rule", rule.encode()),
                   ("loopline.field", (field_name or "").encode()),
                   ("loopline.reason", record["message"].encode()),
                   ("loopline.deadletter_id", record["deadletter_id"].encode())]
        self.items.append(Out(topic, _deadletter_encoder()(record), m.key(), headers))
        self.dead_letters += 1

    def extend(self, other: Outputs) -> None:
        """Append everything ``other`` queued."""
        self.items.extend(other.items)
        self.dead_letters += other.dead_letters
        self.callbacks.extend(other.callbacks)
        self.sent_callbacks.extend(other.sent_callbacks)
        self.held.extend(other.held)

    def sent(self) -> None:
        """Run the sent callbacks (the loop calls this once the outputs went out for good)."""
        for callback in self.sent_callbacks:
            callback()
        self.sent_callbacks.clear()

    def committed(self) -> None:
        """Run the commit callbacks (the loop calls this after a successful commit)."""
        self.sent()
        for callback in self.callbacks:
            callback()
        self.callbacks.clear()

    def __len__(self) -> int:
        return len(self.items) + len(self.callbacks) + len(self.sent_callbacks) + len(self.held)
