"""Python SDK for the people around a pipeline: producers, prediction consumers, feedback senders.

Every client finds the broker as the CLI does (``LOOPLINE_*`` variables, else the broker that
``loopline broker``/``up`` recorded in ``LOOPLINE_HOME``); pass ``settings`` to choose another.
With ``examples/fraud.yaml`` applied, a champion registered and ``loopline up`` running::

    import uuid

    from loopline.sdk import EventProducer, FeedbackSender, PredictionReader

    event_id = f"sdk-{uuid.uuid4()}"   # the idempotency key: an event sent twice counts once
    with EventProducer("fraud") as events:   # invalid events raise here, naming field and rule
        events.publish({"customer_id": "c42", "amount": 12.5, "merchant_risk": 0.7, "hour": 3,
                        "country": "NL", "card_present": False}, key="c42", event_id=event_id)
    with PredictionReader("fraud", group_id="billing") as reader:   # served ones, at-least-once
        prediction = next(p for p in reader if p["event_id"] == event_id)
    with FeedbackSender("fraud") as fb:
        fb.send(prediction_id=prediction["prediction_id"], label="1")
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Self

import orjson
from confluent_kafka import KafkaError

from loopline import avro, feedback
from loopline.errors import FeedbackError, LooplineError, ValidationError
from loopline.kafka import AckedProducer, KafkaConfig, release_producer
from loopline.registry import RegistryReader
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec
from loopline.topics import check_pipeline_name
from loopline.validation import Rejection, Validator


def load_spec(kafka: KafkaConfig, pipeline: str) -> PipelineSpec:
    """The pipeline's current spec from the registry."""
    check_pipeline_name(pipeline)  # a clear error before any broker round trip
    reader = RegistryReader(kafka, client_id="loopline-sdk")
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    if pipeline not in state.specs:
        known = ", ".join(sorted(state.specs)) or "none"
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry (known: {known}); "
                            "`loopline apply` it first")
    return state.specs[pipeline]


class _Client:
    """A producing client: ``with`` it, or call :meth:`close` (which flushes) when done."""

    def __init__(self, pipeline: str, settings: LooplineSettings | None = None) -> None:
        self.kafka = KafkaConfig.from_settings(settings or LooplineSettings())
        self.spec = load_spec(self.kafka, pipeline)
        self._producer = AckedProducer(self.kafka.producer(f"loopline-sdk-{pipeline}"))
        self._closed = False

    def flush(self) -> None:
        """Wait until everything sent is acknowledged by Kafka (raises if anything failed)."""
        self._producer.confirm()

    def close(self, *, discard: bool = False) -> None:
        """Flush (or, with ``discard``, drop what is still queued) and release the client."""
        if self._closed:
            return
        try:
            if not discard:
                self.flush()
        finally:
            self._closed = True
            release_producer(self._producer.producer)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(discard=exc is not None)


class EventProducer(_Client):
    """Publishes events to ``loopline.<pipeline>.raw`` after validating them against the spec."""

    def __init__(self, pipeline: str, settings: LooplineSettings | None = None) -> None:
        super().__init__(pipeline, settings)
        self._validator = Validator(self.spec)

    def publish(self, features: dict[str, Any], *, key: str | None = None,
                event_id: str | None = None, ts: int | str | None = None) -> None:
        """Validate one event and queue it; raise :class:`ValidationError` if it does not fit."""
        doc: dict[str, Any] = {"features": features}
        for name, value in (("key", key), ("event_id", event_id), ("ts", ts)):
            if value is not None:
                doc[name] = value
        verdict = self._validator.check(doc)
        if isinstance(verdict, Rejection):
            raise ValidationError(verdict.field, verdict.rule, verdict.message)
        partition_key = key or (str(features[self.spec.key]) if self.spec.key
                                and self.spec.key in features else None)
        self._producer.send(self.spec.topics.raw, orjson.dumps(doc), key=partition_key)


class FeedbackSender(_Client):
    """Sends labels and verdicts to ``loopline.<pipeline>.feedback``."""

    def send(self, *, prediction_id: str | None = None, event_id: str | None = None,
             label: str | None = None, value: float | None = None, verdict: str | None = None,
             feedback_id: str | None = None) -> str:
        """Validate and queue one feedback; return its feedback_id."""
        try:
            record = feedback.make(prediction_id=prediction_id, event_id=event_id, label=label,
                                   value=value, verdict=verdict, feedback_id=feedback_id,
                                   classes=self.spec.label.classes)
        except FeedbackError as e:
            raise ValidationError(e.field, e.rule, str(e)) from None
        self._producer.send(self.spec.topics.feedback, feedback.encode(record),
                            key=record["prediction_id"] or record["event_id"])
        return str(record["feedback_id"])


class PredictionReader:
    """Iterates a pipeline's predictions as dicts, in a consumer group, each prediction_id once."""

    def __init__(self, pipeline: str, group_id: str, *, served_only: bool = True,
                 settings: LooplineSettings | None = None, poll_timeout_s: float = 1.0,
                 seen_max: int = 100_000) -> None:
        self.kafka = KafkaConfig.from_settings(settings or LooplineSettings())
        self.spec = load_spec(self.kafka, pipeline)
        self.served_only = served_only
        self.poll_timeout_s = poll_timeout_s
        self._codec = avro.codec("prediction")
        # Never transactional: a reader commits what it handled itself, on any broker (the
        # services' consumers leave commits to their transactions on exactly-once).
        self._consumer = self.kafka.consumer(f"loopline-sdk-{pipeline}", group_id,
                                             **{"enable.auto.commit": True})
        self._consumer.subscribe([self.spec.topics.predictions])
        self._handed_out: list[Any] = []
        # A service retrying a batch after a crash re-produces its predictions with the same
        # prediction_id; a reader should see each once. Bounded: the retry window is short.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_max = seen_max
        self._closed = False

    def poll(self, max_messages: int = 500) -> list[dict[str, Any]]:
        """The predictions that arrived within the poll timeout (possibly none).

        Calling poll again marks the previous batch as handled (its offsets are stored then), so
        a reader that crashes mid-batch gets that batch again: at-least-once.
        """
        for m in self._handed_out:
            self._consumer.store_offsets(m)
        self._handed_out = []
        out = []
        for m in self._consumer.consume(max_messages, self.poll_timeout_s):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise LooplineError(f"reading {self.spec.topics.predictions}: {err.str()}")
                continue
            record = self._codec.decode(m.value())
            self._handed_out.append(m)
            if record["prediction_id"] in self._seen:
                continue
            self._seen[record["prediction_id"]] = None
            if len(self._seen) > self._seen_max:
                self._seen.popitem(last=False)
            if record["served"] or not self.served_only:
                out.append(record)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every served prediction, as it arrives (endless: break out, or ``next`` one)."""
        while True:
            yield from self.poll()

    def close(self) -> None:
        """Store the last batch as handled, commit and leave the group."""
        if self._closed:
            return
        self._closed = True
        try:
            for m in self._handed_out:
                self._consumer.store_offsets(m)
        finally:
            self._consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
