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
from operator import itemgetter
from typing import Any, Final

import numpy as np

from loopline.services.monitor.degradation import ErrorTest, ErrorWatch
from loopline.services.monitor.detectors import error_detector_names

VariantKey = tuple[str, int, str]

#: A prediction waiting for its feedback, as a plain tuple rather than an object: one row per
#: prediction is the join's main cost, in allocation and in garbage-collector traversals.
#: ``(variant key, served, label, value, event_id, scored_at)``, read with the indices below.
Row = tuple[VariantKey, bool, str | None, float | None, str, int]
# Final: mypy then knows which item of a Row each one reads.
KEY: Final = 0
SERVED: Final = 1
LABEL: Final = 2
VALUE: Final = 3
EVENT: Final = 4
SCORED_AT: Final = 5

#: Errors and feedback offsets per variant, collected over one batch.
Errors = dict[VariantKey, tuple[list[float], list[int]]]

_PREDICTION = itemgetter("prediction_id", "event_id", "served", "scored_at")
_VARIANT = itemgetter("model_name", "model_version", "variant")
_SCORED_AT = itemgetter("scored_at")
_TS = itemgetter("ts")
_FEEDBACK_FIELDS = ("prediction_id", "event_id", "label", "value", "verdict")
_FEEDBACK = itemgetter(*_FEEDBACK_FIELDS)
_NONE: Any = object()  # absent from a dict (an id may be any hashable, None included)


@dataclass
class Pending:
    """Row shape of format 1 and 2 checkpoints, kept
    only so they unpickle and are set aside as old."""

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
    confirmed: ErrorTest | None = None  # errors since an early warning's change point that degraded
    windowed: ErrorTest | None = None  # the last window of errors, when a test was due
    warned_by: str = ""  # the detector whose early warning `confirmed` confirmed


