"""The monitor's main loop: follow the registry, consume every pipeline's topics, alert, checkpoint.

State (detectors, windows, joins, open episodes) is checkpointed together with the offset of the
last message folded into it, and consumer offsets are stored only after a checkpoint is written.
After a crash the consumer resumes at or before the checkpoint and messages the checkpoint
already covers are skipped, so no event is learned twice and none is lost.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from loopline import avro, feedback
from loopline.alerts import send_alert
from loopline.errors import LooplineError
from loopline.kafka import AckedProducer, StopFlag
from loopline.observability import Health
from loopline.registry import RegistryReader, RegistryState, now_ms
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Alert, Batch, PipelineMonitor, Tuning
from loopline.services.monitor.readers import ReaderOffsets, furthest
from loopline.services.monitor.settings import MonitorSettings
from loopline.services.monitor.state import Checkpoint
from loopline.topics import PipelineTopics, pipeline_of

log = logging.getLogger(__name__)

KIND_ORDER = ("deadletter", "features", "predictions", "feedback")  # feedback after the predictions it joins
# The fields the monitor reads of each kind, as an Avro reader would project them: the others are
# skipped while decoding, never built (a third of the decoding cost of a prediction, half of a
# feature event's: bench/avro_decode.py).
READS: dict[str, tuple[str, ...] | None] = {
    "features": ("features",),
    "predictions": ("prediction_id", "event_id", "model_name", "model_version", "variant", "served",
                    "label", "value", "scores", "scored_at"),
    "deadletter": None,
}
_OFFSET = Message.offset


def _partition_of(m: Message) -> tuple[str, int]:
    return m.topic(), m.partition()


def checkpoint_path(settings: MonitorSettings, group_id: str) -> Path:
    """Where this consumer group's checkpoint lives."""
    folder = settings.state_dir or settings.home / "state" / "monitor"
    return folder / f"{group_id}.ckpt"


