"""Feedback records (schemas/feedback.avsc), sent as Avro or as JSON by any client, decoded one way.

JSON form: ``{"feedback_id"?, "prediction_id"?, "event_id"?, "label"?, "value"?, "verdict"?,
"ts"?}`` with at least one of prediction_id/event_id and one of label/value/verdict. Without a
``feedback_id`` one is derived from the message itself (topic, partition, Kafka timestamp and the
bytes), never from its offset, so re-reading the same message gives the same id while a broker
that restarted empty (offsets from 0 again) cannot make a new message look like an old one.

This is the one feedback decoder and validator: the monitor, the trainer and lineage all read
feedback through :func:`decode_each`; lineage owns the dead letters of invalid feedback.
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from loopline import avro
from loopline.errors import FeedbackError, SchemaError
from loopline.observability import bounded

if TYPE_CHECKING:
    from confluent_kafka import Message

VERDICTS = ("accept", "reject", "correct")
_FIELDS = {"feedback_id", "prediction_id", "event_id", "label", "value", "verdict", "ts"}
_NAMESPACE = uuid.UUID("6f1b1c5e-4c1e-4b7e-9a57-3f0c9a4c2d10")
#: Largest feedback message accepted (a label is a class name, not a document).
MAX_BYTES = 64 * 1024
MAX_ID_CHARS = 256


def derived_id(topic: str, partition: int, timestamp_ms: int | None, data: bytes) -> str:
    """The feedback_id of a message that did not carry
    one: the same for every read of that message."""
    digest = hashlib.sha256(data).hexdigest()
    return str(uuid.uuid5(_NAMESPACE, f"{topic}:{partition}:{timestamp_ms}:{digest}"))


def check(record: dict[str, Any], classes: list[str] | None = None) -> dict[str, Any]:
    """Validate a feedback record; return it, or raise
    :class:`FeedbackError` naming field and rule."""
    if not record.get("prediction_id") and not record.get("event_id"):
        raise FeedbackError("prediction_id", "required",
                            "feedback needs a prediction_id or an event_id")
    if all(record.get(k) is None for k in ("label", "value", "verdict")):
        raise FeedbackError("label", "required", "feedback needs a label, a value or a verdict")
    for name in ("feedback_id", "prediction_id", "event_id", "label"):
        if record.get(name) is not None and not isinstance(record[name], str):
            raise FeedbackError(name, "type",
                                f"{name} must be a string, got {type(record[name]).__name__}")
        if record.get(name) is not None and len(record[name]) > MAX_ID_CHARS:
            raise FeedbackError(name, "size", f"{name} is {len(record[name])} characters; at most "
                                f"{MAX_ID_CHARS} (ids and class names are short)")
    value = record.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value)):
        raise FeedbackError("value", "type",
                            f"value must be a finite number, got {bounded(value, 60)}")
    if record.get("verdict") is not None and record["verdict"] not in VERDICTS:
        raise FeedbackError("verdict", "values",
                            f"verdict must be one of {', '.join(VERDICTS)}, got "
                            f"{bounded(record['verdict'], 60)}")
    if classes and record.get("label") is not None and record["label"] not in classes:
        raise FeedbackError("label", "values",
                            f"label {bounded(record['label'], 60)} is not one of the classes "
                            f"{classes}")
    ts = record.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise FeedbackError("ts", "timestamp",
                            f"ts must be epoch milliseconds, got {bounded(ts, 60)}")
    return record


def make(*, prediction_id: str | None = None, event_id: str | None = None, label: str | None = None,
         value: float | None = None, verdict: str | None = None, feedback_id: str | None = None,
         ts: int | None = None, classes: list[str] | None = None) -> dict[str, Any]:
    """Build and validate a feedback record (a new random feedback_id unless given)."""
    return check({"feedback_id": feedback_id or str(uuid.uuid4()), "prediction_id": prediction_id,
                  "event_id": event_id, "label": label,
                  "value": None if value is None else float(value),
                  "verdict": verdict, "ts": time.time_ns() // 1_000_000 if ts is None else ts},
                 classes)


def decode(data: bytes | None, topic: str, partition: int, timestamp_ms: int | None = None,
           classes: list[str] | None = None) -> dict[str, Any]:
    """Decode an Avro or JSON feedback message; raise :class:`FeedbackError` if it is not valid."""
    if data is None:
        raise FeedbackError(None, "tombstone",
                            "null message value (a tombstone): there is no feedback in it")
    if not data:
        raise FeedbackError(None, "empty", "empty feedback message")
    if len(data) > MAX_BYTES:
        raise FeedbackError(None, "size",
                            f"feedback message is {len(data)} bytes; at most {MAX_BYTES}")
    if data[:2] == avro.MAGIC:
        try:
            return check(avro.codec("feedback").decode(data), classes)
        except SchemaError as e:
            raise FeedbackError(None, "avro", str(e)) from None
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise FeedbackError(
            None, "json", f"feedback is neither Avro nor valid JSON: {bounded(str(e), 120)}"
        ) from None
    if not isinstance(doc, dict):
        raise FeedbackError(None, "type",
                            f"feedback JSON must be an object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise FeedbackError(bounded(unknown[0], 60), "unknown_field",
                            f"unknown feedback field {bounded(unknown[0], 60)}; fields are "
                            f"{', '.join(sorted(_FIELDS))}")
    label = doc.get("label")
    record = {
        "feedback_id": doc.get("feedback_id") or derived_id(topic, partition, timestamp_ms, data),
        "prediction_id": doc.get("prediction_id"), "event_id": doc.get("event_id"),
        # a label sent as a JSON number or bool is a class name all the same: "1", "true"
        "label": orjson.dumps(label).decode() if isinstance(label, int | float | bool) else label,
        "value": doc.get("value"), "verdict": doc.get("verdict"),
        "ts": doc.get("ts", timestamp_ms if timestamp_ms is not None and timestamp_ms >= 0 else 0),
    }
    return check(record, classes)


def decode_each(messages: Sequence[Message], classes: list[str] | None = None
                ) -> list[dict[str, Any] | FeedbackError]:
    """:func:`decode` a batch; an invalid message gets its :class:`FeedbackError` in its place."""
    values = [m.value() for m in messages]
    out: list[dict[str, Any] | FeedbackError] = []
    # Avro ones are decoded together; JSON ones come back as "bad magic" and are decoded one by one.
    for m, data, read in zip(messages, values, avro.codec("feedback").decode_each(values)):
        try:
            if data is not None and len(data) > MAX_BYTES:
                raise FeedbackError(None, "size",
                                    f"feedback message is {len(data)} bytes; at most {MAX_BYTES}")
            if isinstance(read, SchemaError):
                if data and data[:2] == avro.MAGIC:
                    raise FeedbackError(None, "avro", str(read))
                kind, ts = m.timestamp()
                out.append(decode(data, m.topic(), m.partition(), ts if kind and ts >= 0 else None,
                                  classes))
            else:
                out.append(check(read, classes))
        except FeedbackError as e:
            out.append(e)
    return out


def encode(record: dict[str, Any]) -> bytes:
    """Avro single-object encoding of a valid feedback record."""
    return avro.codec("feedback").encode(record)
