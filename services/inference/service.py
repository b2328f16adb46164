"""The inference service: decode a batch of feature events, route, score once per variant, produce.

Registry events are read between batches; a changed deployment is applied before the next batch
is scored, so each batch is scored under exactly one plan: no served prediction is lost or doubled
by a swap. It runs on the runtime's loop (exactly once on Kafka, at least once elsewhere).

Failures stay with what caused them:

- each version is fed per its own input signature (names, dtypes, ranks), whatever the others need;
- a version whose run fails on a batch (exception, timeout, NaN/inf or wrong-shaped output) is
  retried on halves of it: if it fails on every event it is taken out of the plan — a shadow or
  challenger is dropped and its keys go back to the champion, a failing champion is replaced by the
  previous one (kept warm) — with an alert naming version, error and offset, and registry stage
  changes that say so; if it fails on some events only, those events are served by the champion
  (shadows skip them), and events the champion itself cannot score are dead-lettered with the
  reason;
- a pipeline left without any working version is paused (its partitions rewound, nothing lost)
  and readiness says so until a new version is deployed; other pipelines keep being served.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Message, TopicPartition

from loopline import avro, topics
from loopline.alerts import alert_event
from loopline.artifacts import ArtifactStore
from loopline.errors import LooplineError, SchemaError
from loopline.models import isolation_events
from loopline.observability import bounded
from loopline.registry import RegistryReader, RegistryState, now_ms
from loopline.runtime.delivery import Delivery
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.scoring import RunWatchdog, ScoreResult
from loopline.services.inference.metrics import InferenceMetrics
from loopline.services.inference.plan import ModelLoader, Plan, Variant, build_plan
from loopline.services.inference.settings import InferenceSettings
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

SERVICE = "inference"


def prediction_id(event_id: str, name: str, version: int, variant: str,
                  content_hash: str | None = None) -> str:
    """Deterministic id of one variant's prediction for one event (and its content, when known).

    A retried batch gives the same ids; an event re-sent with the same id but other content gets
    other ids, so neither copy hides the other.
    """
    text = f"{event_id}|{name}|{version}|{variant}" + (f"|{content_hash}" if content_hash else "")
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def features_codec(state: RegistryState, pipeline: str) -> avro.Codec:
    """Codec of a pipeline's features topic (reading
    older spec versions where the registry keeps them)."""
    return state.features_codec(pipeline)


@dataclass
class _Scored:
    """One variant's outcome on a batch: results for the rows it scored, errors for the others."""

    rows: np.ndarray  # indexes into the batch's events
    result: ScoreResult | None
    failed: dict[int, str]  # event index -> error


