"""The monitor: follow the registry, fold every owned pipeline's topics into its state, alert.

Its state (detectors, windows, joins, open episodes) lives per pipeline, the monitor's unit of
ownership: replicas split the pipelines between them through :class:`loopline.runtime.units.Units`,
which restores a pipeline's state from the changelog when it is assigned, reads its topics from the
offsets stored with that state, skips what the state already covers, and checkpoints it together
with the alerts it raised. :class:`MonitorService` itself is pure: it routes and decodes messages
and asks each :class:`PipelineMonitor` for alerts; :func:`serve` wires it to Kafka.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any, cast

from confluent_kafka import KafkaException, Message

from loopline import avro, feedback, topics
from loopline.alerts import alert_event
from loopline.errors import LooplineError
from loopline.observability import bounded
from loopline.registry import RegistryReader, RegistryState, now_ms
from loopline.runtime.incarnation import TopicIds
from loopline.runtime.loop import tune_gc
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.runtime.state import Changelog
from loopline.runtime.units import Input, Units, UnitsMetrics
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Alert, Batch, PipelineMonitor, Tuning
from loopline.services.monitor.readers import ReaderOffsets, furthest
from loopline.services.monitor.settings import MonitorSettings
from loopline.topics import PipelineTopics, pipeline_of

log = logging.getLogger(__name__)

SERVICE = "monitor"
#: The unit that owns the registry's invalid records (not a pipeline name: those start with a
#: letter).
REGISTRY_UNIT = "_registry"

# feedback after the predictions it joins
KIND_ORDER = ("deadletter", "features", "predictions", "feedback")
# The fields the monitor reads of each kind, as an Avro reader would project them: the others are
# skipped while decoding, never built (a third of the decoding cost of a prediction, half of a
# feature event's: bench/avro_decode.py).
READS: dict[str, tuple[str, ...] | None] = {
    "features": ("features",),
    "predictions": ("prediction_id", "event_id", "model_name", "model_version", "variant", "served",
                    "label", "value", "scores", "scored_at"),
    "deadletter": None,
}


def _partition_of(m: Message) -> tuple[str, int]:
    return m.topic(), m.partition()


class MonitorService:
    """Holds one :class:`PipelineMonitor` per pipeline and routes consumed messages to them."""

    def __init__(self, settings: MonitorSettings, metrics: MonitorMetrics,
                 clock: Callable[[], float] = time.time,
                 readers: ReaderOffsets | None = None) -> None:
        self.settings = settings
        self.readers = readers
        self.metrics = metrics
        self.clock = clock
        self.tuning = Tuning(settings.drift_eval_every, settings.resolve_after,
                             settings.quality_alert_rate)
        self.pipelines: dict[str, PipelineMonitor] = {}
        self.state = RegistryState()
        self._codecs: dict[str, tuple[int, avro.Codec]] = {}
        self._routes: dict[str, tuple[str, str] | None] = {}  # topic -> (pipeline, kind) | None
        self._fixed = {k: avro.codec(k) for k in ("prediction", "deadletter")}
        self.watching_since: float | None = None  # when the first pipeline was taken over
        self._readers_unknown = False

    # --- registry -----------------------------------------------------------------------------
    def wanted(self, state: RegistryState) -> list[str]:
        """The registry's pipelines this monitor serves (LOOPLINE_PIPELINES, else all)."""
        return [n for n in sorted(state.specs) if not self.settings.pipelines
                or n in self.settings.pipelines]

    def sync(self, state: RegistryState) -> None:
        """Follow the registry: new specs, reference
        profiles, champions of the pipelines held here."""
        self.state = state
        for name, pm in self.pipelines.items():
            if name in state.specs:
                self._codec(name)
                pm.refresh(state)
        self._routes.clear()

    def _codec(self, name: str) -> None:
        history = len(self.state.features_schemas.get(name, []))
        if self._codecs.get(name, (None,))[0] != history:
            # Reads events written under every earlier version of the spec, too.
            self._codecs[name] = (history, self.state.features_codec(name))

    def adopt(self, name: str, restored: PipelineMonitor | None) -> None:
        """Hold a pipeline: its restored state, or a fresh one."""
        pm = restored if restored is not None else PipelineMonitor(self.state.specs[name],
                                                                   self.tuning)
        self.pipelines[name] = pm
        self._codec(name)
        pm.refresh(self.state)
        self._routes.clear()
        if self.watching_since is None:
            self.watching_since = self.clock()

    def release(self, name: str) -> None:
        """Stop holding a pipeline (another replica owns it now)."""
        self.pipelines.pop(name, None)
        self._routes.clear()

    @staticmethod
    def inputs(name: str) -> list[str]:
        """The topics the monitor reads of a pipeline."""
        t = PipelineTopics(name)
        return [t.features, t.predictions, t.feedback, t.deadletter]

    # --- batches ------------------------------------------------------------------------------
    def handle(self, messages: list[Message]) -> list[Alert]:
        """Fold a batch of data messages into the state; return the alert events it caused."""
        grouped: dict[tuple[str, str], list[Message]] = {}
        routes = self._routes
        # A consumed batch comes in runs of one partition's messages: route each run once.
        for key, group in groupby(messages, _partition_of):
            topic = key[0]
            try:
                route = routes[topic]
            except KeyError:
                route = routes[topic] = self._route(topic)
            if route is not None:
                grouped.setdefault(route, []).extend(group)
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
                if not batch.records:
                    continue
                try:
                    if kind == "predictions":
                        alerts += pm.on_predictions(batch, self.metrics, at, self.clock())
                    else:
                        handler = {"features": pm.on_features, "feedback": pm.on_feedback,
                                   "deadletter": pm.on_dead_letters}[kind]
                        alerts += handler(batch, self.metrics, at)
                except Exception:  # one pipeline's failure must not stop the others
                    # Its state may be partly updated: the batch is counted as skipped, never
                    # retried (a retry after a restart would fail the same way: a crash loop).
                    self.metrics.events.labels(pipeline, f"{kind}_failed").inc(len(msgs))
                    log.exception("monitor_pipeline_failed", extra={
                        "pipeline": pipeline, "kind": kind, "topic": msgs[0].topic(),
                        "first_offset": msgs[0].offset(), "messages": len(msgs)})
        return alerts

    def _route(self, topic: str) -> tuple[str, str] | None:
        """The (pipeline, kind) a topic's messages go to; None if no monitored pipeline owns it."""
        pipeline = pipeline_of(topic)
        if pipeline is None or pipeline not in self.pipelines:
            return None
        return pipeline, topic.rsplit(".", 1)[1]

    def _decode(self, pipeline: str, kind: str, msgs: list[Message]) -> Batch:
        results: Sequence[dict[str, Any] | LooplineError]
        # any client may send feedback, as Avro or as JSON; lineage dead-letters it
        if kind == "feedback":
            results = feedback.decode_each(msgs, self.pipelines[pipeline].spec.label.classes)
        else:
            codec = (self._codecs[pipeline][1] if kind == "features"
                     else self._fixed["deadletter" if kind == "deadletter" else "prediction"])
            results = codec.decode_each(list(map(Message.value, msgs)), READS[kind])
        if not any(isinstance(r, LooplineError) for r in results):  # the usual case
            return Batch(cast("list[dict[str, Any]]", results), list(map(Message.offset, msgs)),
                         list(map(Message.partition, msgs)), msgs[0].topic())
        records, offsets, partitions = [], [], []
        for m, r in zip(msgs, results):
            if isinstance(r, LooplineError):
                # An unreadable message must not stop monitoring; it is counted and named (another
                # service owns its dead letter: inference for features, lineage for the rest).
                self.metrics.events.labels(pipeline, f"{kind}_unreadable").inc()
                log.warning("monitor_unreadable_message", extra={"topic": m.topic(),
                                                                 "error": bounded(str(r)),
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
        predictions = {name: PipelineTopics(name).predictions for name in self.pipelines}
        try:
            committed = self.readers.committed(set(predictions.values()))
        except KafkaException as e:
            # Without the admin API (or the right to use it) only traffic is checked; retried next
            # time.
            level = logging.DEBUG if self._readers_unknown else logging.WARNING
            self._readers_unknown = True
            log.log(level, "monitor_readers_unknown", extra={"error": str(e)})
            return
        self._readers_unknown = False
        for name, topic in predictions.items():
            pm = self.pipelines[name]
            pm.readers(furthest(committed, topic, pm.spec.monitor.readers))

    def emit(self, alerts: list[Alert], out: Outputs) -> None:
        """Queue alert events (committed with the state
        that raised them) and reflect them in metrics."""
        codec = avro.codec("alert")
        for event in alerts:
            out.send(topics.ALERTS, codec.encode(event), key=event["pipeline"].encode())
            self.metrics.on_alert(event)
            fields = {k: event[k] for k in ("pipeline", "state", "severity", "signal", "feature",
                                            "detector",
                                             "model_name", "model_version", "statistic",
                                            "alert_id")}
            # 'message' is reserved
            log.warning("monitor_alert", extra=dict(fields, text=event["message"]))


class _Handler:
    """The monitor on the runtime loop: its units,
    the registry, timers; see the module docstring."""

    #: The shape of a pipeline's checkpointed state (PipelineMonitor and what it holds).
    #: 2: evidence-based alerts (issue 15): episodes, segment tests, degradation trackers.
    state_version = 2

    def __init__(self, rt: ServiceRuntime, settings: MonitorSettings,
                 service: MonitorService) -> None:
        self.rt = rt
        self.settings = settings
        self.service = service
        self.registry = RegistryReader(rt.kafka, f"{rt.group_id}-registry")
        self.units: Units | None = None
        self.judged: set[str] | None = None  # idents of invalid registry records already reported
        self._pending_rejects: list[Any] = []
        now = time.monotonic()
        self._next = {"registry": now, "zombies": now + settings.zombie_check_s, "readers": now}

    # UnitHandler: every pipeline is a unit, and so is the registry (its invalid records are
    # dead-lettered and alerted once, by whichever replica owns that unit).
    def known_units(self) -> list[str]:
        """The pipelines this monitor serves, and the registry."""
        return [*self.service.wanted(self.registry.state), REGISTRY_UNIT]

    def inputs(self, unit: str) -> list[Input]:
        """The topics of a pipeline the monitor reads, from the beginning for a fresh start."""
        if unit == REGISTRY_UNIT:
            return []  # the registry is read by every replica anyway
        return [Input(t) for t in MonitorService.inputs(unit)]

    def install(self, unit: str, state: Any | None) -> None:
        """Hold a pipeline with its restored state (or a fresh one)."""
        if unit == REGISTRY_UNIT:
            self.judged = set(state) if isinstance(state, (set, frozenset)) else set()
            # Everything the registry rejected so far is judged now (or was by a predecessor).
            self._pending_rejects = list(self.registry.state.rejected)
            return
        restored = state if isinstance(state, PipelineMonitor) else None
        self.service.adopt(unit, restored)

    def snapshot(self, unit: str) -> Any:
        """The pipeline's monitor (or the registry's judged records), to checkpoint."""
        if unit == REGISTRY_UNIT:
            return set(self.judged)  # type: ignore[arg-type]  # held: the registry unit has its set
        return self.service.pipelines[unit]

    def remove(self, unit: str) -> None:
        """Stop holding a pipeline."""
        if unit == REGISTRY_UNIT:
            self.judged = None
            return
        self.service.release(unit)

    def _judge_registry(self, out: Outputs) -> None:
        """Dead-letter and alert invalid registry records once (only the registry unit's owner)."""
        assert self.units is not None
        records = self._pending_rejects + self.registry.take_rejected()
        self._pending_rejects = []
        if self.judged is None:
            return  # another replica owns the registry unit
        codec = avro.codec("deadletter")
        for record in records:
            if record.ident in self.judged:
                continue
            self.judged.add(record.ident)
            letter = dict(record.deadletter(SERVICE), deadletter_id=record.ident)
            topic = PipelineTopics(record.pipeline).deadletter if record.pipeline and \
                record.pipeline in self.registry.state.specs else topics.DEADLETTER
            out.send(topic, codec.encode(letter), key=record.key)
            event = alert_event(
                record.pipeline or REGISTRY_UNIT, "registry_record",
                f"an invalid record on {record.topic} was skipped by every service "
                f"({record.summary()}); its original is kept on {topic}. Fix or re-publish it with "
                "`loopline apply` / `loopline models`; a record any client wrote there is "
                "untrusted input.",
                severity="warning", episode=record.ident, first_offset=record.offset)
            self.service.emit([event], out)
            self.units.touch(REGISTRY_UNIT)

    # Handler
    def process(self, batch: list[Message], out: Outputs) -> None:
        """Fold what the owned pipelines have not seen yet; queue the alerts."""
        assert self.units is not None
        fresh = self.units.observe(batch)
        if fresh:
            self.service.emit(self.service.handle(fresh), out)

    def tick(self, out: Outputs) -> None:
        """Registry changes, readers of the predictions, zombie checks."""
        assert self.units is not None
        now = time.monotonic()
        s = self.settings
        if now >= self._next["registry"]:
            self._next["registry"] = now + s.registry_poll_s
            if self.registry.poll(0):
                self.service.sync(self.registry.state)
                self.units.sync()
            self._judge_registry(out)
        if now >= self._next["readers"]:
            self._next["readers"] = now + s.readers_check_s
            self.service.check_readers()
        if now >= self._next["zombies"]:
            self._next["zombies"] = now + s.zombie_check_s
            alerts = self.service.tick()
            for event in alerts:
                self.units.touch(event["pipeline"])
            self.service.emit(alerts, out)
        served = len(self.service.pipelines)
        if self.units.assigned_once:
            self.rt.health.set_ready(True, f"monitoring {served} pipeline(s)")


def create(rt: ServiceRuntime, settings: MonitorSettings) -> MonitorService:
    """The monitor of a service process (its metrics in the runtime's registry)."""
    return MonitorService(settings, MonitorMetrics(rt.registry),
                          readers=ReaderOffsets(rt.kafka.admin("loopline-monitor"), rt.group_id))


def serve(rt: ServiceRuntime, settings: MonitorSettings,
          service: MonitorService | None = None) -> None:
    """Run the monitor until ``rt.stop`` is set (its units checkpointed on the way out)."""
    service = service or create(rt, settings)
    handler = _Handler(rt, settings, service)
    changelog = Changelog(rt.kafka, "monitor", settings.state_partitions)
    group = rt.kafka.consumer("loopline-monitor-units", rt.group_id)
    data = rt.kafka.reader(f"{rt.group_id}-data", **{"enable.partition.eof": False})
    units = Units("monitor", changelog, group, data, handler,
                  TopicIds(rt.kafka.admin("loopline-monitor")),
                  UnitsMetrics(rt.registry, "monitor"), settings.checkpoint_interval_s)
    handler.units = units
    try:
        service.sync(handler.registry.catch_up())
        tune_gc()
        rt.health.set_ready(False, "joining the monitor group")
        units.start()
        loop = rt.loop(data, rt.delivery(**{"message.max.bytes": 64 * 1024 * 1024}), handler,
                       bisect=False, checkpointer=units, group=group)
        units.commit_now = loop.commit_now
        loop.run()
    finally:
        handler.registry.close()


def describe(alert: dict[str, Any]) -> str:
    """One line per alert, for people reading logs or tests."""
    return (f"[{alert['state']}/{alert['severity']}] {alert['pipeline']} {alert['signal']}: "
            f"{alert['message']}")
