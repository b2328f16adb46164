"""The inference loop: decode a batch of feature events, route, score once per variant, produce.

Registry events are read between batches; a changed deployment is applied before the next
batch is scored, so each batch is scored under exactly one plan: no served prediction is lost
or doubled by a swap. Processing is at-least-once through :func:`loopline.kafka.run_batches`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Message

from loopline import avro, topics
from loopline.alerts import alert_event, send_alert
from loopline.artifacts import ArtifactStore
from loopline.errors import LooplineError, SchemaError
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.observability import Health
from loopline.registry import RegistryReader, RegistryState, now_ms
from loopline.services.inference.metrics import InferenceMetrics
from loopline.services.inference.plan import ModelLoader, Plan, build_plan
from loopline.services.inference.settings import InferenceSettings
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)


def prediction_id(event_id: str, name: str, version: int, variant: str) -> str:
    """Deterministic id of one variant's prediction for one event."""
    return hashlib.blake2b(f"{event_id}|{name}|{version}|{variant}".encode(), digest_size=16).hexdigest()


def features_codec(state: RegistryState, pipeline: str) -> avro.Codec:
    """Codec of a pipeline's features topic (reading older spec versions where the registry keeps them)."""
    older = getattr(state, "features_codec", None)
    if older is not None:
        return older(pipeline)  # type: ignore[no-any-return]
    return avro.Codec(state.specs[pipeline].features_schema())


