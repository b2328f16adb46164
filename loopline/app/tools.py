"""What `loopline produce`, `tail` and `feedback` do: files into topics, topics onto the screen."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, TopicPartition

from loopline import avro, feedback, topics
from loopline.errors import FeedbackError, LooplineError, SchemaError
from loopline.kafka import KafkaConfig
from loopline.registry import RegistryState
from loopline.spec import PipelineSpec

TOP_LEVEL = ("event_id", "key", "ts")


def _typed(value: str, ftype: str) -> Any:
    """A CSV cell as the feature's type; left as text
    when it does not parse (ingest explains why)."""
    try:
        if ftype == "float":
            return float(value)
        if ftype == "int":
            return int(value)
    except ValueError:
        return value
    if ftype == "bool" and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    return value


def read_events(path: Path, spec: PipelineSpec) -> Iterator[dict[str, Any]]:
    """Events from a CSV (a column per feature, optional event_id/key/ts) or JSON-lines file."""
    types = {f.name: f.type for f in spec.features}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                event: dict[str, Any] = {k: row[k] for k in TOP_LEVEL if row.get(k)}
                if "ts" in event and event["ts"].isdigit():
                    event["ts"] = int(event["ts"])
                event["features"] = {k: _typed(v, types.get(k, "string")) for k, v in row.items()
                                     if k not in TOP_LEVEL and v != ""}
                yield event
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        with path.open("rb") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    doc = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    raise LooplineError(f"{path}:{number}: not valid JSON: {e}") from None
                # A flat object is taken as the features themselves.
                yield doc if isinstance(doc, dict) and "features" in doc else {"features": doc}
    else:
        raise LooplineError(f"{path}: use a .csv or .jsonl file")


#: The columns of a feedback file besides the label (under the spec's label name, or ``label``).
FEEDBACK_COLUMNS = ("prediction_id", "event_id", "value", "verdict", "feedback_id")


def read_feedback(path: Path, spec: PipelineSpec) -> list[dict[str, Any]]:
    """Feedback rows of a CSV or JSON-lines file, as keyword arguments of ``FeedbackSender.send``.

    The true label is in the column named like the spec's label (``is_fraud``), or ``label``;
    for a regression pipeline that column holds the true value. Other columns:
    :data:`FEEDBACK_COLUMNS`. An unknown column is an error naming it (a typo would otherwise
    drop every label silently).
    """
    target = spec.label.name
    known = {*FEEDBACK_COLUMNS, "label", target}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            raw: list[dict[str, Any]] = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        raw = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise LooplineError(f"{path}:{number}: not valid JSON: {e}") from None
            if not isinstance(doc, dict):
                raise LooplineError(f"{path}:{number}: a feedback line must be a JSON object")
            raw.append(doc)
        columns = sorted({k for r in raw for k in r})
    else:
        raise LooplineError(f"{path}: use a .csv or .jsonl file")
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise LooplineError(f"{path}: unknown column(s) {', '.join(map(repr, unknown))}; feedback "
                            f"columns are {target!r} (or 'label'), {', '.join(FEEDBACK_COLUMNS)} "
                            "(rule: feedback_columns)")
    rows = []
    for number, r in enumerate(raw, 1):
        cells = {k: (None if v == "" else v) for k, v in r.items()}
        truth = [c for c in dict.fromkeys((target, "label")) if cells.get(c) is not None]
        if len(truth) > 1 and cells[target] != cells["label"]:
            raise LooplineError(f"{path}: row {number}: {target}={cells[target]!r} and "
                                f"label={cells['label']!r} disagree; give one (rule: one_label)")
        row = {k: cells.get(k) for k in FEEDBACK_COLUMNS}
        given = cells[truth[0]] if truth else None
        if spec.label.task == "regression":
            row["value"] = row["value"] if given is None else given
            row["label"] = None
        else:
            row["label"] = None if given is None else _label_text(given)
        if row["value"] is not None:
            try:
                row["value"] = float(row["value"])
            except (TypeError, ValueError):
                raise LooplineError(f"{path}: row {number}: value {row['value']!r} is not a number "
                                    "(rule: value_type)") from None
        rows.append(row)
    return rows


def _label_text(value: Any) -> str:
    """A label cell as the class name: JSON ``1`` and ``true`` are the classes "1" and "true"."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def count_lines(path: Path) -> int:
    """Events in a file, for the progress bar."""
    with path.open("rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - 1 if path.suffix.lower() == ".csv" else n


class Pacer:
    """Holds a steady rate (events per second); ``None`` means as fast as possible."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, sent: int) -> None:
        """Sleep until ``sent`` events are due."""
        if self.rate:
            delay = self.start + sent / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def decoder(kind: str, spec: PipelineSpec | None, state: RegistryState) -> Callable[[Any], Any]:
    """A function from a message to something printable, for a topic kind."""
    if kind == "raw":
        return lambda m: _raw(m.value())
    if kind == "features":
        codec = state.features_codec(spec.name) if spec else None
        return lambda m: codec.decode(m.value()) if codec else None
    if kind == "feedback":
        return lambda m: feedback.decode(m.value(), m.topic(), m.partition(), m.timestamp()[1])
    fixed = {"predictions": "prediction", "deadletter": "deadletter", "alerts": "alert"}[kind]
    codec = avro.codec(fixed)
    return lambda m: codec.decode(m.value())


def _raw(value: bytes | None) -> Any:
    try:
        return orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return {"bytes": len(value or b""), "text": (value or b"")[:200].decode("utf-8", "replace")}


def tail(kafka: KafkaConfig, topic: str, decode: Callable[[Any], Any], from_beginning: bool,
         limit: int | None, stop: Callable[[], bool],
         emit: Callable[[dict[str, Any]], None]) -> int:
    """Print a topic's messages (all partitions) until ``limit`` or ``stop()``; return how many."""
    consumer = kafka.reader("loopline-tail")
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        consumer.close()
        raise LooplineError(f"topic {topic} does not exist; `loopline apply` the pipeline first")
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in metadata.partitions])
    shown = 0
    try:
        while not stop() and (limit is None or shown < limit):
            for m in consumer.consume(100, 0.5):
                if m.error() is not None:
                    if m.error().code() != KafkaError._PARTITION_EOF:
                        raise LooplineError(f"reading {topic}: {m.error().str()}")
                    continue
                try:
                    value = decode(m)
                except (SchemaError, FeedbackError) as e:
                    value = {"undecodable": str(e)}
                emit({"partition": m.partition(), "offset": m.offset(),
                      "key": m.key().decode("utf-8", "replace") if m.key() else None,
                      "value": value})
                shown += 1
                if limit is not None and shown >= limit:
                    break
    finally:
        consumer.close()
    return shown


def topic_of(spec: PipelineSpec | None, kind: str) -> str:
    """The topic name of a kind (a pipeline's, or the global alerts topic)."""
    if kind == "alerts":
        return topics.ALERTS
    if spec is None:
        raise LooplineError("a pipeline is needed for that topic")
    return str(getattr(spec.topics, kind))
