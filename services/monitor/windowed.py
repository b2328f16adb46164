"""One column's recent history, binned against its reference, and the comparisons that decide drift.

The reference is one column of a profile (loopline/profile.py). A numeric column is binned at
the deciles of the reference sample (values beyond the reference range fall in the first or last
decile); a categorical column by the reference's categories, pooling the rare ones and any unseen
value into one bin. The history keeps each value's bin, value (numbers) or text (categories),
offset and partition for the last ``4 * window`` values (texts: ``window``).

A comparison tests a *segment* of the history against the reference (services/monitor/evidence.py):
the last ``window`` values (every ``every`` values), or the values since the most likely change
point (when an early-warning detector asks). Its level needs all three of

- effect: the chance-corrected PSI reaches ``psi_warning`` (level "warning") or ``psi_alert``
  ("alert");
- evidence: a p-value, with effective counts (dependence), below ``p_value``: the chi-square test
  of the bins (shape), and for numbers also z-tests of the mean (level) and of the mean absolute
  deviation from the reference median (spread), the smallest of the three times three;
- persistence: the most recent half of the segment alone still shows half of that effect.

A segment without enough history before it to judge dependence gets no level.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt

from loopline.profile import categorical_profile, numeric_profile
from loopline.services.monitor.evidence import (
    MIN_HISTORY,
    MIN_SEGMENT,
    BinTest,
    bin_test,
    change_point,
    dependence,
    mean_change_point,
    psi,
    z_pvalue,
)

__all__ = [
    "MIN_EXPECTED",
    "OTHER",
    "Comparison",
    "RingBuffer",
    "Thresholds",
    "WindowedDrift",
    "psi",
]

OTHER = "__other__"
MIN_EXPECTED = (
    5  # expected count in a window below which a category is pooled (the chi-square rule)
)
MIN_SAMPLE = 50  # reference sample values needed to place numeric bins
DECILES = np.linspace(0.1, 0.9, 9)
MAX_INDICATORS = 8  # categories whose shares the early-warning detectors follow
_RANK = {None: 0, "warning": 1, "alert": 2}


class RingBuffer:
    """The last ``capacity`` values (floats unless ``dtype`` says otherwise), oldest first."""

    def __init__(self, capacity: int, dtype: npt.DTypeLike = float) -> None:
        self.capacity = capacity
        self._data = np.empty(capacity, dtype=dtype)
        self.total = 0

    def extend(self, values: np.ndarray | list[Any]) -> None:
        """Append values (a batch)."""
        values = np.asarray(values, dtype=self._data.dtype)
        self.total += values.size - min(values.size, self.capacity)
        values = values[-self.capacity :]
        start = self.total % self.capacity
        end = start + values.size
        if end <= self.capacity:
            self._data[start:end] = values
        else:
            cut = self.capacity - start
            self._data[start:] = values[:cut]
            self._data[: end - self.capacity] = values[cut:]
        self.total += values.size

    def values(self, last: int | None = None) -> np.ndarray:
        """Contents (or the ``last`` ones), oldest first."""
        held = min(self.total, self.capacity)
        last = held if last is None else min(last, held)
        end = self.total % self.capacity
        start = end - last
        if start >= 0:
            return self._data[start:end].copy()
        return np.concatenate([self._data[start:], self._data[:end]])


@dataclass(frozen=True)
class Thresholds:
    """When a comparison is a warning or an alert (from spec.monitor)."""

    psi_warning: float
    psi_alert: float
    p_value: float


@dataclass(frozen=True)
class Comparison:
    """One segment of a column against its reference, and what it amounts to."""

    start: int  # position of the segment's first value in the column's stream (0: its first value)
    first_offset: int
    first_partition: int
    last_offset: int  # offset of the segment's last value: where the comparison was made
    test: BinTest
    p_value: float  # evidence: the smallest of the shape, level and spread tests' p-values, times 3
    evidence: str  # which test gave it: shape (bins), level (mean) or spread
    tau: float  # integrated autocorrelation time used for the effective counts
    recent_effect: float  # chance-corrected PSI of the segment's most recent half
    level: str | None  # None, "warning" or "alert"
    reference_value: float | None  # numbers: reference mean; categories: the most moved one's share
    current_value: float | None  # the same, in the segment
    moved: str | None  # categories: the category whose share moved most
    reference_sd: float | None
    current_sd: float | None

    @property
    def n(self) -> int:
        """Values in the segment."""
        return self.test.n

    @property
    def psi(self) -> float:
        """Observed PSI of the segment."""
        return self.test.psi

    @property
    def effect(self) -> float:
        """Chance-corrected PSI: the effect size."""
        return self.test.effect


class WindowedDrift:
    """One column's history against its reference: comparisons of its window and change segments."""

    def __init__(
        self, reference: dict[str, Any], window: int, every: int, thresholds: Thresholds
    ) -> None:
        self.reference = reference
        self.numeric = reference.get("kind") == "numeric"
        self.window = window
        self.every = max(1, every)
        self.thresholds = thresholds
        self._since = 0
        capacity = 4 * window
        self.codes = RingBuffer(capacity, np.int16)
        self.offsets = RingBuffer(capacity, np.int64)
        self.partitions = RingBuffer(capacity, np.int32)
        self.values = RingBuffer(capacity) if self.numeric else RingBuffer(window, object)
        if self.numeric:
            sample = np.asarray(reference.get("sample") or [], dtype=float)
            sample = sample[np.isfinite(sample)]
            self._cuts = (
                np.unique(np.quantile(sample, DECILES))
                if sample.size >= MIN_SAMPLE
                else np.empty(0)
            )
            counts = (
                np.bincount(
                    np.searchsorted(self._cuts, sample, side="right"), minlength=self._cuts.size + 1
                )
                if self._cuts.size
                else np.ones(1)
            )
            self._ref_fractions = counts / max(1, counts.sum())
            self._m = int(sample.size)
            # Level and spread of the reference, for the two tests that see a shift or a spread
            # change sooner than the bins do. Values are clipped to the reference's 1st-99th
            # percentiles first: a few extreme values in a short segment of a heavy-tailed column
            # would otherwise make any mean look significant.
            q = np.quantile(sample, [0.01, 0.99]) if sample.size else np.zeros(2)
            self._clip = (float(q[0]), float(q[1]))
            clipped = np.clip(sample, *self._clip)
            centre = float(np.median(clipped)) if sample.size else 0.0
            dev = np.abs(clipped - centre)
            self._moments = (
                (
                    float(clipped.mean()),
                    float(clipped.var()),
                    centre,
                    float(dev.mean()),
                    float(dev.var()),
                )
                if sample.size
                else (0.0, 0.0, 0.0, 0.0, 0.0)
            )
            self.categories: list[str] = []
        else:
            shares = dict(reference.get("fractions") or {})
            # A category expected fewer than MIN_EXPECTED times in a window is pooled with unseen
            # values: its window share is mostly noise (an ID-like column of 1000 customers has a
            # PSI above 1 between two samples of the same distribution). A column whose every
            # category is that rare has no comparison.
            self.categories = sorted(
                c for c, share in shares.items() if share * window >= MIN_EXPECTED
            )
            self._codes = {c: i for i, c in enumerate(self.categories)}
            pooled = sum(share for c, share in shares.items() if c not in self._codes)
            self._ref_fractions = np.asarray(
                [shares[c] for c in self.categories] + [pooled], dtype=float
            )
            self._m = int(reference.get("count") or 0)

    @property
    def usable(self) -> bool:
        """Whether the reference has anything to compare against."""
        return bool(self._cuts.size) if self.numeric else bool(self.categories)

    @property
    def bins(self) -> int:
        """Number of bins (categories plus the pooled one)."""
        return len(self._ref_fractions)

    @property
    def total(self) -> int:
        """Values added so far."""
        return self.codes.total

    def indicator_codes(self) -> list[int]:
        """The categories (codes) whose shares early-warning detectors follow: all but the largest
        (its share moves with the others), at most :data:`MAX_INDICATORS`, most common first."""
        if self.numeric or not self.categories:
            return []
        order = [int(i) for i in np.argsort(-self._ref_fractions[:-1], kind="stable")]
        return order[1 : MAX_INDICATORS + 1] if len(order) > 1 else order

    def encode(self, values: np.ndarray | list[Any]) -> np.ndarray:
        """Bin codes of values (numbers: present floats; categories: any values, as text)."""
        if self.numeric:
            return np.searchsorted(
                self._cuts, np.asarray(values, dtype=float), side="right"
            ).astype(np.int16)
        # Categories are str(value), as in the profile; `str(v) for` is the interpreter's fast
        # path for str(), map(str, ...) is not.
        strings = [str(v) for v in values]
        codes = map(self._codes.get, strings, repeat(len(self.categories)))
        return np.fromiter(codes, dtype=np.int16, count=len(strings))

    def add(
        self,
        values: np.ndarray | list[Any],
        offsets: np.ndarray,
        partitions: np.ndarray,
        codes: np.ndarray | None = None,
        since: int | None = None,
    ) -> Comparison | None:
        """Add a batch of present values; return the window's comparison when one is due, else None
        (``since``: where a known change began, see :meth:`compare`)."""
        if not self.usable or len(values) == 0:
            return None
        codes = self.encode(values) if codes is None else codes
        self.codes.extend(codes)
        self.offsets.extend(offsets)
        self.partitions.extend(partitions)
        self.values.extend(
            values if self.numeric else np.asarray([str(v) for v in values], dtype=object)
        )
        self._since += len(codes)
        if self.total < self.window or self._since < self.every:
            return None
        self._since = 0
        return self.compare(self.window, within=True, since=since)

    def compare_since_change(self, lookback: int) -> Comparison | None:
        """Compare the values since the most likely change point in the last ``lookback`` values.

        Numbers have three candidate change points: of their bins, of their level, of their spread;
        each is tested (the first with a level wins). None while too few values came before the
        change point to judge how dependent the stream is.
        """
        held = min(self.total, self.codes.capacity)
        lookback = min(lookback, held)
        if lookback < 2 * MIN_SEGMENT or not self.usable:
            return None
        splits = [change_point(self.codes.values(lookback), self.bins)]
        if self.numeric:
            recent = self.values.values(lookback)
            splits += [
                mean_change_point(recent),
                mean_change_point(np.abs(recent - np.median(recent))),
            ]
        best = None
        for n in dict.fromkeys(lookback - j for j in splits):
            if held - n < MIN_HISTORY:
                continue
            c = self.compare(n)
            if c is not None and (best is None or _RANK[c.level] > _RANK[best.level]):
                best = c
                if c.level == "alert":
                    break
        return best

    def compare(self, n: int, within: bool = False, since: int | None = None) -> Comparison | None:
        """Compare the last ``n`` values with the reference (None: not enough history to judge).

        ``since``: the position where a known change began; dependence is then judged on the
        history before it, which the change has not touched (a shift inside the history would
        look like strong autocorrelation and hide itself).
        """
        held = min(self.total, self.codes.capacity)
        n = min(n, held)
        if n < MIN_SEGMENT or not self.usable:
            return None
        codes = self.codes.values(held)
        seg = codes[held - n :]
        first = self.total - held  # position of the oldest value held
        cut = held - n if since is None else min(held - n, max(0, since - first))
        if self.numeric:
            values = self.values.values(held)
            # Location and spread: volatility clusters (returns, loads) make |x - median| dependent
            # even where x is not.
            both = np.column_stack([values, np.abs(values - np.median(values))])
            tau = dependence(both[held - n :], both[:cut], within)
        else:
            tau = dependence(self._indicators(seg), self._indicators(codes[:cut]), within)
        if tau is None:
            return None
        k = self.bins
        test = bin_test(self._ref_fractions, np.bincount(seg, minlength=k), self._m, tau)
        recent = bin_test(
            self._ref_fractions, np.bincount(seg[n // 2 :], minlength=k), self._m, tau
        )
        p, evidence = test.p_value, "shape"
        if self.numeric:
            now = np.clip(self.values.values(n), *self._clip)
            mean, var, centre, dev_mean, dev_var = self._moments
            tests = (
                ("shape", test.p_value),
                ("level", z_pvalue(now, mean, var, self._m, tau)),
                ("spread", z_pvalue(np.abs(now - centre), dev_mean, dev_var, self._m, tau)),
            )
            evidence, p = min(tests, key=lambda t: t[1])
            p = min(1.0, 3 * p)  # three tests: Bonferroni
        t = self.thresholds
        level = None
        if p < t.p_value:
            for name, limit in (("alert", t.psi_alert), ("warning", t.psi_warning)):
                if test.effect >= limit and recent.effect >= limit / 2:
                    level = name
                    break
        first = self.total - n
        offsets = self.offsets.values(n)
        offset, last = int(offsets[0]), int(offsets[-1])
        partition = int(self.partitions.values(n)[0])
        if self.numeric:
            return Comparison(
                first,
                offset,
                partition,
                last,
                test,
                p,
                evidence,
                tau,
                recent.effect,
                level,
                _number(self.reference.get("mean")),
                float(np.mean(now)),
                None,
                _number(self.reference.get("std")),
                float(np.std(now)),
            )
        shares = np.bincount(seg, minlength=k) / n
        moved = int(np.argmax(np.abs(shares - self._ref_fractions)))
        name = self.categories[moved] if moved < len(self.categories) else "other values"
        return Comparison(
            first,
            offset,
            partition,
            last,
            test,
            p,
            evidence,
            tau,
            recent.effect,
            level,
            float(self._ref_fractions[moved]),
            float(shares[moved]),
            name,
            None,
            None,
        )

    def _indicators(self, codes: np.ndarray) -> np.ndarray:
        """One 0/1 column per category followed by the detectors, for dependence estimates."""
        cols = self.indicator_codes() or [0]
        return (codes[:, None] == np.asarray(cols)[None, :]).astype(float)

    def recent_profile(self) -> dict[str, Any] | None:
        """A profile of the last ``window`` values, as a new reference (None: fewer than that, or
        than MIN_HISTORY)."""
        n = min(self.total, self.window)
        if n < min(self.window, MIN_HISTORY):
            return None
        if self.numeric:
            return numeric_profile(self.values.values(n))
        return categorical_profile(list(self.values.values(n)))


def _number(x: Any) -> float | None:
    return None if x is None else float(x)