class InferenceService:
    """Holds the deployment plans and scores batches; see the module docstring."""

    def __init__(self, settings: InferenceSettings, kafka: KafkaConfig, producer: AckedProducer,
                 consumer: Consumer, metrics: InferenceMetrics, health: Health) -> None:
        self.settings = settings
        self.producer = producer
        self.consumer = consumer
        self.metrics = metrics
        self.health = health
        self.reader = RegistryReader(kafka, client_id="loopline-inference-registry")
        self.loader = ModelLoader(
            ArtifactStore.from_settings(settings), intra_op_threads=settings.intra_op_threads,
            warm_rows=settings.warm_rows, timeout_s=settings.model_load_timeout_s,
            on_refused=self._refused)
        self.plans: dict[str, Plan] = {}
        self.codecs: dict[str, avro.Codec] = {}
        self._spec_seen: dict[str, PipelineSpec] = {}
        self._topic_pipeline: dict[str, str] = {}
        self._subscribed: set[str] = set()
        self._encoder = avro.codec("prediction")
        self._last_poll = 0.0

    # ---- registry -----------------------------------------------------------------------------
    def start(self) -> None:
        """Read the whole registry, load what it deploys, subscribe; mark the service ready."""
        self.reader.catch_up()
        self._last_poll = time.monotonic()
        self.rebuild()
        # Loads run in the background; at start there is nothing to keep serving, so wait for them
        # (bounded: a load still running after the load timeout is refused by the next rebuild).
        self.loader.wait_idle(self.settings.model_load_timeout_s + 1.0)
        self.rebuild()
        served = sorted(self.plans)
        self.health.set_ready(True, f"serving {served}" if served else "no pipeline with a champion yet")

    def refresh(self) -> None:
        """Apply new registry events (at most every ``registry_poll_s``)."""
        now = time.monotonic()
        if now - self._last_poll < self.settings.registry_poll_s:
            return
        self._last_poll = now
        if self.reader.poll(0.0) or self.loader.has_news():
            self.rebuild()

    def _wanted(self) -> list[str]:
        state = self.reader.state
        return [p for p in (self.settings.pipelines or sorted(state.specs)) if p in state.specs]

    def rebuild(self) -> None:
        """Recompute every pipeline's plan from the registry state; swap the changed ones.

        Never waits for a model: versions still loading are left out until a later rebuild.
        """
        self.loader.settle()  # take in finished loads; refuse failed and timed-out ones (alerts)
        state = self.reader.state
        for pipeline in self._wanted():
            spec = state.specs[pipeline]
            old = self.plans.get(pipeline)
            try:
                if self._spec_seen.get(pipeline) is not spec:
                    self.codecs[pipeline] = features_codec(state, pipeline)
                    self._spec_seen[pipeline] = spec
                    self._topic_pipeline[spec.topics.features] = pipeline
                plan = build_plan(pipeline, spec, state, self.loader, old)
            except Exception as e:  # noqa: BLE001 - one pipeline's failure never stalls another
                log.exception("plan_failed", extra={"pipeline": pipeline, "error": str(e)[:300]})
                continue
            if plan is None or (old is not None and plan.signature() == old.signature()):
                continue
            self.plans[pipeline] = plan
            self._publish_info(old, plan)
            self.metrics.swaps.labels(pipeline).inc()
            log.info("plan_changed", extra={"pipeline": pipeline, "plan": [
                f"{v}:{n}:v{ver}:{t:g}" for v, n, ver, _, t in plan.signature()]})
        self.loader.keep_only({(p, v.record["name"], v.record["version"])
                               for p, plan in self.plans.items() for v in [*plan.served, *plan.shadows]})
        wanted = {self.reader.state.specs[p].topics.features for p in self.plans}
        if wanted != self._subscribed:
            self.health.expect_assignment()
            self.consumer.subscribe(sorted(wanted), on_assign=self.health.assigned)
            self._subscribed = wanted
            log.info("subscribed", extra={"topics": sorted(wanted)})
            self.health.set_ready(True, f"serving {sorted(self.plans)}")
        if len(self.producer.producer):
            self.producer.confirm()  # alerts about refused versions

    def _publish_info(self, old: Plan | None, new: Plan) -> None:
        for plan, value in ((old, None), (new, 1)):
            if plan is None:
                continue
            for v in [*plan.served, *plan.shadows]:
                name, version, sha = v.ident
                labels = (plan.pipeline, v.variant, name, str(version), sha[:16])
                if value is None:
                    try:
                        self.metrics.model_info.remove(*labels)
                    except KeyError:
                        pass
                else:
                    self.metrics.model_info.labels(*labels).set(1)

    def _refused(self, pipeline: str, record: dict[str, Any], reason: str) -> None:
        self.metrics.model_loads.labels(pipeline, "refused").inc()
        event = alert_event(pipeline, "model_load", f"model version refused, current model keeps serving: "
                            f"{reason}", model_name=record["name"], model_version=record["version"],
                            episode=record["sha256"])
        send_alert(self.producer, event)

    # ---- batches ------------------------------------------------------------------------------
    def idle(self) -> None:
        """Between batches when nothing arrived: follow the registry, stay live."""
        self.health.beat()
        self.refresh()

    def handle(self, batch: list[Message]) -> None:
        """Score one batch (the loop stores its offsets once everything produced is acknowledged)."""
        self.health.beat()
        self.refresh()
        self.metrics.batch_size.observe(len(batch))
        by_topic: dict[str, list[Message]] = defaultdict(list)
        for m in batch:
            by_topic[m.topic()].append(m)
        for topic, messages in by_topic.items():
            pipeline = self._topic_pipeline.get(topic)
            plan = self.plans.get(pipeline) if pipeline else None
            if pipeline is None or plan is None:
                raise LooplineError(f"inference: no deployment for topic {topic} (partition "
                                    f"{messages[0].partition()}, offset {messages[0].offset()})")
            self._score(pipeline, plan, messages)

    def _decode(self, pipeline: str, messages: list[Message]) -> tuple[list[Message], list[dict[str, Any]]]:
        decode = self.codecs[pipeline].decode
        good: list[Message] = []
        events: list[dict[str, Any]] = []
        for m in messages:
            try:
                events.append(decode(m.value()))
                good.append(m)
            except SchemaError as e:
                self._dead_letter(pipeline, m, e)
        return good, events

    def _dead_letter(self, pipeline: str, m: Message, error: SchemaError) -> None:
        self.metrics.bad_events.labels(pipeline).inc()
        log.warning("bad_feature_event", extra={"topic": m.topic(), "partition": m.partition(),
                                                "offset": m.offset(), "error": str(error)})
        ts_type, ts = m.timestamp()
        record = {"original": m.value() or b"", "original_key": m.key(),
                  "source": {"topic": m.topic(), "partition": m.partition(), "offset": m.offset()},
                  "source_timestamp": ts if ts_type else None, "field": None, "rule": "schema",
                  "message": str(error), "service": "inference", "at": now_ms()}
        self.producer.send(topics.PipelineTopics(pipeline).deadletter, avro.codec("deadletter").encode(record),
                           key=m.key())

    def _score(self, pipeline: str, plan: Plan, messages: list[Message]) -> None:
        good, events = self._decode(pipeline, messages)
        n = len(events)
        if n == 0:
            return
        features = [e["features"] for e in events]
        keys = [e["key"] or e["event_id"] for e in events]
        route = plan.route(keys)
        feeds_cache: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
        out_topic = topics.PipelineTopics(pipeline).predictions
        sent_at = 0
        for i, variant in enumerate([*plan.served, *plan.shadows]):
            served = variant.variant != "shadow"
            if not served or route is None:
                idx = None
            else:
                idx = np.flatnonzero(route == i)
                if idx.size == 0:
                    continue
            scorer = variant.scorer
            sig = (scorer.single, tuple(scorer.columns))
            feeds = feeds_cache.get(sig)
            if feeds is None:
                feeds = feeds_cache[sig] = scorer.feeds(features)
            rows = n if idx is None else idx.size
            sub = feeds if idx is None else {k: v[idx] for k, v in feeds.items()}
            t0 = time.perf_counter()
            result = scorer.parse(scorer.run(sub), rows)
            self.metrics.scoring.labels(pipeline, variant.variant).observe(time.perf_counter() - t0)
            self._produce(pipeline, out_topic, variant, served, good, events,
                          range(n) if idx is None else idx.tolist(), result)
            self.metrics.predictions.labels(pipeline, variant.variant, str(served).lower()).inc(rows)
        sent_at = now_ms()
        self.metrics.events.labels(pipeline).inc(n)
        ts = np.fromiter((e["ts"] for e in events), dtype=np.float64, count=n)
        self.metrics.end_to_end.observe_many(np.maximum(sent_at - ts, 0.0) / 1000.0, pipeline)

    def _produce(self, pipeline: str, out_topic: str, variant: Any, served: bool, messages: list[Message],
                 events: list[dict[str, Any]], rows: Any, result: Any) -> None:
        name, version, sha = variant.ident
        tag = variant.variant
        scored_at = now_ms()
        labels, values, scores = result.labels, result.values, result.scores
        records = []
        for j, i in enumerate(rows):
            e = events[i]
            m = messages[i]
            event_id = e["event_id"]
            records.append({
                "prediction_id": prediction_id(event_id, name, version, tag),
                "event_id": event_id, "key": e["key"], "pipeline": pipeline,
                "model_name": name, "model_version": version, "model_sha256": sha,
                "variant": tag, "served": served,
                "label": labels[j] if labels is not None else None,
                "value": values[j] if values is not None else None,
                "scores": scores[j] if scores is not None else {},
                "source": {"topic": m.topic(), "partition": m.partition(), "offset": m.offset()},
                "event_ts": e["ts"], "scored_at": scored_at,
            })
        send = self.producer.send
        for i, value in zip(rows, self._encoder.encode_many(records)):
            m = messages[i]
            send(out_topic, value, key=m.key() or events[i]["event_id"].encode())
