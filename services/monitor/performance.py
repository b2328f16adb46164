"""Performance from late feedback: join feedback to predictions, rolling accuracy / MAE per variant.

Feedback names a ``prediction_id`` or an ``event_id`` and carries a label (or value), or only a
verdict (accept / reject / correct) on the prediction that was served. The truth it implies is
kept per event for the label TTL, so every prediction of that event (champion, challengers,
shadows) is scored against the same truth, whichever of feedback and prediction arrives first.
Predictions wait at most ``ttl_ms`` (stream time) for their feedback.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.services.monitor.detectors import Detector, error_detector_names


@dataclass
class Pending:
    """A prediction waiting for its feedback."""

    model_name: str
    model_version: int
    variant: str
    served: bool
    label: str | None
    value: float | None
    event_id: str
    scored_at: int


@dataclass(frozen=True)
class Scored:
    """Errors of one (model, version, variant) in a batch, and the detectors that fired on them."""

    model_name: str
    model_version: int
    variant: str
    errors: np.ndarray
    offsets: np.ndarray
    detections: list[tuple[str, int]]  # (detector, offset)
    metric: float  # rolling accuracy (classification) or MAE (regression)
    labeled: int


VariantKey = tuple[str, int, str]


#: Labels in the "recent" error rate compared with the baseline.
RECENT = 200
#: How many standard errors above the baseline the recent error rate must be (classification).
Z_MIN = 3.0


@dataclass
class PerformanceTracker:
    """Joins feedback with predictions of one pipeline and keeps rolling metrics per variant."""

    task: str
    classes: list[str] | None
    window: int
    ttl_ms: int
    detector_names: list[str]
    seed: int
    max_pending: int = 1_000_000
    predictions: dict[str, Pending] = field(default_factory=dict)
    by_event: dict[str, list[str]] = field(default_factory=dict)
    truths: dict[str, tuple[Any, int]] = field(default_factory=dict)
    waiting: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    seen_feedback: dict[str, int] = field(default_factory=dict)
    rolling: dict[VariantKey, deque[float]] = field(default_factory=dict)
    detectors: dict[VariantKey, list[Detector]] = field(default_factory=dict)
    labeled: dict[VariantKey, int] = field(default_factory=dict)
    #: Error of each variant over its first full window: what "not degraded" means for it.
    baseline: dict[VariantKey, float] = field(default_factory=dict)
    #: Labeled count at each detector's latest alarm, per variant.
    alarms: dict[tuple[VariantKey, str], int] = field(default_factory=dict)
    expired: int = 0
    clock: int = 0  # stream time: the latest event time seen, epoch ms

    @property
    def regression(self) -> bool:
        """Whether errors are absolute errors (regression) rather than 0/1."""
        return self.task == "regression"

    def add_predictions(self, records: list[dict[str, Any]], offsets: list[int]) -> list[Scored]:
        """Remember predictions; score those whose truth is already known."""
        errors: dict[VariantKey, tuple[list[float], list[int]]] = {}
        retry: list[tuple[dict[str, Any], int]] = []
        for p, off in zip(records, offsets):
            self.clock = max(self.clock, p["scored_at"])
            pid, eid = p["prediction_id"], p["event_id"]
            pending = Pending(p["model_name"], p["model_version"], str(p["variant"]), p["served"],
                              p.get("label"), p.get("value"), eid, p["scored_at"])
            truth = self.truths.get(eid)
            if truth is not None:
                self._score(pending, truth[0], off, errors)
                continue
            if pid not in self.predictions:
                self.by_event.setdefault(eid, []).append(pid)
            self.predictions[pid] = pending
            for key in (pid, eid):
                if key in self.waiting:
                    retry.append(self.waiting.pop(key))
        for fb, off in retry:
            self._apply_feedback(fb, off, errors)
        self._prune()
        return self._finish(errors)

    def add_feedback(self, records: list[dict[str, Any]], offsets: list[int]) -> list[Scored]:
        """Join feedback with known predictions (or keep it until they arrive); score them."""
        errors: dict[VariantKey, tuple[list[float], list[int]]] = {}
        for fb, off in zip(records, offsets):
            self.clock = max(self.clock, fb["ts"])
            if fb["feedback_id"] in self.seen_feedback:
                continue  # a resend: counted once
            self.seen_feedback[fb["feedback_id"]] = fb["ts"]
            self._apply_feedback(fb, off, errors)
        self._prune()
        return self._finish(errors)

    def _apply_feedback(self, fb: dict[str, Any], offset: int,
                        errors: dict[VariantKey, tuple[list[float], list[int]]]) -> None:
        pid, eid = fb.get("prediction_id"), fb.get("event_id")
        ref = self.predictions.get(pid) if pid else None
        if ref is None and eid:
            served = [self.predictions[x] for x in self.by_event.get(eid, []) if x in self.predictions]
            ref = next((p for p in served if p.served), served[0] if served else None)
        eid = eid or (ref.event_id if ref else None)
        truth = self._truth(fb, ref)
        if truth is None or eid is None:
            if ref is None and (pid or eid):
                self.waiting[pid or eid] = (fb, offset)  # type: ignore[index]
            return
        self.truths[eid] = (truth, fb["ts"])
        for x in self.by_event.pop(eid, []):
            p = self.predictions.pop(x, None)
            if p is not None:
                self._score(p, truth, offset, errors)

    def _truth(self, fb: dict[str, Any], ref: Pending | None) -> Any:
        if self.regression:
            if fb.get("value") is not None:
                return float(fb["value"])
            return ref.value if ref is not None and fb.get("verdict") == "accept" else None
        if fb.get("label") is not None:
            return str(fb["label"])
        if ref is None or ref.label is None:
            return None
        if fb.get("verdict") == "accept":
            return ref.label
        if fb.get("verdict") == "reject" and self.classes and len(self.classes) == 2:
            return next(c for c in self.classes if c != ref.label)
        return None

    def _score(self, p: Pending, truth: Any, offset: int,
               errors: dict[VariantKey, tuple[list[float], list[int]]]) -> None:
        if self.regression:
            if p.value is None:
                return
            err = abs(float(p.value) - float(truth))
        else:
            err = float(p.label != truth)
        errs, offs = errors.setdefault((p.model_name, p.model_version, p.variant), ([], []))
        errs.append(err)
        offs.append(offset)

    def _finish(self, errors: dict[VariantKey, tuple[list[float], list[int]]]) -> list[Scored]:
        out = []
        for key, (errs, offs) in errors.items():
            arr, off_arr = np.asarray(errs, dtype=float), np.asarray(offs, dtype=np.int64)
            window = self.rolling.setdefault(key, deque(maxlen=self.window))
            window.extend(errs)
            self.labeled[key] = self.labeled.get(key, 0) + len(errs)
            detectors = self.detectors.get(key)
            if detectors is None:
                names = error_detector_names(self.detector_names, self.task)
                detectors = self.detectors[key] = [Detector(n, self.seed, binary_stream=not self.regression)
                                                   for n in names]
            hits = [(d.name, int(off_arr[i])) for d in detectors for i in d.update_many(arr)]
            for name, _ in hits:
                self.alarms[(key, name)] = self.labeled[key]
            if key not in self.baseline and len(window) == self.window:
                self.baseline[key] = float(np.mean(window))
            mean = float(np.mean(window))
            metric = mean if self.regression else 1.0 - mean
            out.append(Scored(key[0], key[1], key[2], arr, off_arr, hits, metric, self.labeled[key]))
        return out

    def degradation(self, key: VariantKey, recent: int = RECENT) -> float | None:
        """How much worse the last ``recent`` errors are than the variant's baseline (None: no baseline yet).

        Classification: the accuracy drop in points; regression: the relative increase of the MAE.
        """
        base, window = self.baseline.get(key), self.rolling.get(key)
        if base is None or not window:
            return None
        tail = list(window)[-recent:]
        now = float(np.mean(tail))
        if self.regression:
            return now / base - 1.0 if base > 0 else float("inf") if now > 0 else 0.0
        # A few errors in a row are chance for a good model: the rise must also be significant
        # (binomial standard error of the recent rate, with the baseline floored at one error per window).
        p = max(base, 1.0 / self.window)
        if (now - base) < Z_MIN * (p * (1 - p) / len(tail)) ** 0.5:
            return 0.0
        return now - base

    def recent_alarm(self, key: VariantKey, detector: str) -> bool:
        """Whether ``detector`` raised an alarm within the last window of labels of ``key``."""
        at = self.alarms.get((key, detector))
        return at is not None and self.labeled.get(key, 0) - at <= self.window

    def _prune(self) -> None:
        """Forget what is older than the TTL (stream time) or beyond the size bound."""
        horizon = self.clock - self.ttl_ms
        # Dicts keep insertion order, which is close to time order: stop at the first young entry.
        while self.predictions:
            pid, p = next(iter(self.predictions.items()))
            if p.scored_at >= horizon and len(self.predictions) <= self.max_pending:
                break
            del self.predictions[pid]
            ids = self.by_event.get(p.event_id)
            if ids is not None:
                ids[:] = [x for x in ids if x != pid]
                if not ids:
                    del self.by_event[p.event_id]
            self.expired += 1
        for table in (self.truths, self.seen_feedback):
            while table:
                k, v = next(iter(table.items()))
                ts = v[1] if isinstance(v, tuple) else v
                if ts >= horizon and len(table) <= self.max_pending:
                    break
                del table[k]
        while self.waiting:
            k, (fb, _) = next(iter(self.waiting.items()))
            if fb["ts"] >= horizon and len(self.waiting) <= self.max_pending:
                break
            del self.waiting[k]

    def side_by_side(self) -> dict[str, float]:
        """Rolling metric per ``name:version:variant``, for logs and reports."""
        out = {}
        for key, window in self.rolling.items():
            mean = float(np.mean(window)) if window else float("nan")
            out[f"{key[0]}:{key[1]}:{key[2]}"] = mean if self.regression else 1.0 - mean
        return out
