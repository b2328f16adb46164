"""The trainer: fold features, predictions, feedback and alerts into per-pipeline state; retrain;
promote.

Its state (river learners, the feedback join, trigger counters, live trials) is per pipeline, the
trainer's unit of ownership: replicas split the pipelines between them through
:class:`loopline.runtime.units.Units`, which restores a pipeline's state from the changelog topic
when it is assigned, reads its topics from the exact offsets that produced that state (no example
learned twice, none skipped), and checkpoints state and offsets together. A version registered
just before a crash that came before the checkpoint is recognised by its trigger and training
ranges and adopted, not trained again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Message

from loopline import avro, feedback, topics
from loopline.artifacts import ArtifactStore
from loopline.errors import FeedbackError, LooplineError, SchemaError
from loopline.models import ModelRegistry, champion
from loopline.observability import bounded
from loopline.registry import RegistryReader, now_ms
from loopline.runtime.incarnation import TopicIds
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.runtime.state import Changelog
from loopline.runtime.units import Input, Units, UnitsMetrics
from loopline.scoring import Scorer
from loopline.services.trainer import tournament
from loopline.services.trainer.data import Holdout, Ranges
from loopline.services.trainer.errors import Deferred
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
from loopline.topics import PipelineTopics, pipeline_of

log = logging.getLogger(__name__)

_KIND_ORDER = {"features": 0, "predictions": 1, "feedback": 2, "alerts": 3}
_IDLE_S = 1.0  # nothing consumed for this long: caught up


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
    """See the module docstring; :func:`serve` wires it to Kafka."""

    #: The shape of a pipeline's checkpointed state (PipelineState and what it holds).
    #: 2: the candidate tournament's window and policy, one verdict per event.
    state_version = 2

    def __init__(self, settings: TrainerSettings, models: ModelRegistry, metrics: TrainerMetrics,
                 reader: RegistryReader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.reader = reader
        self.models = models
        self.states: dict[str, PipelineState] = {}
        self.codecs: dict[str, avro.Codec] = {}
        self.specs: dict[str, PipelineSpec] = {}
        self.units: Units | None = None  # set by serve(); tests may drive the service without it
        self._champions: dict[str, Scorer] = {}
        self._last_data = time.monotonic()
        self._next_counts = 0.0

    # ---- units --------------------------------------------------------------------------------
    def known_units(self) -> list[str]:
        """The registry's pipelines this trainer serves."""
        state = self.reader.state
        return [p for p in (self.settings.pipelines or sorted(state.specs)) if p in state.specs]

    def inputs(self, unit: str) -> list[Input]:
        """A pipeline's topics (from the beginning for a
        fresh start) and the alerts (only new ones)."""
        t = PipelineTopics(unit)
        return [Input(t.features), Input(t.predictions), Input(t.feedback),
                Input(topics.ALERTS, "end")]

    def install(self, unit: str, state: Any | None) -> None:
        """Take a pipeline over: its restored state, or a
        fresh one (also when the spec's features changed)."""
        spec = self.reader.state.specs[unit]
        self.specs[unit] = spec
        self.codecs[unit] = self.reader.state.features_codec(unit)
        if isinstance(state, PipelineState) and state.learner.features == input_features(spec):
            state.spec_sha = spec.sha256()
            self.states[unit] = state
        else:
            if state is not None:
                log.warning("trainer_learner_reset",
                            extra={"pipeline": unit, "reason": "the spec's features changed"})
            self.states[unit] = new_state(spec, self.settings)
        log.info("trainer_pipeline", extra={"pipeline": unit, "restored": state is not None})

    def snapshot(self, unit: str) -> Any:
        """A pipeline's state, to checkpoint."""
        return self.states[unit]

    def remove(self, unit: str) -> None:
        """Give a pipeline up."""
        self.states.pop(unit, None)
        self.specs.pop(unit, None)
        self.codecs.pop(unit, None)

    def sync_pipelines(self) -> None:
        """Follow the registry: a changed spec of a held pipeline is taken up."""
        state = self.reader.state
        for pipeline in list(self.states):
            spec = state.specs.get(pipeline)
            if spec is None or self.specs.get(pipeline) is spec:
                continue
            self.specs[pipeline] = spec
            self.codecs[pipeline] = state.features_codec(pipeline)
            st = self.states[pipeline]
            if st.learner.features != input_features(spec):
                log.warning("trainer_learner_reset",
                            extra={"pipeline": pipeline, "reason": "the spec's features changed"})
                self.states[pipeline] = new_state(spec, self.settings)
            else:
                st.spec_sha = spec.sha256()
        if self.units is not None:
            self.units.sync()

    def _touch(self, pipeline: str) -> None:
        if self.units is not None:
            self.units.touch(pipeline)

    # ---- the loop (Handler) -------------------------------------------------------------------
    def process(self, batch: list[Message], out: Outputs) -> None:
        """Fold the messages the owned pipelines have not seen yet."""
        fresh = self.units.observe(batch) if self.units is not None else batch
        if fresh:
            self._last_data = time.monotonic()
            self.handle(fresh)

    def tick(self, out: Outputs) -> None:
        """Registry changes, joins advanced on the wall
        clock when caught up, triggers and trials."""
        if self.reader.poll(0.0):
            self.sync_pipelines()
        idle = time.monotonic() - self._last_data
        if idle > _IDLE_S:
            # Caught up (nothing arrived for a while): the stream clock follows the wall clock,
            # less that while, so what arrived just before has its full TTL.
            for st in self.states.values():
                st.join.advance(now_ms() - int(_IDLE_S * 1000))
        self.act()
        now = time.monotonic()
        if now >= self._next_counts:
            self._next_counts = now + 1.0
            for pipeline, st in self.states.items():
                self.metrics.join_counts(pipeline, st.join.counts)

    # ---- batches ------------------------------------------------------------------------------
    def handle(self, batch: list[Message]) -> None:
        """Fold a batch into the joins and learners;
        features first, so a batch joins with itself."""
        clock = max((m.timestamp()[1] for m in batch if m.timestamp()[0]), default=0)
        for held in self.states.values():
            held.join.advance(clock)
        ordered = sorted(batch, key=lambda m: _KIND_ORDER[_kind(m.topic())])
        # Examples are used once the whole batch is joined: a label may complete on the champion's
        # prediction while the shadow's, written beside it, comes a few messages later.
        found: list[tuple[str, PipelineState, Example]] = []
        for m in ordered:
            kind = _kind(m.topic())
            ts_type, ts = m.timestamp()
            seen = ts if ts_type else clock
            try:
                if kind == "alerts":
                    alert = avro.codec("alert").decode(m.value())
                    if self.units is None or self.units.fresh_for(alert["pipeline"], m):
                        self._alert(alert)
                    continue
                pipeline = pipeline_of(m.topic())
                st = self.states.get(pipeline) if pipeline else None
                if st is None:
                    continue
                assert pipeline is not None
                if kind == "features":
                    examples = st.join.add_event(self.codecs[pipeline].decode(m.value()),
                                                 m.partition(), m.offset(), seen)
                elif kind == "predictions":
                    examples = st.join.add_prediction(avro.codec("prediction").decode(m.value()),
                                                      seen)
                else:
                    # any client may send feedback, as Avro or as JSON; lineage dead-letters bad
                    # ones
                    record = feedback.decode(m.value(), m.topic(), m.partition(),
                                             ts if ts_type else None,
                                             self.specs[pipeline].label.classes)
                    examples = st.join.add_feedback(record, seen)
            except (SchemaError, FeedbackError) as e:
                self.metrics.bad_messages.labels(m.topic()).inc()
                log.debug("trainer_bad_message", extra={"topic": m.topic(),
                                                        "partition": m.partition(),
                                                        "offset": m.offset(),
                                                        "error": bounded(str(e))})
                continue
            found.extend((pipeline, st, example) for example in examples)
        for pipeline, st, example in found:
            if example.target is not None:
                example.predictions = st.join.predictions_of(example.event_id)
            self._example(pipeline, st, example)

    def _alert(self, alert: dict[str, Any]) -> None:
        st = self.states.get(alert["pipeline"])
        spec = self.specs.get(alert["pipeline"])
        if st is None or spec is None or not spec.trainer.retrain.on_drift:
            return
        if st.policy.on_alert(alert):
            log.info("trainer_drift_armed", extra={"pipeline": alert["pipeline"],
                                                   "signal": alert["signal"],
                                                   "alert": alert["message"]})
            if not spec.trainer.retrain.warm_start:
                # Cold start: the next candidate learns only data from the alert on.
                st.learner = Learner(spec)
                st.trained = Ranges(spec.topics.features)

    def _example(self, pipeline: str, st: PipelineState, example: Example) -> None:
        if st.policy.on_example(example.verdict, example.target is not None, example.event_id):
            self.metrics.repeated_verdicts.labels(pipeline).inc()
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
            except Deferred as e:
                st.policy.defer(e.labels)
                log.info("trainer_candidate_deferred",
                         extra={"pipeline": pipeline, "trigger": trigger, "labels": e.labels})
            except LooplineError as e:
                # A candidate that cannot be exported or registered must not stop learning; the
                # counters restart so the next trigger tries again with more data.
                log.error("trainer_candidate_failed", extra={"pipeline": pipeline,
                                                             "trigger": trigger, "error": str(e)})
                self.metrics.versions.labels(pipeline, "failed").inc()
                st.policy.reset(now_ms())

    def _champion_scorer(self, spec: PipelineSpec, record: dict[str, Any]) -> Scorer:
        key = record["sha256"]
        scorer = self._champions.get(key)
        if scorer is None:
            data = self.models.store.read(record["sha256"])
            scorer = Scorer(data, spec, record.get("fill_values") or {},
                            label=f"champion v{record['version']}",
                            input_features=record.get("input_features") or None)
            self._champions = {key: scorer}
        return scorer

    def candidate(self, pipeline: str, spec: PipelineSpec, st: PipelineState,
                  trigger: str) -> dict[str, Any]:
        """Run the tournament, validate its winner against the champion, register it (or not)."""
        reference = list(st.recent)
        champ = champion(self.reader.state, pipeline)
        champ_scorer = self._champion_scorer(spec, champ) if champ is not None else None
        champ_model = self.models.store.read(champ["sha256"]) if champ is not None else None
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
            # Registered just before a crash that came before the checkpoint: adopt it, do not
            # repeat it.
            log.warning("trainer_version_adopted",
                        extra={"pipeline": pipeline, "version": done["version"]})
            st.policy.reset(now_ms())
            self._checkpoint_soon(pipeline)
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
        log.info("trainer_version", extra={"pipeline": pipeline, "version": record["version"],
                                           "stage": stage,
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
        self._checkpoint_soon(pipeline)
        return record

    def _already_registered(self, pipeline: str, trigger: str,
                            ranges: list[dict[str, Any]]) -> dict[str, Any] | None:
        # The registry was read completely at start, so a version published before a crash is known.
        for (p, _, _), v in self.reader.state.versions.items():
            if (p == pipeline and v.get("trigger") == trigger
                    and v.get("training_ranges") == ranges and ranges):
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
            log.info("trainer_trial_ended", extra={"pipeline": pipeline,
                                                   "reason": f"stage is now {chal['stage']}",
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
                  f"{summary['incumbent']['score']:.4f} over {summary['challenger']['n']} labels, "
                  f"margin {spec.trainer.margin:g}")
        (cname, cver), (iname, iver) = trial.challenger, trial.incumbent
        if trial.phase == "trial" and decision == "challenger":
            st.trial = promote_on_probation(self.models, pipeline, trial.challenger,
                                            trial.incumbent, reason, trial.regression)
            action = "promote"
        elif trial.phase == "trial":
            self.models.promote(pipeline, cver, name=cname, to_stage="rejected",
                                reason=f"rolled back: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=False)
            action = "reject"
        elif decision == "incumbent":
            self.models.rollback(pipeline, reason=f"automatic rollback: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=False)
            action = "rollback"
        else:
            self.models.promote(pipeline, iver, name=iname, to_stage="retired",
                                reason=f"probation passed: {reason}")
            st.trial = None
            st.policy.after_trial(spec.trainer, won=True)
            action = "probation_passed"
        self.metrics.stage_changes.labels(pipeline, action).inc()
        log.info("trainer_stage_change",
                 extra={"pipeline": pipeline, "action": action, "reason": reason})
        self._checkpoint_soon(pipeline)

    def _checkpoint_soon(self, pipeline: str) -> None:
        """A decision changed the state outside a batch: checkpoint it at the next round."""
        if self.units is not None:
            self.units.touch(pipeline)
            self.units.request()


def _kind(topic: str) -> str:
    return "alerts" if topic == topics.ALERTS else topic.rsplit(".", 1)[-1]


def create(rt: ServiceRuntime, settings: TrainerSettings) -> TrainerService:
    """The trainer of a service process (its metrics in the runtime's registry)."""
    reader = RegistryReader(rt.kafka, client_id=f"{rt.group_id}-registry")
    models = ModelRegistry(rt.kafka, ArtifactStore.from_settings(settings), actor="trainer")
    return TrainerService(settings, models, TrainerMetrics(rt.registry), reader)


def serve(rt: ServiceRuntime, settings: TrainerSettings,
          service: TrainerService | None = None) -> None:
    """Run the trainer until ``rt.stop`` is set (its units checkpointed on the way out)."""
    service = service or create(rt, settings)
    reader = service.reader
    changelog = Changelog(rt.kafka, "trainer", settings.state_partitions)
    group = rt.kafka.consumer("loopline-trainer-units", rt.group_id)
    data = rt.kafka.reader(f"{rt.group_id}-data", **{"enable.partition.eof": False})
    units = Units("trainer", changelog, group, data, service,
                  TopicIds(rt.kafka.admin("loopline-trainer")),
                  UnitsMetrics(rt.registry, "trainer"), settings.checkpoint_interval_s)
    service.units = units
    try:
        reader.catch_up()
        rt.health.set_ready(False, "joining the trainer group")
        units.start()
        loop = rt.loop(data, rt.delivery(**{"message.max.bytes": 64 * 1024 * 1024}),
                       _Ready(rt, service), bisect=False, checkpointer=units, group=group)
        units.commit_now = loop.commit_now
        loop.run()
    finally:
        reader.close()


class _Ready:
    """The trainer on the loop, saying it is ready once the group assigned it its units."""

    def __init__(self, rt: ServiceRuntime, service: TrainerService) -> None:
        self.rt, self.service = rt, service

    def process(self, batch: list[Message], out: Outputs) -> None:
        """See :meth:`TrainerService.process`."""
        self.service.process(batch, out)

    def tick(self, out: Outputs) -> None:
        """See :meth:`TrainerService.tick`; readiness follows the group assignment."""
        self.service.tick(out)
        if self.service.units is not None and self.service.units.assigned_once:
            self.rt.health.set_ready(True, f"training {sorted(self.service.states)}")