#: Labels in the "recent" error rate compared with the baseline, in messages.
RECENT = 200


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
    min_drop: float = 0.02  # spec.monitor.min_performance_drop
    p_value: float = 1e-4  # spec.monitor.p_value
    predictions: dict[str, Row] = field(default_factory=dict)
    #: Prediction ids per event: the id itself while an event has one prediction (the usual case),
    #: a list from the second on; a list per event would double the objects the join keeps alive.
    by_event: dict[str, str | list[str]] = field(default_factory=dict)
    truths: dict[str, tuple[Any, int]] = field(default_factory=dict)
    waiting: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    seen_feedback: dict[str, int] = field(default_factory=dict)
    rolling: dict[VariantKey, deque[float]] = field(default_factory=dict)
    watches: dict[VariantKey, ErrorWatch] = field(default_factory=dict)
    labeled: dict[VariantKey, int] = field(default_factory=dict)
    #: Error of each variant over its first full window (or since a rebaseline): "not degraded".
    baseline: dict[VariantKey, float] = field(default_factory=dict)
    expired: int = 0
    clock: int = 0  # stream time: the latest event time seen, epoch ms

    @property
    def regression(self) -> bool:
        """Whether errors are absolute errors (regression) rather than 0/1."""
        return self.task == "regression"

    def add_predictions(self, records: list[dict[str, Any]], offsets: list[int]) -> list[Scored]:
        """Remember predictions; score those whose truth is already known."""
        errors: Errors = {}
        retry: list[tuple[dict[str, Any], int]] = []
        # Nothing in the loop reads the clock: one max per batch gives the same stream time.
        self.clock = max(self.clock, max(map(_SCORED_AT, records), default=self.clock))
        predictions, by_event, truths = self.predictions, self.by_event, self.truths
        waiting = self.waiting
        keys: dict[tuple[Any, Any, Any], VariantKey] = {}  # one shared key tuple per variant
        for p, off in zip(records, offsets):
            pid, eid, served, scored_at = _PREDICTION(p)
            raw = _VARIANT(p)
            key = keys.get(raw)
            if key is None:
                key = keys[raw] = (raw[0], raw[1], str(raw[2]))
            row = (key, served, p.get("label"), p.get("value"), eid, scored_at)
            truth = truths.get(eid)
            if truth is not None:
                self._score(row, truth[0], off, errors)
                continue
            if pid not in predictions:  # a resent prediction replaces its row, once per event
                ids = by_event.get(eid, _NONE)
                if ids is _NONE:
                    by_event[eid] = pid
                elif ids.__class__ is list:
                    ids.append(pid)
                else:
                    by_event[eid] = [ids, pid]
            predictions[pid] = row
            if waiting:  # almost always empty: feedback rarely comes before its prediction
                if pid in waiting:
                    retry.append(waiting.pop(pid))
                if eid in waiting:
                    retry.append(waiting.pop(eid))
        for fb, off in retry:
            self._apply_feedback(fb, off, errors)
        self._prune()
        return self._finish(errors)

    def add_feedback(self, records: list[dict[str, Any]], offsets: list[int]) -> list[Scored]:
        """Join feedback with known predictions (or keep it until they arrive); score them."""
        errors: Errors = {}
        # Resends move the clock too, as they did when it was kept per record.
        self.clock = max(self.clock, max(map(_TS, records), default=self.clock))
        seen = self.seen_feedback
        for fb, off in zip(records, offsets):
            fid = fb["feedback_id"]
            if fid in seen:
                continue  # a resend: counted once
            seen[fid] = fb["ts"]
            self._apply_feedback(fb, off, errors)
        self._prune()
        return self._finish(errors)

    def _apply_feedback(self, fb: dict[str, Any], offset: int, errors: Errors) -> None:
        try:
            pid, eid, label, value, verdict = _FEEDBACK(fb)
        except KeyError:  # a record built by hand may leave out what it does not use
            pid, eid, label, value, verdict = (fb.get(k) for k in _FEEDBACK_FIELDS)
        predictions = self.predictions
        ref = predictions.get(pid) if pid else None
        if ref is None and eid:
            ids = self.by_event.get(eid, _NONE)
            if ids.__class__ is list:
                served = [predictions[x] for x in ids if x in predictions]
                ref = next((p for p in served if p[SERVED]), served[0] if served else None)
            elif ids is not _NONE:
                ref = predictions.get(ids)
        eid = eid or (ref[EVENT] if ref is not None else None)
        truth = self._truth(label, value, verdict, ref)
        if truth is None or eid is None:
            if ref is None and (pid or eid):
                self.waiting[pid or eid] = (fb, offset)  # type: ignore[index]  # one of them is set
            return
        self.truths[eid] = (truth, fb["ts"])
        ids = self.by_event.pop(eid, _NONE)
        if ids is _NONE:
            return
        for x in ids if ids.__class__ is list else (ids,):
            row = predictions.pop(x, None)
            if row is not None:
                self._score(row, truth, offset, errors)

    def _truth(self, label: Any, value: Any, verdict: str | None, ref: Row | None) -> Any:
        """The truth a feedback's label, value or verdict implies (None: none yet)."""
        if self.task == "regression":
            if value is not None:
                return float(value)
            return ref[VALUE] if ref is not None and verdict == "accept" else None
        if label is not None:
            return str(label)
        if ref is None or ref[LABEL] is None:
            return None
        if verdict == "accept":
            return ref[LABEL]
        if verdict == "reject" and self.classes and len(self.classes) == 2:
            return next(c for c in self.classes if c != ref[LABEL])
        return None

    def _score(self, row: Row, truth: Any, offset: int, errors: Errors) -> None:
        if self.task == "regression":
            value = row[VALUE]
            if value is None:
                return
            err = abs(float(value) - float(truth))
        else:
            err = float(row[LABEL] != truth)
        entry = errors.get(row[KEY])
        if entry is None:
            entry = errors[row[KEY]] = ([], [])
        entry[0].append(err)
        entry[1].append(offset)

    def _finish(self, errors: Errors) -> list[Scored]:
        out = []
        for key, (errs, offs) in errors.items():
            arr, off_arr = np.asarray(errs, dtype=float), np.asarray(offs, dtype=np.int64)
            window = self.rolling.setdefault(key, deque(maxlen=self.window))
            window.extend(errs)
            self.labeled[key] = self.labeled.get(key, 0) + len(errs)
            watch = self.watches.get(key)
            if watch is None:
                names = error_detector_names(self.detector_names, self.task)
                watch = self.watches[key] = ErrorWatch(self.regression, self.window, names,
                                                       self.seed, self.min_drop, self.p_value)
            found = watch.add(arr, off_arr)
            if watch.baseline is not None:
                self.baseline[key] = watch.baseline
            hits = [(name, int(off_arr[i])) for name, i in found.detections]
            mean = float(np.mean(window))
            metric = mean if self.regression else 1.0 - mean
            out.append(Scored(key[0], key[1], key[2], arr, off_arr, hits, metric, self.labeled[key],
                              found.confirmed, found.windowed, found.warned_by))
        return out

    def recent(self, key: VariantKey, n: int = RECENT) -> tuple[float, float | None, int] | None:
        """(metric of the last ``n`` labels, of the baseline, labels so far); None: no labels."""
        window = self.rolling.get(key)
        if not window:
            return None
        tail = list(window)[-n:]
        base = self.baseline.get(key)
        now = float(np.mean(tail))
        if self.regression:
            return now, base, self.labeled.get(key, 0)
        return 1.0 - now, None if base is None else 1.0 - base, self.labeled.get(key, 0)

    def rebase(self, key: VariantKey | None = None) -> None:
        """Restart baselines (of one variant, or all) from their last window of labels."""
        for k, watch in self.watches.items():
            if key is None or k == key:
                watch.rebase()
                if watch.baseline is None:
                    self.baseline.pop(k, None)
                else:
                    self.baseline[k] = watch.baseline

    def _prune(self) -> None:
        """Forget what is older than the TTL (stream time) or beyond the size bound."""
        horizon = self.clock - self.ttl_ms
        predictions, by_event = self.predictions, self.by_event
        # Dicts keep insertion order, which is close to time order: stop at the first young entry.
        while predictions:
            pid, row = next(iter(predictions.items()))
            if row[SCORED_AT] >= horizon and len(predictions) <= self.max_pending:
                break
            del predictions[pid]
            eid = row[EVENT]
            ids = by_event.get(eid, _NONE)
            if ids.__class__ is list:
                ids[:] = [x for x in ids if x != pid]
                if not ids:
                    del by_event[eid]
            elif ids is not _NONE and ids == pid:
                del by_event[eid]
            self.expired += 1
        for table in (self.truths, self.seen_feedback):
            while table:
                k, v = next(iter(table.items()))
                ts = v[1] if isinstance(v, tuple) else v
                if ts >= horizon and len(table) <= self.max_pending:  # type: ignore[operator]  # a ts
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
