"""The trainer loop: consume features, predictions, feedback and alerts; learn; retrain; promote.

One trainer process owns the pipelines it serves (``LOOPLINE_PIPELINES``, else every pipeline in
the registry): it reads their topics by explicit assignment, not through a consumer group, because
its state (river learners, the feedback join, trigger counters) is only correct together with the
exact offsets that produced it. Both are checkpointed atomically under
``$LOOPLINE_HOME/state/trainer`` and restored at start, so a crash or restart neither learns an
example twice nor loses one. Run one trainer per pipeline set (a second replica would learn the
same examples); partitions are still consumed in parallel by librdkafka within the process.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaError, Message, TopicPartition

from loopline import avro, feedback, topics
from loopline.artifacts import ArtifactStore, read_artifact
from loopline.errors import LooplineError, SchemaError
from loopline.kafka import AckedProducer, KafkaConfig, StopFlag
from loopline.models import ModelRegistry, champion
from loopline.observability import Health
from loopline.registry import RegistryReader, now_ms
from loopline.scoring import Scorer
from loopline.services.trainer import checkpoint
from loopline.services.trainer.data import Holdout, Ranges
from loopline.services.trainer import tournament
from loopline.services.trainer.export import library_versions
from loopline.services.trainer.join import Example, FeedbackJoin
from loopline.services.trainer.learner import Learner, input_features
from loopline.services.trainer.metrics import TrainerMetrics
from loopline.services.trainer.policy import RetrainPolicy
from loopline.services.trainer.promotion import Trial, promote_on_probation
from loopline.services.trainer.registration import register_version
from loopline.services.trainer.settings import TrainerSettings
from loopline.services.trainer.validation import scorecard, version_metrics
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

_KIND_ORDER = {"features": 0, "predictions": 1, "feedback": 2, "alerts": 3}


@dataclass
class PipelineState:
    """Everything the trainer knows about one pipeline (pickled into the checkpoint)."""

    spec_sha: str
    join: FeedbackJoin
    learner: Learner
    holdout: Holdout
    trained: Ranges
    policy: RetrainPolicy
    recent: deque[dict[str, Any]]
    trial: Trial | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def new_state(spec: PipelineSpec, settings: TrainerSettings) -> PipelineState:
    """A fresh state for a pipeline: empty join, untrained learner."""
    cfg = spec.trainer
    return PipelineState(
        spec.sha256(),
        FeedbackJoin(spec.label.task, list(spec.label.classes or []), int(cfg.label_ttl_s * 1000),
                     settings.max_join_entries),
        Learner(spec), Holdout(cfg.holdout), Ranges(spec.topics.features),
        RetrainPolicy(last_version_ms=now_ms()), deque(maxlen=settings.reference_rows))


class TrainerService:
    """See the module docstring."""

    def __init__(self, settings: TrainerSettings, kafka: KafkaConfig, health: Health,
                 metrics: TrainerMetrics, group_id: str = "loopline-trainer") -> None:
        self.settings = settings
        self.health = health
        self.metrics = metrics
        self.reader = RegistryReader(kafka, client_id=f"{group_id}-registry")
        self.consumer = kafka.reader(group_id, **{"enable.partition.eof": False})
        self.producer = AckedProducer(kafka.producer(group_id))
        self.models = ModelRegistry(kafka, ArtifactStore.from_settings(settings), actor="trainer")
        self.path = settings.checkpoint_dir() / f"{group_id}.ckpt"
        self.offsets, self.states = checkpoint.load(self.path)
        self.codecs: dict[str, avro.Codec] = {}
        self.specs: dict[str, PipelineSpec] = {}
        self.topic_kind: dict[str, tuple[str | None, str]] = {}
        self._champions: dict[str, Scorer] = {}
        self._last_poll = 0.0
        self._last_ckpt = time.monotonic()
        self._dirty = False

    # ---- setup --------------------------------------------------------------------------------
    def start(self) -> None:
        """Read the registry, restore or create each pipeline's state, assign the input partitions."""
        self.reader.catch_up()
        self._last_poll = time.monotonic()
        self._assign([(topics.ALERTS, None, "alerts")])
        self.sync_pipelines()
        self.health.set_ready(True, f"training {sorted(self.specs)}")
        log.info("trainer_started", extra={"pipelines": sorted(self.specs), "checkpoint": str(self.path),
                                           "restored_offsets": len(self.offsets)})

    def sync_pipelines(self) -> None:
        """Follow the registry's pipelines: new ones get a state and their topics are assigned."""
        state = self.reader.state
        wanted = [p for p in (self.settings.pipelines or sorted(state.specs)) if p in state.specs]
        for pipeline in wanted:
            spec = state.specs[pipeline]
            if self.specs.get(pipeline) is spec:
                continue
            self.specs[pipeline] = spec
            self.codecs[pipeline] = state.features_codec(pipeline)
            st = self.states.get(pipeline)
            if st is None or st.learner.features != input_features(spec):
                if st is not None:
                    log.warning("trainer_learner_reset", extra={"pipeline": pipeline,
                                                                "reason": "the spec's features changed"})
                self.states[pipeline] = new_state(spec, self.settings)
            else:
                st.spec_sha = spec.sha256()
            t = spec.topics
            self._assign([(t.features, pipeline, "features"), (t.predictions, pipeline, "predictions"),
                          (t.feedback, pipeline, "feedback")])

    def _assign(self, wanted: list[tuple[str, str | None, str]]) -> None:
        parts = []
        for topic, pipeline, kind in wanted:
            if topic in self.topic_kind:
                continue
            meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise LooplineError(f"trainer: topic {topic} does not exist; run `loopline apply` first")
            self.topic_kind[topic] = (pipeline, kind)
            # A fresh trainer learns from what the topics still hold, but reacts only to new alerts.
            start = OFFSET_END if kind == "alerts" else OFFSET_BEGINNING
            parts += [TopicPartition(topic, p, self.offsets.get((topic, p), start)) for p in sorted(meta.partitions)]
        if parts:
            self.consumer.incremental_assign(parts)

    # ---- loop ---------------------------------------------------------------------------------
    def run(self, stop: StopFlag) -> None:
        """Consume, learn and act until ``stop``; checkpoint on the way out."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.checkpoint()

    def step(self) -> None:
        """One round: a batch (or idle tick), registry follow-up, triggers and trials, checkpoint."""
        batch = self.consumer.consume(self.settings.batch_size, self.settings.batch_timeout_s)
        data = []
        for m in batch:
            err = m.error()
            if err is None:
                data.append(m)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consume_error", extra={"error": err.str(), "topic": m.topic()})
        self.health.beat()
        if data:
            self.handle(data)
        else:
            for st in self.states.values():
                st.join.advance(now_ms())  # caught up: the stream clock is the wall clock
        self.refresh()
        self.act()
        if self._dirty and time.monotonic() - self._last_ckpt >= self.settings.checkpoint_interval_s:
            self.checkpoint()

    def refresh(self) -> None:
        """Apply new registry events (at most every ``registry_poll_s``)."""
        if time.monotonic() - self._last_poll < self.settings.registry_poll_s:
            return
        self._last_poll = time.monotonic()
        if self.reader.poll(0.0):
            self.sync_pipelines()

    def checkpoint(self) -> None:
        """Write learners, joins, triggers and offsets atomically."""
        checkpoint.save(self.path, self.offsets, self.states)
        self._last_ckpt = time.monotonic()
        self._dirty = False
        self.metrics.checkpoints.inc()
        for pipeline, st in self.states.items():
            self.metrics.join_counts(pipeline, st.join.counts)

    # ---- batches ------------------------------------------------------------------------------
    def handle(self, batch: list[Message]) -> None:
        """Fold a batch into the joins and learners; features first, so a batch joins with itself."""
        self._dirty = True
        clock = max((m.timestamp()[1] for m in batch if m.timestamp()[0]), default=0)
        for st in self.states.values():
            st.join.advance(clock)
        ordered = sorted(batch, key=lambda m: _KIND_ORDER[self.topic_kind[m.topic()][1]])
        for m in ordered:
            pipeline, kind = self.topic_kind[m.topic()]
            self.offsets[(m.topic(), m.partition())] = m.offset() + 1
            ts_type, ts = m.timestamp()
            seen = ts if ts_type else clock
            try:
                if kind == "alerts":
                    self._alert(avro.codec("alert").decode(m.value()))
                    continue
                assert pipeline is not None
                st = self.states[pipeline]
                if kind == "features":
                    examples = st.join.add_event(self.codecs[pipeline].decode(m.value()), m.partition(),
                                                 m.offset(), seen)
                elif kind == "predictions":
                    examples = st.join.add_prediction(avro.codec("prediction").decode(m.value()), seen)
                else:
                    # any client may send feedback, as Avro or as JSON
                    record = feedback.decode(m.value(), m.topic(), m.partition(), m.offset(), ts if ts_type else None,
                                             self.specs[pipeline].label.classes)
                    examples = st.join.add_feedback(record, seen)
            except (SchemaError, feedback.FeedbackError) as e:
                self.metrics.bad_messages.labels(m.topic()).inc()
                log.warning("trainer_bad_message", extra={"topic": m.topic(), "partition": m.partition(),
                                                          "offset": m.offset(), "error": str(e)})
                continue
            for example in examples:
                self._example(pipeline, st, example)

    def _alert(self, alert: dict[str, Any]) -> None:
        st = self.states.get(alert["pipeline"])
        spec = self.specs.get(alert["pipeline"])
        if st is None or spec is None or not spec.trainer.retrain.on_drift:
            return
        if st.policy.on_alert(alert):
            log.info("trainer_drift_armed", extra={"pipeline": alert["pipeline"], "signal": alert["signal"],
                                                   "alert": alert["message"]})
            if not spec.trainer.retrain.warm_start:
                # Cold start: the next candidate learns only data from the alert on.
                st.learner = Learner(spec)
                st.trained = Ranges(spec.topics.features)

    def _example(self, pipeline: str, st: PipelineState, example: Example) -> None:
        st.policy.on_example(example.verdict, example.target is not None)
        if example.target is None:
            return
        if st.trial is not None:
            st.trial.observe(example)
        st.recent.append(example.features)
        leaving = st.holdout.push(example, keep=self.specs[pipeline].trainer.window)
        if leaving is not None:
            st.learner.learn(leaving.features, leaving.target)
            st.trained.add(leaving.partition, leaving.offset, leaving.ts)
            self.metrics.learned.labels(pipeline).inc()

    # ---- decisions ----------------------------------------------------------------------------
    def act(self) -> None:
        """Check every pipeline's live trial and retrain triggers."""
        for pipeline, st in self.states.items():
            spec = self.specs.get(pipeline)
            if spec is None:
                continue
            if st.trial is not None:
                self._check_trial(pipeline, spec, st)
                continue
            if not tournament.ready(spec, st.holdout):
                continue
            trigger = st.policy.due(spec.trainer, now_ms())
            if trigger is None:
                continue
            try:
                self.candidate(pipeline, spec, st, trigger)
            except tournament.Deferred as e:
                st.policy.defer(e.labels)
                log.info("trainer_candidate_deferred",
                         extra={"pipeline": pipeline, "trigger": trigger, "labels": e.labels})
            except LooplineError as e:
                # A candidate that cannot be exported or registered must not stop learning; the
                # counters restart so the next trigger tries again with more data.
                log.error("trainer_candidate_failed", extra={"pipeline": pipeline, "trigger": trigger,
                                                             "error": str(e)})
                self.metrics.versions.labels(pipeline, "failed").inc()
                st.policy.reset(now_ms())

    def _champion_scorer(self, spec: PipelineSpec, record: dict[str, Any]) -> Scorer:
        key = record["sha256"]
        scorer = self._champions.get(key)
        if scorer is None:
            data = read_artifact(record["uri"], record["sha256"])
            scorer = Scorer(data, spec, record.get("fill_values") or {}, label=f"champion v{record['version']}",
                            input_features=record.get("input_features") or None)
            self._champions = {key: scorer}
        return scorer

    def candidate(self, pipeline: str, spec: PipelineSpec, st: PipelineState, trigger: str) -> dict[str, Any]:
        """Run the tournament, validate its winner against the champion, register it (or not)."""
        reference = list(st.recent)
        champ = champion(self.reader.state, pipeline)
        champ_scorer = self._champion_scorer(spec, champ) if champ is not None else None
        champ_model = read_artifact(champ["uri"], champ["sha256"]) if champ is not None else None
        champ_id = f"{champ['name']}:{champ['version']}" if champ is not None else None
        result = tournament.run(spec, st.holdout, st.learner, st.trained, reference, champ_scorer,
                                champ_model, name=f"{pipeline}-trainer")
        card = scorecard(spec, result, trigger, champ_id)
        model, ranges = result.registered.model, result.registered.ranges
        assert model is not None
        auto = spec.deployment.promotion == "auto"
        direct = card["accepted"] and champ is not None and auto and card["evidence"]["direct"]
        if not card["accepted"]:
            stage = "rejected"
        elif champ is None:
            stage = "champion" if auto else "candidate"
        else:
            stage = "canary" if spec.deployment.canary_fraction > 0 and not direct else "shadow"
        card["stage"] = stage
        card["decision"] = ("promote now, on probation" if direct
                            else "live trial" if card["accepted"] and champ else stage)
        done = self._already_registered(pipeline, trigger, ranges.records())
        if done is not None:
            # Registered just before a crash that came before the checkpoint: adopt it, do not repeat it.
            log.warning("trainer_version_adopted", extra={"pipeline": pipeline, "version": done["version"]})
            st.policy.reset(now_ms())
            self.checkpoint()
            return done
        record = register_version(
            self.models, pipeline, model, stage=stage, reference=reference,
            metrics=version_metrics(card), trigger=trigger, training_ranges=ranges.records(),
            scorecard=card,
            library_versions={**library_versions(), "trainer.learner": result.winner.name})
        st.policy.after_version(spec.trainer, now_ms(), trigger, card["accepted"])
        st.history.append({"version": record["version"], "stage": stage, "trigger": trigger,
                           "accepted": card["accepted"], "training_count": ranges.count,
                           "learner": result.winner.name})
        outcome = "accepted" if card["accepted"] else "rejected"
        self.metrics.versions.labels(pipeline, outcome).inc()
        log.info("trainer_version", extra={"pipeline": pipeline, "version": record["version"], "stage": stage,
                                           "trigger": trigger, "reason": card["reason"],
                                           "learner": result.winner.name,
                                           "evidence": card["evidence"]["note"],
                                           "training_examples": ranges.count})
        if card["accepted"] and champ is not None:
            mine, theirs = (record["name"], record["version"]), (champ["name"], champ["version"])
            if direct:
                st.trial = promote_on_probation(self.models, pipeline, mine, theirs,
                                                f"holdout: {card['evidence']['note']}",
                                                regression=spec.label.task == "regression")
                self.metrics.stage_changes.labels(pipeline, "promote").inc()
            else:
                st.trial = Trial("trial", mine, theirs, record["created_at"],
                                 paired=stage == "shadow",
                                 regression=spec.label.task == "regression")
        self.checkpoint()
        return record

    def _already_registered(self, pipeline: str, trigger: str,
                            ranges: list[dict[str, Any]]) -> dict[str, Any] | None:
        # The registry was read completely at start, so a version published before a crash is known.
        for (p, _, _), v in self.reader.state.versions.items():
            if p == pipeline and v.get("trigger") == trigger and v.get("training_ranges") == ranges and ranges:
                return v
        return None

    def _check_trial(self, pipeline: str, spec: PipelineSpec, st: PipelineState) -> None:
        trial = st.trial
        assert trial is not None
        versions = self.reader.state.versions
        chal = versions.get((pipeline, *trial.challenger))
        if chal is None:
            return  # our own registration not read back yet
        expected = ("shadow", "canary") if trial.phase == "trial" else ("champion",)
        if chal["stage"] not in expected:
            log.info("trainer_trial_ended", extra={"pipeline": pipeline, "reason": f"stage is now {chal['stage']}",
                                                   **trial.summary()})
            st.trial = None
            st.policy.after_trial(spec.trainer, won=True)  # a person decided: no automatic retry
            return
        if spec.deployment.promotion != "auto":
            return
        cfg = spec.trainer
        decision = trial.decision(cfg.min_live_samples, cfg.margin, cfg.live_p)
        if decision is None:
            return
        summary = trial.summary()
        reason = (f"live {trial.phase}: {summary['challenger']['version']} scored "
                  f"{summary['challenger']['score']:.4f} vs {summary['incumbent']['version']} "
                  f"{summary['incumbent']['score']:.4f} over {summary['challenger']['n']} labels, margin "
                  f"{spec.trainer.margin:g}")
        (cname, cver), (iname, iver) = trial.challenger, trial.incumbent
        if trial.phase == "trial" and decision == "challenger":
            st.trial = promote_on_probation(self.models, pipeline, trial.challenger,
                                            trial.incumbent, reason, trial.regression)
            action = "promote"
        elif trial.phase == "trial":
            self.models.promote(pipeline, cver, name=cname, to_stage="rejected", reason=f"rolled back: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=False)
            action = "reject"
        elif decision == "incumbent":
            self.models.rollback(pipeline, reason=f"automatic rollback: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=False)
            action = "rollback"
        else:
            self.models.promote(pipeline, iver, name=iname, to_stage="retired", reason=f"probation passed: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=True)
            action = "probation_passed"
        self.metrics.stage_changes.labels(pipeline, action).inc()
        log.info("trainer_stage_change", extra={"pipeline": pipeline, "action": action, "reason": reason})
        self.checkpoint()

    def close(self) -> None:
        """Close the Kafka clients."""
        try:
            self.producer.producer.flush(10)
        finally:
            self.consumer.close()
            self.reader.close()
