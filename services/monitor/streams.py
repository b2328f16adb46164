"""Drift of one column (a feature or a model output): early warnings, confirmed by windowed tests.

River's detectors watch every value: a numeric column's z-scores (its mean) and their absolute
values (its spread), a categorical column's share of each common category. They assume
independent values, so on seasonal or autocorrelated data they fire all the time: here a signal is
only an *early warning*. It makes the column test the values since the most likely change point
against the reference (services/monitor/windowed.py) every :data:`CONFIRM_EVERY` values, until
that test finds effect, evidence and persistence (a drift) or ``window`` values have passed.
Independently, the last ``window`` values are compared with the reference every ``every``
values: that catches slow drifts no detector sees, and tells when a drift has cleared.

A column without a reference profile takes its first ``window`` values as its reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.profile import categorical_profile, numeric_profile
from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.windowed import Comparison, Thresholds, WindowedDrift

#: Values between two confirmation tests of a pending early warning (river's ADWIN checks as often).
CONFIRM_EVERY = 32
_ABS_MEAN, _ABS_SD = math.sqrt(2 / math.pi), math.sqrt(1 - 2 / math.pi)  # of |z| for a normal z
STREAM_DETECTORS = ("adwin", "page_hinkley")  # the ones that suit derived 0/1 and |z| streams


@dataclass
class Warning:  # noqa: A001 - state records pickle it under this name
    """An early warning not yet confirmed or dropped."""

    detector: str
    at: int  # position in the column's stream
    offset: int
    partition: int
    last_test: int


@dataclass
class Finding:
    """What one batch of a column showed."""

    detections: list[tuple[str, int]] = field(default_factory=list)  # (detector, index in batch)
    confirmed: Comparison | None = None  # a change segment that passed the test
    warning: Warning | None = None  # the early warning it confirmed
    windowed: Comparison | None = None  # the window comparison, when one was due
    dropped: int = 0  # early warnings that ran out of time unconfirmed


class ColumnWatch:
    """One column: river detectors as early warnings, windowed comparisons as the verdict."""

    def __init__(
        self,
        name: str,
        reference: dict[str, Any] | None,
        numeric: bool,
        detectors: list[str],
        seed: int,
        window: int,
        every: int,
        thresholds: Thresholds,
        reference_note: str | None = None,
    ) -> None:
        self.name = name
        self.numeric = numeric
        self.detector_names = list(detectors)
        self.seed = seed
        self.window = window
        self.every = every
        self.thresholds = thresholds
        #: Where the reference came from, for messages ("model m v3's training profile", ...).
        self.reference_note = reference_note or "its reference profile"
        self.pending: Warning | None = None
        #: The level of the column's open drift episode (set by the pipeline): no early warnings
        #: are followed while an alert is open, the drift is known.
        self.open_level: str | None = None
        #: Where the drift of the open episode began (position in the column's stream).
        self.change_start: int | None = None
        self.reference: dict[str, Any] | None = None
        self.unusable = False  # the reference has nothing to compare with
        self.warmup: list[Any] = []
        self.windowed: WindowedDrift | None = None
        self.streams: list[
            tuple[str, int | None, list[Detector]]
        ] = []  # (stream, category code, detectors)
        self._scale = (0.0, 1.0)
        if reference and reference.get("count"):
            self._adopt(reference)

    # --- reference ----------------------------------------------------------------------------
    def _adopt(self, reference: dict[str, Any]) -> None:
        self.reference = reference
        self.windowed = WindowedDrift(reference, self.window, self.every, self.thresholds)
        self.pending = None
        if not self.windowed.usable:
            # Nothing to compare (an ID-like column, a constant): no drift watch at all, rather
            # than warming up a new reference from live values that would be no better.
            self.windowed = None
            self.streams = []
            self.unusable = True
            return
        self.unusable = False
        if self.numeric:
            self._scale = (
                float(reference.get("mean") or 0.0),
                float(reference.get("std") or 0.0) or 1.0,
            )
            kinds: list[tuple[str, int | None]] = [("mean", None), ("spread", None)]
        else:
            kinds = [("share", code) for code in self.windowed.indicator_codes()]
        self.streams = []
        for stream, code in kinds:
            names = (
                self.detector_names
                if stream == "mean"
                else [d for d in self.detector_names if d in STREAM_DETECTORS]
            )
            self.streams.append((stream, code, [Detector(d, self.seed) for d in names]))

    def renew(self, reference: dict[str, Any] | None, note: str) -> None:
        """Take a new reference (None: the next ``window`` values); forget early warnings."""
        self.reference_note = note
        self.warmup = []
        self.unusable = False
        if reference and reference.get("count"):
            self._adopt(reference)
        else:
            self.windowed, self.streams, self.pending = None, [], None

    def recent_profile(self) -> dict[str, Any] | None:
        """A profile of the last ``window`` values (None: too few seen), for a rebaseline."""
        return self.windowed.recent_profile() if self.windowed is not None else None

    @property
    def detectors(self) -> list[Detector]:
        """Every early-warning detector of the column."""
        return [d for _, _, dets in self.streams for d in dets]

    # --- batches ------------------------------------------------------------------------------
    def update(
        self, values: list[Any] | np.ndarray, offsets: list[int], partitions: list[int]
    ) -> Finding:
        """Feed one batch (None or NaN: missing) with each value's offset and partition."""
        finding = Finding()
        if self.numeric:
            arr = (
                np.asarray(values, dtype=float)
                if isinstance(values, np.ndarray)
                else np.asarray([np.nan if v is None else v for v in values], dtype=float)
            )
            keep = np.isfinite(arr)
            present: Any = arr[keep]
        else:
            keep = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
            present = [v for v in values if v is not None]
        if len(present) == 0:
            return finding
        offs, parts = (
            np.asarray(offsets, dtype=np.int64)[keep],
            np.asarray(partitions, dtype=np.int32)[keep],
        )
        if self.windowed is None:
            if not self.unusable:
                self._warm_up(present)
            return finding
        w = self.windowed
        start = w.total
        codes = w.encode(present)
        hits: list[tuple[int, str]] = []
        for stream, code, dets in self.streams:
            signal = self._signal(stream, code, present, codes)
            for d in dets:
                hits += [(int(i), d.name) for i in d.update_many(signal)]
        finding.detections = [(name, i) for i, name in sorted(hits)]
        done = 0
        if self.open_level != "alert":
            # Test at each warning, with the values up to it: a confirmation is as early as the
            # warning, however large the batch.
            for i, name in sorted(hits):
                if i < done or finding.confirmed is not None:
                    continue
                cut = i + 1
                finding.windowed = (
                    w.add(
                        present[done:cut],
                        offs[done:cut],
                        parts[done:cut],
                        codes[done:cut],
                        self.change_start,
                    )
                    or finding.windowed
                )
                done = cut
                if self.pending is None:
                    self.pending = Warning(name, start + i, int(offs[i]), int(parts[i]), 0)
                self.pending.last_test = start + i - CONFIRM_EVERY
                self._confirm(finding)
        if done < len(codes):
            finding.windowed = (
                w.add(present[done:], offs[done:], parts[done:], codes[done:], self.change_start)
                or finding.windowed
            )
            self._confirm(finding)
        return finding

    def _signal(self, stream: str, code: int | None, present: Any, codes: np.ndarray) -> np.ndarray:
        if stream == "share":
            return (codes == code).astype(float)
        mean, sd = self._scale
        z = (np.asarray(present, dtype=float) - mean) / sd
        if stream == "mean":
            return z
        # Page-Hinkley's thresholds are in standard deviations: |z| is standardised (normal case).
        return (np.abs(z) - _ABS_MEAN) / _ABS_SD

    def _confirm(self, finding: Finding) -> None:
        w, p = self.windowed, self.pending
        if w is None or p is None or finding.confirmed is not None:
            return
        now = w.total
        if now - p.last_test >= CONFIRM_EVERY:
            p.last_test = now
            c = w.compare_since_change(self.window)
            if c is not None and c.level is not None:
                finding.confirmed, finding.warning = c, p
                self.pending = None
                return
        if now - p.at > self.window:
            finding.dropped += 1
            self.pending = None

    def _warm_up(self, present: Any) -> None:
        # No reference profile: the first `window` values become the reference.
        self.warmup.extend(present.tolist() if isinstance(present, np.ndarray) else present)
        if len(self.warmup) >= self.window:
            profile = (
                numeric_profile(self.warmup) if self.numeric else categorical_profile(self.warmup)
            )
            self.reference_note = f"its first {len(self.warmup)} values (no reference profile)"
            self.warmup = []
            self._adopt(profile)