class MonitorService:
    """Holds one :class:`PipelineMonitor` per pipeline and routes consumed messages to them."""

    def __init__(self, settings: MonitorSettings, metrics: MonitorMetrics, producer: AckedProducer,
                 checkpoint: Checkpoint, clock: Callable[[], float] = time.time,
                 readers: ReaderOffsets | None = None) -> None:
        self.settings = settings
        self.readers = readers
        self.metrics = metrics
        self.producer = producer
        self.checkpoint = checkpoint
        self.clock = clock
        self.tuning = Tuning(settings.drift_eval_every, settings.resolve_after, settings.quality_alert_rate)
        restored = checkpoint.load()
        self.pipelines: dict[str, PipelineMonitor] = restored["pipelines"] if restored else {}
        self.offsets: dict[tuple[str, int], int] = restored["offsets"] if restored else {}
        self.restored = restored is not None
        self._codecs: dict[str, tuple[int, avro.Codec]] = {}
        self._routes: dict[str, tuple[str, str] | None] = {}  # topic -> (pipeline, kind) | None
        self._fixed = {k: avro.codec(k) for k in ("prediction", "deadletter")}
        self.watching_since: float | None = None  # when partitions were first assigned
        log.info("monitor_state", extra={"restored": self.restored, "pipelines": sorted(self.pipelines),
                                         "checkpoint": str(checkpoint.path)})

    # --- registry -----------------------------------------------------------------------------
    def sync(self, state: RegistryState) -> bool:
        """Adopt new pipelines and registry changes; return whether the set of topics changed."""
        wanted = set(self.settings.pipelines) if self.settings.pipelines else None
        before = set(self.pipelines)
        for name, spec in state.specs.items():
            if wanted is not None and name not in wanted:
                continue
            pm = self.pipelines.get(name)
            if pm is None:
                pm = self.pipelines[name] = PipelineMonitor(spec, self.tuning)
            history = len(state.features_schemas.get(name, []))
            if self._codecs.get(name, (None,))[0] != history:
                # Reads events written under every earlier version of the spec, too.
                self._codecs[name] = (history, state.features_codec(name))
            pm.refresh(state)
        self._routes.clear()  # a topic of a pipeline adopted just now was routed nowhere so far
        return set(self.pipelines) != before

    def topics(self) -> list[str]:
        """Every topic the monitor reads."""
        out = []
        for name in sorted(self.pipelines):
            t = PipelineTopics(name)
            out += [t.features, t.predictions, t.feedback, t.deadletter]
        return out

    # --- batches ------------------------------------------------------------------------------
    def handle(self, messages: list[Message]) -> list[Alert]:
        """Fold a batch of data messages into the state; return the alert events it caused."""
        grouped: dict[tuple[str, str], list[Message]] = {}
        last: dict[tuple[str, int], int] = {}  # highest offset seen per partition in this batch
        offsets, routes = self.offsets, self._routes
        # A consumed batch comes in runs of one partition's messages: route and check each run once.
        for key, group in groupby(messages, _partition_of):
            topic = key[0]
            try:
                route = routes[topic]
            except KeyError:
                route = routes[topic] = self._route(topic)
            if route is None:
                continue
            run = list(group)
            done = offsets.get(key, -1)
            if min(map(_OFFSET, run)) <= done:  # redelivered after a restart: already in the state
                run = [m for m in run if m.offset() > done]
                if not run:
                    continue
            grouped.setdefault(route, []).extend(run)
            high = max(map(_OFFSET, run))
            if high > last.get(key, -1):
                last[key] = high
        alerts: list[Alert] = []
        at = now_ms()
        for pipeline in sorted({p for p, _ in grouped}):
            pm = self.pipelines[pipeline]
            for kind in KIND_ORDER:
                msgs = grouped.get((pipeline, kind))
                if not msgs:
                    continue
                batch = self._decode(pipeline, kind, msgs)
                self.metrics.events.labels(pipeline, kind).inc(len(msgs))
                if batch.records:
                    if kind == "predictions":
                        alerts += pm.on_predictions(batch, self.metrics, at, self.clock())
                    else:
                        handler = {"features": pm.on_features, "feedback": pm.on_feedback,
                                   "deadletter": pm.on_dead_letters}[kind]
                        alerts += handler(batch, self.metrics, at)
        self.offsets.update(last)  # only messages not already covered got into `last`
        return alerts

    def _route(self, topic: str) -> tuple[str, str] | None:
        """The (pipeline, kind) a topic's messages go to; None if no monitored pipeline owns it."""
        pipeline = pipeline_of(topic)
        if pipeline is None or pipeline not in self.pipelines:
            return None
        return pipeline, topic.rsplit(".", 1)[1]

    def _decode(self, pipeline: str, kind: str, msgs: list[Message]) -> Batch:
        results: Sequence[dict[str, Any] | LooplineError]
        if kind == "feedback":  # any client may send feedback, as Avro or as JSON
            results = feedback.decode_each(msgs, self.pipelines[pipeline].spec.label.classes)
        else:
            codec = (self._codecs[pipeline][1] if kind == "features"
                     else self._fixed["deadletter" if kind == "deadletter" else "prediction"])
            results = codec.decode_each(list(map(Message.value, msgs)), READS[kind])
        if not any(isinstance(r, LooplineError) for r in results):  # the usual case
            return Batch(cast("list[dict[str, Any]]", results), list(map(_OFFSET, msgs)),
                         list(map(Message.partition, msgs)), msgs[0].topic())
        records, offsets, partitions = [], [], []
        for m, r in zip(msgs, results):
            if isinstance(r, LooplineError):
                # An unreadable message must not stop monitoring; it is counted and named.
                self.metrics.events.labels(pipeline, f"{kind}_unreadable").inc()
                log.error("monitor_unreadable_message", extra={"topic": m.topic(), "error": str(r),
                                                               "partition": m.partition(),
                                                               "offset": m.offset()})
                continue
            records.append(r)
            offsets.append(m.offset())
            partitions.append(m.partition())
        return Batch(records, offsets, partitions, msgs[0].topic())

    def tick(self) -> list[Alert]:
        """Periodic checks of every pipeline (zombies, paused quality windows)."""
        if self.watching_since is None:
            return []  # not reading yet: no version can be called idle
        now = self.clock()
        alerts: list[Alert] = []
        for pm in self.pipelines.values():
            alerts += pm.tick(now, self.watching_since, self.metrics)
        return alerts

    def check_readers(self) -> None:
        """Ask the broker how far reader groups have read each pipeline's predictions."""
        if self.readers is None or not self.pipelines:
            return
        topics = {name: PipelineTopics(name).predictions for name in self.pipelines}
        try:
            committed = self.readers.committed(set(topics.values()))
        except KafkaException as e:
            # Without the admin API (or the right to use it) only traffic is checked; retried next time.
            log.warning("monitor_readers_unknown", extra={"error": str(e)})
            return
        for name, topic in topics.items():
            pm = self.pipelines[name]
            pm.readers(furthest(committed, topic, pm.spec.monitor.readers))

    def emit(self, alerts: list[Alert]) -> None:
        """Send alert events and reflect them in the metrics (delivery confirmed by the caller)."""
        for event in alerts:
            send_alert(self.producer, event)
            self.metrics.on_alert(event)
            fields = {k: event[k] for k in ("pipeline", "state", "severity", "signal", "feature", "detector",
                                             "model_name", "model_version", "statistic", "alert_id")}
            log.warning("monitor_alert", extra=dict(fields, text=event["message"]))  # 'message' is reserved

    def save(self, consumer: Consumer | None = None) -> None:
        """Checkpoint the state; then store the consumer offsets it covers."""
        size = self.checkpoint.save({"pipelines": self.pipelines, "offsets": dict(self.offsets)})
        self.metrics.checkpoint_bytes.set(size)
        if consumer is None or not self.offsets:
            return
        try:
            consumer.store_offsets(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in self.offsets.items()])
        except KafkaException as e:
            # Partitions revoked since: the checkpoint still covers them; a later store will do.
            log.info("monitor_offsets_not_stored", extra={"error": str(e)})

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.watching_since is None and partitions:
            self.watching_since = self.clock()

    # --- loop ---------------------------------------------------------------------------------
    def run(self, consumer: Consumer, registry: RegistryReader, stop: StopFlag, health: Health) -> None:
        """Consume until ``stop``; checkpoint on the way out (not after a failure)."""
        s = self.settings
        self.sync(registry.catch_up())
        tune_gc()
        subscribed = self.topics()
        if subscribed:
            consumer.subscribe(subscribed, on_assign=self._on_assign)
        health.set_ready(True, f"monitoring {len(self.pipelines)} pipeline(s)")
        last_registry = last_zombie = last_save = time.monotonic()
        last_readers = last_zombie - s.readers_check_s
        failed = False
        try:
            while not stop.is_set():
                health.beat()
                now = time.monotonic()
                if now - last_registry >= s.registry_poll_s:
                    last_registry = now
                    if registry.poll(0):
                        self.sync(registry.state)
                        if self.topics() != subscribed:
                            subscribed = self.topics()
                            consumer.subscribe(subscribed, on_assign=self._on_assign)
                alerts: list[Alert] = []
                if subscribed:
                    data = _data(consumer.consume(s.batch_size, s.batch_timeout_s))
                    if data:
                        alerts += self.handle(data)
                else:
                    stop.wait(s.batch_timeout_s)
                if now - last_readers >= s.readers_check_s:
                    last_readers = now
                    self.check_readers()
                if now - last_zombie >= s.zombie_check_s:
                    last_zombie = now
                    alerts += self.tick()
                if alerts:
                    self.emit(alerts)
                    self.producer.confirm()
                if now - last_save >= s.checkpoint_interval_s:
                    last_save = now
                    self.save(consumer)
        except BaseException:
            failed = True
            raise
        finally:
            try:
                if not failed:
                    self.save(consumer)
                self.producer.producer.flush(10)
            finally:
                consumer.close()


def tune_gc() -> None:
    """Collect garbage rarely and never walk the state restored at start (a large, long-lived heap)."""
    # Every message decodes into fresh dicts, so the default threshold (700 allocations) runs a
    # collection every few messages, and each older-generation pass walks the whole join and
    # detector state: about 10 % of the monitor's time. Its garbage is almost all acyclic and freed
    # by reference counting anyway.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _data(messages: list[Message]) -> list[Message]:
    out = []
    for m in messages:
        err = m.error()
        if err is None:
            out.append(m)
        elif err.code() != KafkaError._PARTITION_EOF:
            if err.fatal():
                raise KafkaException(err)
            log.warning("consume_error", extra={"error": err.str(), "topic": m.topic(), "partition": m.partition()})
    return out


def describe(alert: dict[str, Any]) -> str:
    """One line per alert, for people reading logs or tests."""
    return f"[{alert['state']}/{alert['severity']}] {alert['pipeline']} {alert['signal']}: {alert['message']}"
