"""Degradation of one model variant, from its error stream: early warnings confirmed by a test.

The errors are 0/1 (classification) or absolute errors (regression). The variant's first
``window`` errors are its baseline. After that, river's error detectors (DDM, ADWIN, ...) are
early warnings, as on feature streams (services/monitor/streams.py): a warning makes the watch
test the errors since the most likely change point against the baseline, every
:data:`~loopline.services.monitor.streams.CONFIRM_EVERY` errors, until the test passes or
``window`` errors have passed. The last ``window`` errors are also tested every quarter window,
for slow degradations and to tell when one has cleared.

A test passes on

- effect: the error rose by at least ``min_drop`` (accuracy points; regression: relative MAE);
- evidence: a one-sided test of the mean, with effective counts (services/monitor/evidence.py),
  below ``p_value``;
- persistence: the most recent half of the segment alone shows half of that rise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.evidence import (
    MIN_ERRORS,
    MIN_HISTORY,
    MeanTest,
    change_point,
    dependence,
    mean_test,
    rate_test,
)
from loopline.services.monitor.windowed import RingBuffer

CONFIRM_EVERY = 32
_BINS = 8  # quantile bins of regression errors, for the change-point search


@dataclass(frozen=True)
class ErrorTest:
    """Errors of one segment against the variant's baseline."""

    first_offset: int  # feedback offset of the segment's first error
    last_offset: int  # ... and of its last: where the test was made
    end: int  # position (errors seen so far) at the end of the segment: when the test ran
    test: MeanTest
    tau: float
    drop: float  # classification: accuracy points lost; regression: relative MAE increase
    recent_drop: float
    degraded: bool  # effect, evidence and persistence all hold

    @property
    def n(self) -> int:
        """Errors in the segment."""
        return self.test.n


@dataclass(frozen=True)
class ErrorFinding:
    """What one batch of errors showed."""

    detections: list[tuple[str, int]]  # (detector, index in the batch)
    confirmed: ErrorTest | None  # a segment since a warning's change point that degraded
    windowed: ErrorTest | None  # the last window, when a test was due
    warned_by: str = ""  # the detector whose early warning `confirmed` confirmed