class InferenceService:
    """Holds the deployment plans and scores batches; see the module docstring."""

    def __init__(self, rt: ServiceRuntime, settings: InferenceSettings, consumer: Consumer,
                 metrics: InferenceMetrics) -> None:
        self.rt = rt
        self.settings = settings
        self.consumer = consumer
        self.metrics = metrics
        self.health = rt.health
        self.reader = RegistryReader(rt.kafka, client_id="loopline-inference-registry")
        self._refusals: list[dict[str, Any]] = []
        self.loader = ModelLoader(
            ArtifactStore.from_settings(settings), intra_op_threads=settings.intra_op_threads,
            warm_rows=settings.warm_rows, timeout_s=settings.model_load_timeout_s,
            on_refused=self._refused)
        self.watchdog = RunWatchdog(settings.score_timeout_s)
        self.plans: dict[str, Plan] = {}
        self.codecs: dict[str, avro.Codec] = {}
        self.paused: dict[str, list[TopicPartition]] = {}  # pipelines without a working version
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
        self._readiness()

    def tick(self, out: Outputs) -> None:
        """Between batches: follow the registry; send the alerts of refused versions."""
        now = time.monotonic()
        if now - self._last_poll >= self.settings.registry_poll_s:
            self._last_poll = now
            if self.reader.poll(0.0) or self.loader.has_news():
                self.rebuild()
        for event in self._refusals:
            out.send(topics.ALERTS, avro.codec("alert").encode(event),
                     key=event["pipeline"].encode())
        self._refusals.clear()

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
            except Exception as e:  # one pipeline's failure never stalls another
                log.exception("plan_failed", extra={"pipeline": pipeline, "error": str(e)[:300]})
                continue
            if plan is None or (old is not None and plan.signature() == old.signature()):
                continue
            self._swap(pipeline, old, plan)
        self.loader.keep_only({(p, v.record["name"], v.record["version"])
                               for p, plan in self.plans.items()
                               for v in [*plan.served, *plan.shadows,
                                         *([plan.fallback] if plan.fallback else [])]})
        wanted = {self.reader.state.specs[p].topics.features for p in {*self.plans, *self.paused}}
        if wanted != self._subscribed:
            self.health.expect_assignment()
            self.consumer.subscribe(sorted(wanted), on_assign=self.health.assigned)
            self._subscribed = wanted
            log.info("subscribed", extra={"topics": sorted(wanted)})
        self._readiness()

    def _swap(self, pipeline: str, old: Plan | None, plan: Plan) -> None:
        self.plans[pipeline] = plan
        self._publish_info(old, plan)
        self.metrics.swaps.labels(pipeline).inc()
        log.info("plan_changed", extra={"pipeline": pipeline, "plan": [
            f"{v}:{n}:v{ver}:{t:g}" for v, n, ver, _, t in plan.signature()]})
        held = self.paused.pop(pipeline, None)
        if held:  # a working version again: serve what waited
            self.consumer.resume(held)
            log.info("pipeline_resumed", extra={"pipeline": pipeline})

    def _readiness(self) -> None:
        served = sorted(p for p in self.plans if p not in self.paused)
        if self.paused:
            self.health.set_ready(False,
                                  f"no working model version for {sorted(self.paused)} (paused; "
                                  f"serving {served})")
        else:
            self.health.set_ready(True, f"serving {served}" if served
                                  else "no pipeline with a champion yet")

    def _publish_info(self, old: Plan | None, new: Plan) -> None:
        for plan, value in ((old, None), (new, 1)):
            if plan is None:
                continue
            for v in [*plan.served, *plan.shadows]:
                name, version, sha = v.ident
                labels = (plan.pipeline, v.variant, name, str(version), sha[:16])
                if value is None:
                    with contextlib.suppress(KeyError):
                        self.metrics.model_info.remove(*labels)
                else:
                    self.metrics.model_info.labels(*labels).set(1)

    def _refused(self, pipeline: str, record: dict[str, Any], reason: str) -> None:
        self.metrics.model_loads.labels(pipeline, "refused").inc()
        self._refusals.append(alert_event(
            pipeline, "model_load", f"model version refused, current model keeps serving: {reason}",
            model_name=record["name"], model_version=record["version"], episode=record["sha256"]))

    # ---- batches ------------------------------------------------------------------------------
    def process(self, batch: list[Message], out: Outputs) -> None:
        """Score one batch; outputs are committed by the loop together with the batch's offsets."""
        self.metrics.batch_size.observe(len(batch))
        by_topic: dict[str, list[Message]] = defaultdict(list)
        for m in batch:
            by_topic[m.topic()].append(m)
        for topic, messages in by_topic.items():
            pipeline = self._topic_pipeline.get(topic)
            plan = self.plans.get(pipeline) if pipeline else None
            if pipeline is not None and pipeline in self.paused:
                self._hold(pipeline, messages, out)
                continue
            if pipeline is None or plan is None:
                raise LooplineError(f"inference: no deployment for topic {topic} (partition "
                                    f"{messages[0].partition()}, offset {messages[0].offset()})")
            self._score(pipeline, plan, messages, out)

    def _decode(self, pipeline: str, messages: list[Message], out: Outputs
                ) -> tuple[list[Message], list[dict[str, Any]]]:
        good: list[Message] = []
        events: list[dict[str, Any]] = []
        for m, record in zip(messages,
                             self.codecs[pipeline].decode_each([m.value() for m in messages])):
            if isinstance(record, SchemaError):
                self.metrics.bad_events.labels(pipeline).inc()
                log.warning("bad_feature_event", extra={"topic": m.topic(),
                                                        "partition": m.partition(),
                                                        "offset": m.offset(),
                                                        "error": bounded(str(record))})
                out.dead(m, "schema", str(record))
            else:
                good.append(m)
                events.append(record)
        return good, events

    def _score(self, pipeline: str, plan: Plan, messages: list[Message], out: Outputs) -> None:
        good, events = self._decode(pipeline, messages, out)
        n = len(events)
        if n == 0:
            return
        features = [e["features"] for e in events]
        keys = [e["key"] or e["event_id"] for e in events]
        feeds_cache: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
        while True:
            route = plan.route(keys)
            outcomes: list[tuple[Variant, _Scored]] = []
            broken: tuple[Variant, str] | None = None
            for i, variant in enumerate([*plan.served, *plan.shadows]):
                shadow = variant.variant == "shadow"
                rows = np.arange(n) if shadow or route is None else np.flatnonzero(route == i)
                if rows.size == 0:
                    continue
                scored = self._run(pipeline, variant, features, rows, feeds_cache)
                if scored.result is None and len(scored.failed) == rows.size:
                    broken = (variant, next(iter(scored.failed.values())))
                    break
                outcomes.append((variant, scored))
            if broken is None:
                break
            variant, error = broken
            next_plan = self._isolate(pipeline, plan, variant, error, good[0], out)
            # nothing left that can serve: wait for a new version, lose nothing
            if next_plan is None:
                self.plans.pop(pipeline, None)
                self._hold(pipeline, messages, out)
                return
            plan = next_plan
        self._produce_all(pipeline, plan, outcomes, good, events, features, feeds_cache, out)

    def _run(self, pipeline: str, variant: Variant, features: list[dict[str, Any]],
             rows: np.ndarray,
             feeds_cache: dict[tuple[Any, ...], dict[str, np.ndarray]]) -> _Scored:
        """Score ``rows`` with one variant; a failing run
        is retried on halves to find the failing rows."""
        scorer = variant.scorer
        sig = scorer.input_signature
        feeds = feeds_cache.get(sig)
        if feeds is None:
            try:
                feeds = feeds_cache[sig] = scorer.feeds(features)
            except Exception as e:  # noqa: BLE001 - an input this version cannot take fails the version
                return _Scored(rows, None, {int(r): f"{type(e).__name__}: {e}" for r in rows})
        started = time.perf_counter()
        result, error = self._try(scorer, feeds, rows)
        self.metrics.scoring.labels(pipeline,
                                    variant.variant).observe(time.perf_counter() - started)
        if error is None:
            return _Scored(rows, result, {})
        failed: dict[int, str] = {}
        ok_rows: list[np.ndarray] = []

        def split(part: np.ndarray, why: str) -> None:
            if part.size == 1:
                failed[int(part[0])] = why
                return
            for half in (part[: part.size // 2], part[part.size // 2:]):
                _, err = self._try(scorer, feeds, half)
                if err is None:
                    ok_rows.append(half)
                else:
                    split(half, err)

        split(rows, error)
        if not ok_rows:
            return _Scored(rows, None, failed)
        good_rows = np.sort(np.concatenate(ok_rows))
        result, error = self._try(scorer, feeds, good_rows)
        if error is not None:  # flaky: give up on the whole batch for this version
            return _Scored(rows, None, {int(r): error for r in rows})
        return _Scored(good_rows, result, failed)

    def _try(self, scorer: Any, feeds: dict[str, np.ndarray], rows: np.ndarray
             ) -> tuple[ScoreResult | None, str | None]:
        """One guarded run on ``rows``: the result, or why it is unusable."""
        # rows are sorted and distinct: all of them
        whole = rows.size == len(next(iter(feeds.values())))
        sub = feeds if whole else {k: v[rows] for k, v in feeds.items()}
        try:
            result = scorer.parse(scorer.run(sub, self.watchdog), rows.size)
        except Exception as e:  # noqa: BLE001 - any model failure is the version's, not the service's
            return None, f"{type(e).__name__}: {bounded(str(e), 300)}"
        values = result.raw_scores
        if values is not None and (values.shape[0] != rows.size or not np.isfinite(values).all()):
            bad = int((~np.isfinite(values)).sum()) if values.shape[0] == rows.size else -1
            return None, ("output has the wrong shape" if bad < 0
                          else f"{bad} output(s) NaN or inf") + \
                " (rule: finite_output)"
        labels = result.labels
        if labels is not None and len(labels) != rows.size:
            return None, "label output has the wrong shape (rule: output_shape)"
        return result, None

    def _isolate(self, pipeline: str, plan: Plan, variant: Variant, error: str, first: Message,
                 out: Outputs) -> Plan | None:
        """Take a version that fails every event out of
        the plan; alert and record it in the registry."""
        name, version, sha = variant.ident
        replacement = plan.without(variant.ident)
        fallback = (f"; champion is now {replacement.champion.ident[0]} "
                    f"v{replacement.champion.ident[1]}"
                    if variant.variant == "champion" and replacement is not None else "")
        where = f"{first.topic()} partition {first.partition()} offset {first.offset()}"
        reason = f"{variant.variant} {name} v{version} failed at run time on {where}: {error}"
        log.error("version_isolated", extra={"pipeline": pipeline, "model_name": name,
                                             "model_version": version,
                                             "variant": variant.variant, "error": bounded(error)})
        self.metrics.isolated.labels(pipeline, variant.variant).inc()
        self.loader.isolate(pipeline, variant.record, reason)
        message = (f"model version taken out of service: {reason}"
                   + (fallback or ("; no other version can serve: the pipeline is paused until a "
                                   "new version is deployed" if replacement is None else
                                   "; its traffic returns to the champion")))
        event = alert_event(pipeline, "model_failure", message, model_name=name,
                            model_version=version, episode=sha, first_offset=first.offset())
        out.send(topics.ALERTS, avro.codec("alert").encode(event), key=pipeline.encode())
        codec = avro.codec("registry")
        for key, change in isolation_events(self.reader.state, pipeline, name, version,
                                            "taken out of service by inference: "
                                            f"{bounded(error, 300)}", SERVICE):
            out.send(topics.MODELS, codec.encode(change), key=key)
        if replacement is not None:
            old = self.plans.get(pipeline)
            self._swap(pipeline, old, replacement)
        return replacement

    def _hold(self, pipeline: str, messages: list[Message], out: Outputs) -> None:
        """No version can serve ``pipeline``: rewind and pause its partitions until one can."""
        first: dict[tuple[str, int], int] = {}
        for m in messages:
            k = (m.topic(), m.partition())
            first[k] = min(first.get(k, m.offset()), m.offset())
        held = [TopicPartition(t, p, o) for (t, p), o in first.items()]
        out.hold(held)
        known = self.paused.setdefault(pipeline, [])
        for tp in held:
            if all((k.topic, k.partition) != (tp.topic, tp.partition) for k in known):
                known.append(TopicPartition(tp.topic, tp.partition))
        self._readiness()

    def _produce_all(self, pipeline: str, plan: Plan, outcomes: list[tuple[Variant, _Scored]],
                     messages: list[Message], events: list[dict[str, Any]],
                     features: list[dict[str, Any]],
                     feeds_cache: dict[tuple[Any, ...], dict[str, np.ndarray]],
                     out: Outputs) -> None:
        """Produce every variant's predictions; rows a served variant failed go to the champion."""
        out_topic = topics.PipelineTopics(pipeline).predictions
        champion = plan.champion
        retry: list[int] = []
        for variant, scored in outcomes:
            served = variant.variant != "shadow"
            if scored.failed:
                self.metrics.row_failures.labels(pipeline, variant.variant).inc(len(scored.failed))
                if served and variant is not champion:
                    retry += sorted(scored.failed)
                elif served:
                    for i, why in sorted(scored.failed.items()):
                        out.dead(messages[i], "scoring",
                                 f"champion {champion.ident[0]} v{champion.ident[1]} "
                                 f"could not score this event: {why}")
            if scored.result is not None:
                self._produce(pipeline, out_topic, variant, served, messages, events,
                              scored.rows.tolist(), scored.result, out)
        if retry:
            rows = np.asarray(retry)
            scored = self._run(pipeline, champion, features, rows, feeds_cache)
            for i, why in sorted(scored.failed.items()):
                out.dead(messages[i], "scoring",
                         f"neither the challenger nor the champion could score this "
                         f"event: {why}")
            if scored.result is not None:
                self._produce(pipeline, out_topic, champion, True, messages, events,
                              scored.rows.tolist(), scored.result, out)
        out.on_commit(lambda: self._count(pipeline, events))

    def _count(self, pipeline: str, events: list[dict[str, Any]]) -> None:
        n = len(events)
        self.metrics.events.labels(pipeline).inc(n)
        ts = np.fromiter((e["ts"] for e in events), dtype=np.float64, count=n)
        self.metrics.end_to_end.observe_many(np.maximum(now_ms() - ts, 0.0) / 1000.0, pipeline)

    def _produce(self, pipeline: str, out_topic: str, variant: Variant, served: bool,
                 messages: list[Message],
                 events: list[dict[str, Any]], rows: list[int], result: ScoreResult,
                 out: Outputs) -> None:
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
                "prediction_id": prediction_id(event_id, name, version, tag, e.get("content_hash")),
                "event_id": event_id, "key": e["key"], "pipeline": pipeline,
                "model_name": name, "model_version": version, "model_sha256": sha,
                "variant": tag, "served": served,
                "label": labels[j] if labels is not None else None,
                "value": values[j] if values is not None else None,
                "scores": scores[j] if scores is not None else {},
                "source": {"topic": m.topic(), "partition": m.partition(), "offset": m.offset()},
                "event_ts": e["ts"], "scored_at": scored_at,
            })
        send = out.send
        for i, value in zip(rows, self._encoder.encode_many(records)):
            send(out_topic, value, key=messages[i].key() or events[i]["event_id"].encode())
        count = len(rows)
        out.on_commit(lambda: self.metrics.predictions.labels(pipeline, tag,
                                                              str(served).lower()).inc(count))


def serve(rt: ServiceRuntime, settings: InferenceSettings,
          delivery: Delivery | None = None) -> None:
    """Run the inference service until ``rt.stop`` is set."""
    consumer = rt.kafka.consumer("loopline-inference", rt.group_id)
    service = InferenceService(rt, settings, consumer, InferenceMetrics(rt.registry))
    try:
        service.start()
        rt.loop(consumer, delivery or rt.delivery(), service).run()
    finally:
        service.reader.close()
