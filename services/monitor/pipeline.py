"""Everything the monitor tracks for one pipeline, and the alerts it derives from each batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Any

import orjson

from loopline.registry import RegistryState
from loopline.services.monitor.episodes import EpisodeKey, Episodes
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.performance import RECENT, PerformanceTracker
from loopline.services.monitor.quality import Columns, QualityTracker
from loopline.services.monitor.streams import ColumnWatch, Finding
from loopline.services.monitor.windowed import Thresholds
from loopline.services.monitor.zombie import DEPLOYED, ZombieWatch
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)

WINDOWED = "psi_ks"
MIN_QUALITY_EVENTS = 50  # a partial quality window needs this many events (and a quarter window) to be judged
Alert = dict[str, Any]


@dataclass(frozen=True)
class Tuning:
    """Service-level knobs (from MonitorSettings) that complete the spec's monitor section."""

    drift_eval_every: int = 0
    resolve_after: int = 0
    quality_alert_rate: float = 0.05


@dataclass(frozen=True)
class Batch:
    """Decoded records of one topic in one consumed batch, with where each came from."""

    records: list[dict[str, Any]]
    offsets: list[int]
    partitions: list[int]
    topic: str


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


class PipelineMonitor:
    """Drift, quality, performance and zombie tracking of one pipeline (picklable: no clients inside)."""

    def __init__(self, spec: PipelineSpec, tuning: Tuning) -> None:
        self.spec = spec
        self.tuning = tuning
        m = spec.monitor
        self.window = m.window
        self.every = tuning.drift_eval_every or max(1, m.window // 4)
        self.resolve_after = tuning.resolve_after or m.window
        self.thresholds = Thresholds(m.psi_warning, m.psi_alert, m.ks_alert_pvalue)
        self.episodes = Episodes(spec.name)
        self.quality = QualityTracker(spec, m.window)
        self.performance = PerformanceTracker(
            spec.label.task, spec.label.classes, m.performance_window, int(spec.trainer.label_ttl_s * 1000),
            list(m.error_detectors), m.seed)
        self.zombies = ZombieWatch(m.zombie_after_s)
        self.champion: tuple[str, int] | None = None
        self.features: dict[str, ColumnWatch] = {}
        self.outputs: dict[tuple[str, int], dict[str, ColumnWatch]] = {}
        self.profiles: dict[tuple[str, int], dict[str, Any]] = {}
        self.perf_quiet: dict[EpisodeKey, int] = {}  # labeled predictions since a detector's last signal
        self.quality_at_last_tick = 0
        self._build_features(None)

    # --- registry ---------------------------------------------------------------------------
    def refresh(self, state: RegistryState) -> None:
        """Follow the registry: new spec, reference profiles, champion and deployed versions."""
        spec = state.specs.get(self.spec.name, self.spec)
        self.spec = spec
        deployed: dict[tuple[str, int], tuple[str, float]] = {}
        champions = []
        for (pipeline, name, version), v in state.versions.items():
            if pipeline != spec.name:
                continue
            if (name, version) not in self.profiles and v.get("reference_profile_json"):
                try:
                    self.profiles[(name, version)] = orjson.loads(v["reference_profile_json"])
                except orjson.JSONDecodeError as e:
                    log.error("reference_profile_unreadable", extra={
                        "pipeline": spec.name, "model": name, "version": version, "error": str(e)})
            if v.get("stage") in DEPLOYED:
                changes = [c["at"] for c in state.stage_changes
                           if c["pipeline"] == pipeline and c["name"] == name and c["version"] == version]
                deployed[(name, version)] = (v["stage"], max(changes or [v["at"]]) / 1000)
            if v.get("stage") == "champion":
                champions.append((name, version))
        self.zombies.set_deployed(deployed)
        champion = max(champions, key=lambda k: k[1]) if champions else None
        self.quality.spec = spec
        if champion != self.champion or {f.name for f in spec.features} != set(self.features):
            log.info("monitor_reference_changed", extra={"pipeline": spec.name, "champion": champion})
            self.champion = champion
            self._build_features(self.profiles.get(champion) if champion else None)

    def _build_features(self, profile: dict[str, Any] | None) -> None:
        m = self.spec.monitor
        refs = (profile or {}).get("features", {})
        self.features = {
            f.name: ColumnWatch(f.name, refs.get(f.name), f.type in ("float", "int"), list(m.detectors), m.seed,
                                self.window, self.every, self.thresholds)
            for f in self.spec.features}

    def _outputs_of(self, key: tuple[str, int]) -> dict[str, ColumnWatch]:
        watches = self.outputs.get(key)
        if watches is None:
            m = self.spec.monitor
            refs = self.profiles.get(key, {}).get("outputs") or {"value": None}
            watches = self.outputs[key] = {
                name: ColumnWatch(name, ref, name != "label", list(m.detectors), m.seed, self.window,
                                  self.every, self.thresholds)
                for name, ref in refs.items()}
        return watches

    # --- batches ------------------------------------------------------------------------------
    def on_features(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Quality and drift of one batch of feature events."""
        columns = Columns.of_events(batch.records, self.spec.features)
        alerts = self._quality(self.quality.add_features(columns, batch.offsets), metrics, at)
        model = self.champion
        for name, watch in self.features.items():
            # A watch keeps its kind when the spec retypes a feature in place: give it what it knew.
            values = columns.values[name] if watch.numeric else columns.raw[name]
            finding = watch.update(values, columns.missing[name])
            alerts += self._drift("feature", name, watch, finding, batch, model, metrics, at)
        return alerts

    def on_dead_letters(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Quality counts from ingest's rejections."""
        return self._quality(self.quality.add_dead_letters(batch.records, batch.offsets), metrics, at)

    def on_predictions(self, batch: Batch, metrics: MonitorMetrics, at: int, now_s: float = 0.0) -> list[Alert]:
        """Output drift per model version, traffic for zombie checks, and joins with earlier feedback."""
        alerts: list[Alert] = []
        for key, sub in _by_version(batch).items():
            # Traffic is when the monitor saw it: immune to clock skew between hosts and to backlogs.
            self.zombies.traffic(key[0], key[1], now_s or at / 1000, _spans(sub))
            outputs = _Outputs(sub.records)
            for name, watch in self._outputs_of(key).items():
                finding = watch.update(outputs.column(name))
                alerts += self._drift("output", name, watch, finding, sub, key, metrics, at)
        alerts += self._performance(self.performance.add_predictions(batch.records, batch.offsets), metrics, at)
        return alerts

    def on_feedback(self, batch: Batch, metrics: MonitorMetrics, at: int) -> list[Alert]:
        """Join feedback to predictions; rolling metrics and error-stream detectors."""
        return self._performance(self.performance.add_feedback(batch.records, batch.offsets), metrics, at)

    def tick(self, now_s: float, watching_since_s: float, metrics: MonitorMetrics) -> list[Alert]:
        """Periodic work: zombie checks, and closing a partial quality window when the stream paused."""
        alerts = self.check_zombies(now_s, watching_since_s, metrics)
        pending = self.quality.events
        if pending and pending == self.quality_at_last_tick:
            reports = self.quality.flush(max(MIN_QUALITY_EVENTS, self.window // 4))
            alerts += self._quality(reports, metrics, int(now_s * 1000))
        self.quality_at_last_tick = self.quality.events
        return alerts

    def readers(self, committed: dict[int, int]) -> None:
        """How far the groups that read this pipeline's predictions have committed, per partition."""
        self.zombies.read(committed)

    def check_zombies(self, now_s: float, watching_since_s: float, metrics: MonitorMetrics) -> list[Alert]:
        """Report deployed versions without traffic, or without readers, for spec.monitor.zombie_after_s."""
        alerts = []
        at, limit = int(now_s * 1000), self.spec.monitor.zombie_after_s
        seen = set()
        for s in self.zombies.check(now_s, watching_since_s):
            labels = (self.spec.name, s.model_name, str(s.model_version), s.stage)
            metrics.idle.labels(*labels).set(s.idle_s)
            metrics.unread.labels(*labels).set(s.unread_s)
            metrics.zombie.labels(*labels).set(1.0 if s.idle or s.unread else 0.0)
            model = f"Model {s.model_name} v{s.model_version} ({s.stage})"
            version = {"model_name": s.model_name, "model_version": s.model_version}
            idle = EpisodeKey("zombie", detector="no_traffic", **version)
            msg = (f"{model} has served no predictions for {s.idle_s:.0f}s (zombie after {limit:.0f}s)."
                   if s.idle else f"{model} has traffic again.")
            alerts += _some(self.episodes.observe(idle, "warning" if s.idle else None, msg, at=at,
                                                  statistic=s.idle_s, threshold=limit))
            unread = EpisodeKey("zombie", detector="unread", **version)
            readers = ", ".join(self.spec.monitor.readers) or "no consumer group outside Loopline's own"
            msg = (f"{model}: nobody has read its predictions on {self.spec.topics.predictions} for "
                   f"{s.unread_s:.0f}s (readers: {readers}; zombie after {limit:.0f}s)." if s.unread else
                   f"{model}: its predictions are being read again.")
            alerts += _some(self.episodes.observe(unread, "warning" if s.unread else None, msg, at=at,
                                                  statistic=s.unread_s, threshold=limit))
            seen |= {idle, unread}
        for key in [k for k in self.episodes.open if k.signal == "zombie" and k not in seen]:
            msg = f"Model {key.model_name} v{key.model_version} is no longer deployed."
            alerts += _some(self.episodes.observe(key, None, msg, at=at))
        return alerts

    # --- alert derivation -----------------------------------------------------------------------
    def _drift(self, subject: str, name: str, watch: ColumnWatch, finding: Finding, batch: Batch,
               model: tuple[str, int] | None, metrics: MonitorMetrics, at: int) -> list[Alert]:
        alerts: list[Alert] = []
        what = f"Feature '{name}'" if subject == "feature" else \
            f"Output '{name}' of model {model[0]} v{model[1]}"  # type: ignore[index]
        out_model = model if subject == "output" else (None, None)
        fired: dict[str, int] = {}
        for det, i in finding.detections:
            metrics.detections.labels(self.spec.name, subject, name, det).inc()
            fired.setdefault(det, i)
        for d in watch.detectors:
            key = EpisodeKey("drift", name, d.name, *out_model)
            if d.name in fired:
                i = fired[d.name]
                msg = (f"{what} drifted: {d.name} detected a change at {batch.topic} partition "
                       f"{batch.partitions[i]} offset {batch.offsets[i]}; recent mean {_fmt(watch.recent_mean())} "
                       f"vs reference mean {_fmt(watch.reference_mean)} (sd {_fmt(watch.reference_std)}).")
                alerts += _some(self.episodes.observe(key, "alert", msg, at=at, offset=batch.offsets[i],
                                                      window=d.seen, statistic=watch.recent_mean()))
            elif self.episodes.is_open(key) and finding.quiet.get(d.name, 0) >= self.resolve_after:
                msg = (f"{what}: {d.name} has detected no further change for {finding.quiet[d.name]} events; "
                       f"recent mean {_fmt(watch.recent_mean())}.")
                alerts += _some(self.episodes.observe(key, None, msg, at=at, offset=batch.offsets[-1],
                                                      window=finding.quiet[d.name]))
        r = finding.windowed
        if r is not None:
            ref_model = model
            label = f"{ref_model[0]}:{ref_model[1]}" if ref_model else ""
            metrics.psi.labels(self.spec.name, subject, name, label).set(r.psi)
            if r.ks_pvalue is not None:
                metrics.ks_pvalue.labels(self.spec.name, subject, name, label).set(r.ks_pvalue)
            key = EpisodeKey("drift", name, WINDOWED, *(ref_model or (None, None)))
            t = self.thresholds
            ks = f", KS statistic {_fmt(r.ks_statistic)} p={r.ks_pvalue:.2g}" if r.ks_pvalue is not None else ""
            ref = f"model {ref_model[0]} v{ref_model[1]}" if ref_model else "the reference"
            if r.level is not None:
                threshold = t.psi_alert if r.level == "alert" else t.psi_warning
                msg = (f"{what} drifted from the reference profile of {ref}: PSI {r.psi:.3f} "
                       f"(warning {t.psi_warning}, alert {t.psi_alert}){ks} over the last {r.window} events, "
                       f"up to {batch.topic} offset {batch.offsets[-1]}.")
            else:
                threshold = t.psi_warning
                msg = (f"{what} is back in line with the reference profile of {ref}: PSI {r.psi:.3f} "
                       f"< {t.psi_warning}{ks} over the last {r.window} events.")
            alerts += _some(self.episodes.observe(key, r.level, msg, at=at, offset=batch.offsets[-1],
                                                  statistic=r.psi, threshold=threshold, window=r.window))
        return alerts

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
                    # An optional feature may be missing as often as in the reference, plus the margin.
                    limit = min(1.0, base + ref["missing"] / (ref["count"] + ref["missing"]))
                level = "alert" if rate >= limit else None
                if level is None and not self.episodes.is_open(key):
                    continue
                msg = (f"Data quality of feature '{feature}': {rate:.1%} of the last {report.events} events "
                       f"had {kind.replace('_', ' ')} (limit {limit:.1%})." if level else
                       f"Data quality of feature '{feature}' recovered: {kind.replace('_', ' ')} "
                       f"{rate:.1%} of the last {report.events} events (limit {limit:.1%}).")
                alerts += _some(self.episodes.observe(key, level, msg, at=at, offset=report.last_offset,
                                                      statistic=rate, threshold=limit, window=report.events))
        return alerts

    def _performance(self, scored: list[Any], metrics: MonitorMetrics, at: int) -> list[Alert]:
        alerts: list[Alert] = []
        metric_name = "mae" if self.performance.regression else "accuracy"
        for s in scored:
            labels = (self.spec.name, s.model_name, str(s.model_version), s.variant)
            metrics.model_metric.labels(*labels, metric_name).set(s.metric)
            metrics.labeled.labels(*labels).set(s.labeled)
            variant = (s.model_name, s.model_version, s.variant)
            drop = self.performance.degradation(variant)
            for det in self.performance.detectors[variant]:
                key = EpisodeKey("performance", None, det.name, s.model_name, s.model_version)
                hits = [off for name, off in s.detections if name == det.name]
                # A detector's alarm becomes an alert only when the error really rose by the configured
                # margin: with a near-perfect model DDM alarms on a couple of errors in a row.
                if (hits or self.performance.recent_alarm(variant, det.name)) and drop is not None \
                        and drop >= self.spec.monitor.min_performance_drop and not self.episodes.is_open(key):
                    offset = hits[0] if hits else int(s.offsets[-1])
                    change = (f"accuracy {-drop:+.3f} vs its first {self.performance.window} labels"
                              if not self.performance.regression else f"MAE {drop:+.0%} vs its first "
                              f"{self.performance.window} labels")
                    msg = (f"Performance of model {s.model_name} v{s.model_version} ({s.variant}) degraded: "
                           f"{det.name} detected a change in its error stream (feedback offset {offset}); "
                           f"{change} over the last {min(s.labeled, RECENT)} labeled predictions; rolling "
                           f"{metric_name} {s.metric:.3f} over the last "
                           f"{min(s.labeled, self.performance.window)}.")
                    alerts += _some(self.episodes.observe(key, "alert", msg, at=at, offset=offset,
                                                          statistic=s.metric, window=s.labeled,
                                                          threshold=self.spec.monitor.min_performance_drop))
                    self.perf_quiet[key] = 0
                elif hits and self.episodes.is_open(key):
                    self.perf_quiet[key] = 0
                elif self.episodes.is_open(key):
                    self.perf_quiet[key] = self.perf_quiet.get(key, 0) + len(s.errors)
                    if self.perf_quiet[key] >= self.performance.window:
                        msg = (f"Performance of model {s.model_name} v{s.model_version} ({s.variant}) is stable "
                               f"again: rolling {metric_name} {s.metric:.3f}, no change detected by {det.name} "
                               f"for {self.perf_quiet[key]} labeled predictions.")
                        alerts += _some(self.episodes.observe(key, None, msg, at=at, offset=int(s.offsets[-1]),
                                                              statistic=s.metric, window=s.labeled))
        if scored:
            log.info("performance_side_by_side", extra={"pipeline": self.spec.name, "metric": metric_name,
                                                        "variants": self.performance.side_by_side()})
        return alerts


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
            return [s[name] if name in s else v for s, v in zip(self._scores, self._values)]
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
            out[key] = Batch([batch.records[i]], [batch.offsets[i]], [batch.partitions[i]],
                             batch.topic)
        else:
            pick = itemgetter(*idx)
            out[key] = Batch(list(pick(batch.records)), list(pick(batch.offsets)),
                             list(pick(batch.partitions)), batch.topic)
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

