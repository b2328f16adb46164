"""Turn decoded topic records into lineage rows with fixed Arrow schemas."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from confluent_kafka import Message

from loopline.spec import PipelineSpec

_ARROW_TYPES = {"float": pa.float64(), "int": pa.int64(), "string": pa.string(), "bool": pa.bool_()}
_SOURCE = [("_topic", pa.string()), ("_partition", pa.int32()), ("_offset", pa.int64())]

PREDICTIONS = pa.schema([
    ("prediction_id", pa.string()), ("event_id", pa.string()), ("key", pa.string()),
    ("model_name", pa.string()), ("model_version", pa.int32()), ("model_sha256", pa.string()),
    ("variant", pa.string()), ("served", pa.bool_()), ("label", pa.string()),
    ("value", pa.float64()), ("scores", pa.map_(pa.string(), pa.float64())),
    ("features_topic", pa.string()), ("features_partition", pa.int32()),
    ("features_offset", pa.int64()),
    ("event_ts", pa.timestamp("ms", tz="UTC")), ("scored_at", pa.timestamp("ms", tz="UTC")),
    *_SOURCE,
])

FEEDBACK = pa.schema([
    ("feedback_id", pa.string()), ("prediction_id", pa.string()), ("event_id", pa.string()),
    ("label", pa.string()), ("value", pa.float64()), ("verdict", pa.string()),
    ("ts", pa.timestamp("ms", tz="UTC")), *_SOURCE,
])


def features_schema(spec: PipelineSpec) -> pa.Schema:
    """Arrow schema of a pipeline's features table (one struct column for the features)."""
    struct = pa.struct([(f.name, _ARROW_TYPES[f.type]) for f in spec.features])
    return pa.schema([
        ("event_id", pa.string()), ("key", pa.string()), ("ts", pa.timestamp("ms", tz="UTC")),
        ("ingested_at", pa.timestamp("ms", tz="UTC")), ("raw_topic", pa.string()),
        ("raw_partition", pa.int32()), ("raw_offset", pa.int64()), ("features", struct),
        ("content_hash", pa.string()), *_SOURCE,
    ])


def _source(msg: Message) -> dict[str, Any]:
    return {"_topic": msg.topic(), "_partition": msg.partition(), "_offset": msg.offset()}


def prediction_row(record: dict[str, Any], msg: Message) -> dict[str, Any]:
    """A predictions-table row."""
    src = record["source"]
    return {
        **{k: record[k] for k in ("prediction_id", "event_id", "key", "model_name", "model_version",
                                   "model_sha256", "variant", "served", "label", "value",
                                  "event_ts",
                                   "scored_at")},
        "scores": list(record["scores"].items()),
        "features_topic": src["topic"], "features_partition": src["partition"],
        "features_offset": src["offset"], **_source(msg),
    }


def feature_row(record: dict[str, Any], msg: Message) -> dict[str, Any]:
    """A features-table row."""
    src = record["source"]
    return {"event_id": record["event_id"], "key": record["key"], "ts": record["ts"],
            "ingested_at": record["ingested_at"], "raw_topic": src["topic"],
            "raw_partition": src["partition"],
            "raw_offset": src["offset"], "features": record["features"],
            "content_hash": record.get("content_hash"), **_source(msg)}


def feedback_row(record: dict[str, Any], msg: Message) -> dict[str, Any]:
    """A feedback-table row."""
    return {**{k: record[k] for k in ("feedback_id", "prediction_id", "event_id", "label", "value",
                                      "verdict", "ts")},
            **_source(msg)}
