"""Everything the monitor tracks for one pipeline, and the alerts it derives from each batch.

Drift is one episode per column (a feature against the champion's reference, an output of each
version against that version's): raised when a comparison finds effect, evidence and persistence
(services/monitor/streams.py), resolved when the column's last window has looked like the reference
again for ``resolve_after`` events, or when the reference is renewed: a new champion brings its
training profile, a ``loopline monitor rebaseline`` makes the last ``window`` events seen the
reference (columns with fewer than that warm up on the next ones), a retired version's
episodes end with it. Performance is one episode per model version, on the same principles
(services/monitor/degradation.py). Alerts caused by registry changes wait in an outbox and go out
with the next batch or tick.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Any

import orjson

from loopline.registry import RegistryState, now_ms
from loopline.services.monitor import messages
from loopline.services.monitor.episodes import EpisodeKey, Episodes
from loopline.services.monitor.messages import Performance
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.performance import RECENT, PerformanceTracker, Scored
from loopline.services.monitor.quality import Columns, QualityTracker
from loopline.services.monitor.streams import ColumnWatch, Finding
from loopline.services.monitor.windowed import Thresholds
from loopline.services.monitor.zombie import DEPLOYED, ZombieWatch
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

# The detector field of episodes: every drift is decided by a PSI test (of a feature, of an
# output), every performance drop by a test of the error stream.
DRIFT, OUTPUT_DRIFT, ERRORS = "psi", "output_psi", "errors"
MIN_QUALITY_EVENTS = (
    50  # a partial quality window needs this many events (and a quarter window) to be judged
)
Alert = dict[str, Any]


@dataclass(frozen=True)
class Tuning:
    """Service-level knobs (from MonitorSettings) that complete the spec's monitor section."""

    drift_eval_every: int = 0
    resolve_after: int = 0  # events a drift must have looked cleared before its episode resolves
    quality_alert_rate: float = 0.05


@dataclass(frozen=True)
class Batch:
    """Decoded records of one topic in one consumed batch, with where each came from."""

    records: list[dict[str, Any]]
    offsets: list[int]
    partitions: list[int]
    topic: str