class ErrorWatch:
    """Baseline, error history, early-warning detectors and tests of one variant."""

    def __init__(
        self,
        regression: bool,
        window: int,
        detectors: list[str],
        seed: int,
        min_drop: float,
        p_value: float,
    ) -> None:
        self.regression = regression
        self.window = window
        self.min_drop = min_drop
        self.p_value = p_value
        self.detectors = [Detector(n, seed, binary_stream=not regression) for n in detectors]
        self.first: list[float] = []
        self.baseline: float | None = None
        self.baseline_var = 0.0
        self.errors = RingBuffer(4 * window)
        self.offsets = RingBuffer(4 * window, np.int64)
        self.pending: int | None = None  # position of an unconfirmed early warning
        self.pending_by = ""
        self.last_test = 0
        self.since_window = 0
        self.scale: float | None = None
        self.degraded = (
            False  # set by the pipeline while an episode is open: no confirmations needed
        )

    def rebase(self) -> None:
        """Restart the baseline from the last ``window`` errors (or from the next ones)."""
        held = min(self.errors.total, self.window)
        recent = self.errors.values(held).tolist()
        self.first, self.baseline, self.pending = [], None, None
        self.detectors = [
            Detector(d.name, d.seed, binary_stream=not self.regression) for d in self.detectors
        ]
        if held >= self.window:
            self._set_baseline(recent)
        else:
            self.first = recent

    def _set_baseline(self, errors: list[float]) -> None:
        arr = np.asarray(errors, dtype=float)
        self.baseline = float(arr.mean())
        var = float(arr.var())
        if not self.regression:
            # A near-perfect baseline has almost no variance: floor it at one error per window.
            p = max(self.baseline, 1.0 / self.window)
            var = max(var, p * (1 - p))
        self.baseline_var = var

    def add(self, errors: np.ndarray, offsets: np.ndarray) -> ErrorFinding:
        """Feed one batch of errors (in feedback order) with their feedback offsets."""
        if self.scale is None:
            # Regression errors reach the detectors in units of the first errors' mean, so their
            # thresholds mean the same for any target scale.
            self.scale = (float(np.mean(errors[:50])) or 1.0) if self.regression else 1.0
        signal = errors / self.scale
        hits = sorted((int(i), d.name) for d in self.detectors for i in d.update_many(signal))
        if self.baseline is None:
            need = self.window - len(self.first)
            self.first += errors[:need].tolist()
            self._extend(errors[:need], offsets[:need])
            if len(self.first) >= self.window:
                self._set_baseline(self.first)
                self.first = []
            errors, offsets = errors[need:], offsets[need:]
            hits = [(i - need, name) for i, name in hits if i >= need]  # no test without a baseline
            if self.baseline is None or not errors.size:  # type: ignore[unreachable]  # _set_baseline sets it
                return ErrorFinding([], None, None)
        start = self.errors.total
        confirmed = windowed = None
        done = 0
        if not self.degraded:
            # Test at each warning, with the errors up to it: as early as the warning, any batch.
            for i, name in hits:
                if i < done or confirmed is not None:
                    continue
                self._extend(errors[done : i + 1], offsets[done : i + 1])
                done = i + 1
                if self.pending is None:
                    self.pending, self.pending_by = start + i, name
                self.last_test = -CONFIRM_EVERY
                confirmed = self._confirm()
        if done < errors.size:
            self._extend(errors[done:], offsets[done:])
            confirmed = confirmed or self._confirm()
        if self.since_window >= self.window // 4:
            self.since_window = 0
            windowed = self.test(self.window, within=True)
        return ErrorFinding([(name, i) for i, name in hits], confirmed, windowed, self.pending_by)

    def _extend(self, errors: np.ndarray, offsets: np.ndarray) -> None:
        self.errors.extend(errors)
        self.offsets.extend(offsets)
        self.since_window += errors.size

    def _confirm(self) -> ErrorTest | None:
        if self.pending is None:
            return None
        now = self.errors.total
        if now - self.last_test >= CONFIRM_EVERY:
            self.last_test = now
            r = self.test_since_change()
            if r is not None and r.degraded:
                self.pending = None
                return r
        if now - self.pending > self.window:
            self.pending = None
        return None

    def test_since_change(self) -> ErrorTest | None:
        """Test the errors since the most likely change point in the last ``window`` errors."""
        held = min(self.errors.total, self.errors.capacity)
        lookback = min(self.window, held)
        if lookback < 2 * MIN_ERRORS:
            return None
        recent = self.errors.values(lookback)
        n = lookback - change_point(
            self._codes(recent), _BINS if self.regression else 2, MIN_ERRORS
        )
        if held - n < MIN_HISTORY:
            return None
        return self.test(n)

    def _codes(self, errors: np.ndarray) -> np.ndarray:
        if not self.regression:
            return (errors > 0.5).astype(np.int16)
        cuts = np.unique(np.quantile(errors, np.linspace(0, 1, _BINS + 1)[1:-1]))
        return np.searchsorted(cuts, errors, side="right").astype(np.int16)

    def test(self, n: int, within: bool = False) -> ErrorTest | None:
        """Test the last ``n`` errors against the baseline (None: no baseline or history yet)."""
        held = min(self.errors.total, self.errors.capacity)
        n = min(n, held)
        if self.baseline is None or n < MIN_ERRORS:
            return None
        errors = self.errors.values(held)
        seg = errors[held - n :]
        tau = dependence(seg, errors[: held - n], within)
        if tau is None:
            return None
        t = (
            mean_test(seg, self.baseline, self.baseline_var, self.window, tau)
            if self.regression
            else rate_test(seg, self.baseline, self.window, tau)
        )
        drop = self._drop(t.mean)
        recent = self._drop(float(np.mean(seg[n // 2 :])))
        degraded = (
            t.p_value < self.p_value and drop >= self.min_drop and recent >= self.min_drop / 2
        )
        offsets = self.offsets.values(n)
        return ErrorTest(
            int(offsets[0]), int(offsets[-1]), self.errors.total, t, tau, drop, recent, degraded
        )

    def _drop(self, mean: float) -> float:
        base = self.baseline or 0.0
        if self.regression:
            return mean / base - 1.0 if base > 0 else (float("inf") if mean > 0 else 0.0)
        return mean - base