class PipelineMonitor:
    """Drift, quality, performance and zombie tracking of one pipeline (picklable: no clients)."""

    def __init__(self, spec: PipelineSpec, tuning: Tuning) -> None:
        self.spec = spec
        self.tuning = tuning
        m = spec.monitor
        self.window = m.window
        self.every = tuning.drift_eval_every or max(1, m.window // 4)
        self.resolve_after = tuning.resolve_after or max(1, m.window // 2)
        self.thresholds = Thresholds(m.psi_warning, m.psi_alert, m.p_value)
        self.episodes = Episodes(spec.name)
        self.quality = QualityTracker(spec, m.window)
        self.performance = PerformanceTracker(
            spec.label.task,
            spec.label.classes,
            m.performance_window,
            int(spec.trainer.label_ttl_s * 1000),
            list(m.error_detectors),
            m.seed,
            min_drop=m.min_performance_drop,
            p_value=m.p_value,
        )
        self.zombies = ZombieWatch(m.zombie_after_s)
        self.champion: tuple[str, int] | None = None
        self.features: dict[str, ColumnWatch] = {}
        self.outputs: dict[tuple[str, int], dict[str, ColumnWatch]] = {}
        self.profiles: dict[tuple[str, int], dict[str, Any]] = {}
        #: Where each open episode's clearing condition started to hold (column position or labels).
        self.clear_since: dict[EpisodeKey, int] = {}
        #: Rebaselines (registry ids) already applied, or seen before this monitor had any data.
        self.rebaselined: set[str] = set()
        self.refreshed = False
        self.outbox: list[
            Alert
        ] = []  # alerts of registry changes, sent with the next batch or tick
        self.quality_at_last_tick = 0
        self._build_features(None, "its first values (no champion with a reference profile)")

    # --- registry ---------------------------------------------------------------------------
    def refresh(self, state: RegistryState, at: int = 0) -> None:
        """Follow the registry: spec, profiles, champion, deployed versions, rebaselines."""
        at = at or now_ms()  # when the registry change was seen: the time of its resolved alerts
        spec = state.specs.get(self.spec.name, self.spec)
        self.spec = spec
        deployed: dict[tuple[str, int], tuple[str, float]] = {}
        retired: set[tuple[str, int]] = set()
        champions = []
        for (pipeline, name, version), v in state.versions.items():
            if pipeline != spec.name:
                continue
            if (name, version) not in self.profiles and v.get("reference_profile_json"):
                try:
                    self.profiles[(name, version)] = orjson.loads(v["reference_profile_json"])
                except orjson.JSONDecodeError as e:
                    log.error(
                        "reference_profile_unreadable",
                        extra={
                            "pipeline": spec.name,
                            "model": name,
                            "version": version,
                            "error": str(e),
                        },
                    )
            if v.get("stage") in DEPLOYED:
                changes = [
                    c["at"]
                    for c in state.stage_changes
                    if c["pipeline"] == pipeline and c["name"] == name and c["version"] == version
                ]
                deployed[(name, version)] = (v["stage"], max(changes or [v["at"]]) / 1000)
            else:
                retired.add((name, version))
            if v.get("stage") == "champion":
                champions.append((name, version))
        self.zombies.set_deployed(deployed)
        self._retire(retired, at)
        champion = max(champions, key=lambda k: k[1]) if champions else None
        self.quality.spec = spec
        if champion != self.champion or {f.name for f in spec.features} != getattr(
                self, "built_for", set(self.features)):
            log.info(
                "monitor_reference_changed", extra={"pipeline": spec.name, "champion": champion}
            )
            self.champion = champion
            profile = self.profiles.get(champion) if champion else None
            note = (
                f"the training profile of champion {champion[0]} v{champion[1]}"
                if profile and champion
                else "its first values (no champion with a reference profile)"
            )
            self._resolve(
                lambda k: k.signal == "drift" and k.detector == DRIFT,
                f"the reference was renewed: {note}",
                "new_reference",
                at,
            )
            self._build_features(profile, note)
        fresh = not self.refreshed
        self.refreshed = True
        for r in state.rebaselines.get(spec.name, []):
            if r["id"] in self.rebaselined:
                continue
            self.rebaselined.add(r["id"])
            if fresh:
                # Issued before this monitor saw any data: it has no recent traffic to take.
                log.info("monitor_rebaseline_skipped", extra={"pipeline": spec.name, "id": r["id"]})
                continue
            self.rebaseline(r, at)

    def rebaseline(self, command: dict[str, Any], at: int = 0) -> None:
        """Take the last ``window`` values of every column as its reference, and the last window of
        labels as each version's performance baseline; resolve the open drift and performance
        episodes."""
        at = at or now_ms()
        who = f"`loopline monitor rebaseline` ({command.get('actor') or 'cli'}"
        who += f": {command['reason']})" if command.get("reason") else ")"
        for watch in [
            *self.features.values(),
            *(w for ws in self.outputs.values() for w in ws.values()),
        ]:
            profile = watch.recent_profile()
            note = (
                f"its last {profile['count'] + profile['missing']} values before {who}"
                if profile
                else f"its first {self.window} values after {who}"
            )
            watch.renew(profile, note)
        self.performance.rebase()
        self._resolve(
            lambda k: k.signal in ("drift", "performance"),
            f"the reference was renewed by {who}: the monitor now compares with recent traffic",
            "rebaseline",
            at,
        )
        log.info("monitor_rebaselined", extra={"pipeline": self.spec.name, "id": command.get("id")})

    def _retire(self, retired: set[tuple[str, int]], at: int) -> None:
        """Forget the outputs of versions the registry no longer deploys; their episodes end."""
        for key in [k for k in self.outputs if k in retired]:
            del self.outputs[key]
        self._resolve(
            lambda k: (
                (k.signal == "performance" or k.detector == OUTPUT_DRIFT)
                and (k.model_name, k.model_version) in retired
            ),
            "the model version is no longer deployed",
            "retired",
            at,
        )

    def _resolve(self, which: Any, why: str, resolution: str, at: int) -> None:
        for key in [k for k in self.episodes.open if which(k)]:
            what = _subject(key)
            self.outbox += _some(
                self.episodes.observe(
                    key, None, f"{what}: episode closed, {why}.", at=at, resolution=resolution
                )
            )
            self.clear_since.pop(key, None)

    def _build_features(self, profile: dict[str, Any] | None, note: str) -> None:
        m = self.spec.monitor
        refs = (profile or {}).get("features", {})
        self.built_for = {f.name for f in self.spec.features}
        self.not_drift_tested = sorted(f.name for f in self.spec.features
                                       if not drift_tested(self.spec, f.name, refs.get(f.name)))
        self.features = {
            f.name: ColumnWatch(
                f.name,
                refs.get(f.name),
                f.type in ("float", "int"),
                list(m.detectors),
                m.seed,
                self.window,
                self.every,
                self.thresholds,
                note,
            )
            for f in self.spec.features
            if f.name not in self.not_drift_tested
        }

    def _outputs_of(self, key: tuple[str, int]) -> dict[str, ColumnWatch]:
        watches = self.outputs.get(key)
        if watches is None:
            m = self.spec.monitor
            profile = self.profiles.get(key, {})
            refs = profile.get("outputs") or {"value": None}
            note = f"the training profile of {key[0]} v{key[1]}"
            watches = self.outputs[key] = {
                name: ColumnWatch(
                    name,
                    ref,
                    name != "label",
                    list(m.detectors),
                    m.seed,
                    self.window,
                    self.every,
                    self.thresholds,
                    note if ref else None,
                )
                for name, ref in refs.items()
            }
        return watches

    # --- batches ------------------------------------------------------------------------------
    def on_features(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Quality and drift of one batch of feature events."""
        alerts = self._drain()
        self.features_seen_s = at / 1000
        columns = Columns.of_events(batch.records, self.spec.features)
        alerts += self._quality(self.quality.add_features(columns, batch.offsets), metrics, at)
        model = self.champion
        for name, watch in self.features.items():
            # A watch keeps its kind when the spec retypes a feature in place: give it what it knew.
            values = columns.values[name] if watch.numeric else columns.raw[name]
            finding = watch.update(values, batch.offsets, batch.partitions)
            alerts += self._drift("feature", name, watch, finding, batch, model, metrics, at)
        return alerts

    def on_dead_letters(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Quality counts from ingest's rejections."""
        return self._drain() + self._quality(
            self.quality.add_dead_letters(batch.records, batch.offsets), metrics, at
        )

    def on_predictions(
        self, batch: Batch, metrics: MonitorMetrics, at: int, now_s: float = 0.0
    ) -> list[Alert]:
        """Output drift per model version, traffic for zombie checks, joins with feedback."""
        alerts = self._drain()
        self.predictions_seen_s = now_s or at / 1000
        for key, sub in _by_version(batch).items():
            # Traffic is when the monitor saw it: immune to clock skew between hosts and backlogs.
            self.zombies.traffic(key[0], key[1], now_s or at / 1000, _spans(sub))
            outputs = _Outputs(sub.records)
            for name, watch in self._outputs_of(key).items():
                finding = watch.update(outputs.column(name), sub.offsets, sub.partitions)
                alerts += self._drift("output", name, watch, finding, sub, key, metrics, at)
        alerts += self._performance(
            self.performance.add_predictions(batch.records, batch.offsets), metrics, at
        )
        return alerts

    def on_feedback(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Join feedback to predictions; rolling metrics and degradation tests."""
        return self._drain() + self._performance(
            self.performance.add_feedback(batch.records, batch.offsets), metrics, at
        )

    def tick(self, now_s: float, watching_since_s: float, metrics: MonitorMetrics) -> list[Alert]:
        """Periodic work: zombie checks, closing a partial quality window when the stream paused."""
        alerts = self._drain() + self.check_zombies(now_s, watching_since_s, metrics)
        alerts += self.check_stalled(now_s, watching_since_s, metrics)
        pending = self.quality.events
        if pending and pending == self.quality_at_last_tick:
            reports = self.quality.flush(max(MIN_QUALITY_EVENTS, self.window // 4))
            alerts += self._quality(reports, metrics, int(now_s * 1000))
        self.quality_at_last_tick = self.quality.events
        return alerts

    def _drain(self) -> list[Alert]:
        out, self.outbox = self.outbox, []
        return out

    def readers(self, committed: dict[int, int]) -> None:
        """How far the groups reading this pipeline's predictions have committed, per partition."""
        self.zombies.read(committed)

    def check_stalled(self, now_s: float, watching_since_s: float,
                      metrics: MonitorMetrics) -> list[Alert]:
        """Serving stalled: feature events keep arriving, yet no prediction for stalled_after_s."""
        limit = self.spec.monitor.stalled_after_s
        features = getattr(self, "features_seen_s", None)
        predictions = getattr(self, "predictions_seen_s", None)
        last_served = predictions if predictions is not None else watching_since_s
        stalled = (self.champion is not None and features is not None and now_s - features < limit
                   and now_s - last_served > limit and features > last_served)
        metrics.stalled.labels(self.spec.name).set(1.0 if stalled else 0.0)
        key = EpisodeKey("stalled", detector="no_predictions")
        if stalled:
            since = now_s - last_served
            msg = (f"Serving of pipeline {self.spec.name} has stalled: feature events keep "
                   f"arriving on {self.spec.topics.features} but no prediction came on "
                   f"{self.spec.topics.predictions} "
                   f"for {since:.0f}s (stalled after {limit:.0f}s). Check the inference service: "
                   "its readiness says why (broker, a pipeline without a working version, a stuck "
                   "batch).")
            return _some(self.episodes.observe(key, "alert", msg, at=int(now_s * 1000),
                                               statistic=since, threshold=limit))
        if key in self.episodes.open:
            return _some(self.episodes.observe(key, None, "Predictions flow again.",
                                               at=int(now_s * 1000)))
        return []

    def check_zombies(
        self, now_s: float, watching_since_s: float, metrics: MonitorMetrics
    ) -> list[Alert]:
        """Report deployed versions without traffic or readers for spec.monitor.zombie_after_s."""
        alerts = []
        at, limit = int(now_s * 1000), self.spec.monitor.zombie_after_s
        seen = set()
        for s in self.zombies.check(now_s, watching_since_s):
            labels = (self.spec.name, s.model_name, str(s.model_version), s.stage)
            metrics.idle.labels(*labels).set(s.idle_s)
            metrics.unread.labels(*labels).set(s.unread_s)
            metrics.zombie.labels(*labels).set(1.0 if s.idle or s.unread else 0.0)
            model = f"Model {s.model_name} v{s.model_version} ({s.stage})"
            version: dict[str, Any] = {"model_name": s.model_name, "model_version": s.model_version}
            idle = EpisodeKey("zombie", detector="no_traffic", **version)
            msg = (
                f"{model} has served no predictions for {s.idle_s:.0f}s "
                f"(zombie after {limit:.0f}s)."
                if s.idle
                else f"{model} has traffic again."
            )
            alerts += _some(
                self.episodes.observe(
                    idle,
                    "warning" if s.idle else None,
                    msg,
                    at=at,
                    statistic=s.idle_s,
                    threshold=limit,
                )
            )
            unread = EpisodeKey("zombie", detector="unread", **version)
            readers = (
                ", ".join(self.spec.monitor.readers) or "no consumer group outside Loopline's own"
            )
            msg = (
                f"{model}: nobody has read its predictions on {self.spec.topics.predictions} for "
                f"{s.unread_s:.0f}s (readers: {readers}; zombie after {limit:.0f}s)."
                if s.unread
                else f"{model}: its predictions are being read again."
            )
            alerts += _some(
                self.episodes.observe(
                    unread,
                    "warning" if s.unread else None,
                    msg,
                    at=at,
                    statistic=s.unread_s,
                    threshold=limit,
                )
            )
            seen |= {idle, unread}
        for key in [k for k in self.episodes.open if k.signal == "zombie" and k not in seen]:
            msg = f"Model {key.model_name} v{key.model_version} is no longer deployed."
            alerts += _some(self.episodes.observe(key, None, msg, at=at))
        return alerts

    # --- alert derivation -----------------------------------------------------------------------
    def _drift(
        self,
        subject: str,
        name: str,
        watch: ColumnWatch,
        finding: Finding,
        batch: Batch,
        model: tuple[str, int] | None,
        metrics: MonitorMetrics,
        at: int,
    ) -> list[Alert]:
        alerts: list[Alert] = []
        for det, _ in finding.detections:  # early warnings: counted, never alerts by themselves
            metrics.detections.labels(self.spec.name, subject, name, det).inc()
        if finding.dropped:
            log.debug(
                "monitor_warning_unconfirmed", extra={"pipeline": self.spec.name, "column": name}
            )
        label = f"{model[0]}:{model[1]}" if model else ""
        key = EpisodeKey(
            "drift", name, DRIFT if subject == "feature" else OUTPUT_DRIFT, *(model or (None, None))
        )
        what = (
            f"Feature '{name}'"
            if subject == "feature"
            else f"Output '{name}' of model {model[0]} v{model[1]}"  # type: ignore[index]  # an output's drift has a model
        )
        t = self.thresholds
        w, r = finding.warning, finding.windowed
        found = []
        if finding.confirmed is not None and w is not None:
            found.append(
                (
                    finding.confirmed,
                    (
                        f"an early warning of {w.detector} at {batch.topic} partition "
                        f"{w.partition} offset {w.offset}, confirmed on the events since the change"
                    ),
                )
            )
        if r is not None:
            metrics.psi.labels(self.spec.name, subject, name, label).set(r.psi)
            if r.level is not None:
                found.append((r, f"the comparison of the last {r.n} events with the reference"))
        for c, how in found:
            perf = self._performance_of(model if subject == "output" else self.champion)
            text = messages.drift_text(what, c, t, watch.reference_note, batch.topic, how)
            action = messages.drift_action(
                self.spec.name, name, subject, perf, self.spec.monitor.min_performance_drop
            )
            fields = {
                **messages.drift_fields(c, t, c.level or "warning"),
                **(perf.fields() if perf else {}),
            }
            alerts += _some(
                self.episodes.observe(
                    key,
                    c.level,
                    f"{text} {perf.text() if perf else 'No labeled feedback yet.'}",
                    at=at,
                    offset=c.last_offset,
                    action=action,
                    **fields,
                )
            )
            self.clear_since.pop(key, None)
        if r is not None and not found and self.episodes.is_open(key):
            if r.effect >= t.psi_warning:
                self.clear_since.pop(key, None)
            else:
                position = r.start + r.n
                since = self.clear_since.setdefault(key, position)
                if position - since >= self.resolve_after:
                    msg = (
                        f"{what} is back in line with {watch.reference_note}: PSI {r.effect:.3f} "
                        f"beyond chance (warning at {t.psi_warning}) over the last {r.n} events, "
                        "and no more than "
                        f"that for {position - since} events; {messages.moved(r)}."
                    )
                    alerts += _some(
                        self.episodes.observe(
                            key,
                            None,
                            msg,
                            at=at,
                            offset=batch.offsets[-1],
                            statistic=r.effect,
                            threshold=t.psi_warning,
                            window=r.n,
                            reference_value=r.reference_value,
                            current_value=r.current_value,
                            resolution="cleared",
                        )
                    )
                    del self.clear_since[key]
        episode = self.episodes.open.get(key)
        watch.open_level = episode.severity if episode is not None else None
        if episode is None:
            watch.change_start = None
        elif watch.change_start is None and found:
            watch.change_start = min(c.start for c, _ in found)
        return alerts

    def _performance_of(self, model: tuple[str, int] | None) -> Performance | None:
        """Labeled-feedback performance of a model version (its most labeled variant)."""
        if model is None:
            return None
        variants = [k for k in self.performance.rolling if k[:2] == model]
        if not variants:
            return None
        variant = max(variants, key=lambda k: self.performance.labeled.get(k, 0))
        recent = self.performance.recent(variant)
        if recent is None:
            return None
        now, base, labeled = recent
        return Performance(
            "mae" if self.performance.regression else "accuracy",
            base,
            now,
            labeled,
            min(RECENT, len(self.performance.rolling[variant])),
        )

    def _quality(self, reports: list[Any], metrics: MonitorMetrics, at: int) -> list[Alert]:
        alerts: list[Alert] = []
        base = self.tuning.quality_alert_rate
        refs = (self.profiles.get(self.champion, {}) if self.champion else {}).get("features", {})
        for report in reports:
            for (feature, kind), rate in sorted(report.rates.items()):
                metrics.quality.labels(self.spec.name, feature, kind).set(rate)
                key = EpisodeKey("quality", feature, kind)
                limit = base
                ref = refs.get(feature)
                if kind == "missing" and ref and (ref.get("count", 0) + ref.get("missing", 0)):
                    # An optional feature may be missing as often as in the reference, plus margin.
                    limit = min(1.0, base + ref["missing"] / (ref["count"] + ref["missing"]))
                level = "alert" if rate >= limit else None
                if level is None and not self.episodes.is_open(key):
                    continue
                msg = (
                    f"Data quality of feature '{feature}': {rate:.1%} of the last "
                    f"{report.events} events "
                    f"had {kind.replace('_', ' ')} (limit {limit:.1%})."
                    if level
                    else f"Data quality of feature '{feature}' recovered: {kind.replace('_', ' ')} "
                    f"{rate:.1%} of the last {report.events} events (limit {limit:.1%})."
                )
                alerts += _some(
                    self.episodes.observe(
                        key,
                        level,
                        msg,
                        at=at,
                        offset=report.last_offset,
                        statistic=rate,
                        threshold=limit,
                        window=report.events,
                    )
                )
        return alerts

    def _performance(self, scored: list[Scored], metrics: MonitorMetrics, at: int) -> list[Alert]:
        alerts: list[Alert] = []
        tracker = self.performance
        metric_name = "mae" if tracker.regression else "accuracy"
        min_drop = self.spec.monitor.min_performance_drop
        for s in scored:
            labels = (self.spec.name, s.model_name, str(s.model_version), s.variant)
            metrics.model_metric.labels(*labels, metric_name).set(s.metric)
            metrics.labeled.labels(*labels).set(s.labeled)
            model = f"{s.model_name} v{s.model_version}"
            for det, _ in s.detections:  # early warnings: counted, never alerts by themselves
                metrics.detections.labels(self.spec.name, "errors", model, det).inc()
            key = EpisodeKey("performance", None, ERRORS, s.model_name, s.model_version)
            found = []
            if s.confirmed is not None:
                found.append(
                    (
                        s.confirmed,
                        (
                            f"an early warning of {s.warned_by} on its error stream, confirmed "
                            "on the labels since the change"
                        ),
                    )
                )
            if s.windowed is not None and s.windowed.degraded:
                found.append(
                    (
                        s.windowed,
                        f"the comparison of its last {s.windowed.n} labels with its baseline",
                    )
                )
            perf = self._performance_of((s.model_name, s.model_version))
            for r, how in found:
                msg = messages.performance_text(
                    model, s.variant, r, tracker.regression, how, min_drop
                )
                alerts += _some(
                    self.episodes.observe(
                        key,
                        "alert",
                        msg,
                        at=at,
                        offset=r.last_offset,
                        action=messages.performance_action(self.spec.name),
                        **messages.performance_fields(r, min_drop),
                        **(perf.fields() if perf else {}),
                    )
                )
                self.clear_since.pop(key, None)
            w = s.windowed
            if w is not None and not found and self.episodes.is_open(key):
                if w.drop >= min_drop:
                    self.clear_since.pop(key, None)
                else:
                    since = self.clear_since.setdefault(key, s.labeled)
                    if s.labeled - since >= tracker.window // 2:
                        change = (
                            f"MAE {w.test.mean:.4g} vs {w.test.baseline:.4g}"
                            if tracker.regression
                            else f"accuracy {1 - w.test.mean:.3f} vs {1 - w.test.baseline:.3f}"
                        )
                        msg = (
                            f"Performance of model {model} ({s.variant}) recovered: {change} in "
                            "its baseline "
                            f"window over the last {w.n} labels, within the alert margin for "
                            f"{s.labeled - since} labels."
                        )
                        alerts += _some(
                            self.episodes.observe(
                                key,
                                None,
                                msg,
                                at=at,
                                offset=int(s.offsets[-1]),
                                statistic=w.drop,
                                threshold=min_drop,
                                window=w.n,
                                reference_value=w.test.baseline,
                                current_value=w.test.mean,
                                resolution="cleared",
                                **(perf.fields() if perf else {}),
                            )
                        )
                        del self.clear_since[key]
            watch = tracker.watches.get((s.model_name, s.model_version, s.variant))
            if watch is not None:
                watch.degraded = self.episodes.is_open(key)
        if scored:  # per batch: debug (the metrics and alerts carry it at a readable rate)
            log.debug(
                "performance_side_by_side",
                extra={
                    "pipeline": self.spec.name,
                    "metric": metric_name,
                    "variants": tracker.side_by_side(),
                },
            )
        return alerts


#: A string feature whose reference has at least this share of distinct values is an identifier.
ID_LIKE_DISTINCT = 0.5


def drift_tested(spec: PipelineSpec, name: str, reference: dict[str, Any] | None) -> bool:
    """Whether a feature's distribution is watched for drift: keys and id-like features are not.

    The key feature names entities, and a string whose reference values are mostly distinct (a
    customer or device id) has no distribution to drift: new ids are the norm. Their data quality
    (missing values, type errors) is still checked.
    """
    if name == spec.key:
        return False
    feature = next(f for f in spec.features if f.name == name)
    if feature.type != "string" or feature.values is not None or not reference:
        return True
    fractions, count = reference.get("fractions") or {}, reference.get("count") or 0
    return not (count >= 20 and len(fractions) >= ID_LIKE_DISTINCT * count)


def _output(prediction: dict[str, Any], name: str) -> Any:
    """The value of output ``name`` in a prediction: the label, a class score, or the value."""
    if name == "label":
        return prediction.get("label")
    scores = prediction.get("scores") or {}
    if name in scores:
        return scores[name]
    return prediction.get("value")


_MODEL = itemgetter("model_name", "model_version")
_LABEL = itemgetter("label")
_VALUE = itemgetter("value")
_SCORES = itemgetter("scores")


class _Outputs:
    """Output columns of one version's predictions, each read from the records once."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self._values: list[Any] | None = None
        self._scores: list[Any] | None = None

    def column(self, name: str) -> list[Any]:
        """Output ``name`` of every prediction, as :func:`_output` reads it."""
        records = self.records
        try:
            if name == "label":
                return list(map(_LABEL, records))
            if self._values is None:
                self._values, self._scores = list(map(_VALUE, records)), list(map(_SCORES, records))
            # Decoded predictions always carry a scores map; None or a missing key falls back below.
            # Not s.get(): a None map must raise the TypeError caught below, not an AttributeError.
            scores, values = self._scores, self._values
            return [s[name] if name in s else v  # noqa: SIM401 - see above
                    for s, v in zip(scores, values)]  # type: ignore[arg-type]  # both set above
        except (KeyError, TypeError):
            return [_output(r, name) for r in records]


def _by_version(batch: Batch) -> dict[tuple[str, int], Batch]:
    """The predictions of each (model name, version) in ``batch``, in order of first appearance."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(map(_MODEL, batch.records)):
        idx = groups.get(key)
        if idx is None:
            groups[key] = [i]
        else:
            idx.append(i)
    if len(groups) == 1:
        return {key: batch for key in groups}
    out = {}
    for key, idx in groups.items():
        if len(idx) == 1:  # itemgetter of one index returns the item, not a tuple
            i = idx[0]
            out[key] = Batch(
                [batch.records[i]], [batch.offsets[i]], [batch.partitions[i]], batch.topic
            )
        else:
            pick = itemgetter(*idx)
            out[key] = Batch(
                list(pick(batch.records)),
                list(pick(batch.offsets)),
                list(pick(batch.partitions)),
                batch.topic,
            )
    return out


def _spans(batch: Batch) -> dict[int, tuple[int, int]]:
    """Per partition (in order of first appearance), the first and last offset in ``batch``."""
    partitions, offsets = batch.partitions, batch.offsets
    order = dict.fromkeys(partitions)
    if len(order) == 1:
        return {partitions[0]: (min(offsets), max(offsets))}
    spans: dict[int, tuple[int, int]] = {}
    for partition in order:  # a few partitions: one C-level pass over the batch for each
        mine = list(compress(offsets, map(partition.__eq__, partitions)))
        spans[partition] = (min(mine), max(mine))
    return spans


def _some(event: Alert | None) -> list[Alert]:
    return [] if event is None else [event]


def _subject(key: EpisodeKey) -> str:
    """What an episode is about, for a message."""
    version = f" of model {key.model_name} v{key.model_version}" if key.model_name else ""
    if key.signal == "performance":
        return f"Performance{version}"
    if key.detector == OUTPUT_DRIFT:
        return f"Output '{key.feature}'{version}"
    return f"Feature '{key.feature}'"
