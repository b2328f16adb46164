"""Windowed drift: PSI and two-sample KS of the most recent window against a reference profile.

The reference is one column of a profile (loopline/profile.py): numeric columns carry quantile
edges with outlier bins on both ends and a KS sample; categorical columns carry value shares.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from loopline.profile import bin_fractions

_EPS = 1e-4  # floor of a bin share in PSI, so an empty bin costs a lot but not infinity
OTHER = "__other__"


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference, dtype=float), _EPS, None)
    cur = np.clip(np.asarray(current, dtype=float), _EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_two_sample(reference_sample: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and asymptotic p-value."""
    res = stats.ks_2samp(current, reference_sample, method="asymp")
    return float(res.statistic), float(res.pvalue)


class RingBuffer:
    """The last ``capacity`` floats seen, in arrival order, without per-event allocation."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data = np.empty(capacity, dtype=float)
        self.total = 0

    def extend(self, values: np.ndarray) -> None:
        """Append values (a batch)."""
        values = np.asarray(values, dtype=float)[-self.capacity:]
        start = self.total % self.capacity
        end = start + values.size
        if end <= self.capacity:
            self._data[start:end] = values
        else:
            cut = self.capacity - start
            self._data[start:] = values[:cut]
            self._data[:end - self.capacity] = values[cut:]
        self.total += values.size

    def values(self) -> np.ndarray:
        """Contents, oldest first."""
        if self.total < self.capacity:
            return self._data[:self.total].copy()
        start = self.total % self.capacity
        return np.concatenate([self._data[start:], self._data[:start]])


@dataclass(frozen=True)
class WindowResult:
    """One comparison of the recent window with the reference."""

    psi: float
    ks_statistic: float | None
    ks_pvalue: float | None
    level: str | None  # None, "warning" or "alert"
    window: int


@dataclass(frozen=True)
class Thresholds:
    """When a window comparison becomes a warning or an alert (from spec.monitor)."""

    psi_warning: float
    psi_alert: float
    ks_alert_pvalue: float


class WindowedDrift:
    """Compares the last ``window`` values of one column with its reference, every ``every`` values."""

    def __init__(self, reference: dict[str, Any], window: int, every: int, thresholds: Thresholds) -> None:
        self.reference = reference
        self.numeric = reference.get("kind") == "numeric"
        self.window = window
        self.every = max(1, every)
        self.thresholds = thresholds
        self._since = 0
        if self.numeric:
            self._buffer: RingBuffer | deque[str] = RingBuffer(window)
            self._edges = list(reference.get("edges") or [])
            self._ref_fractions = np.asarray(reference.get("fractions") or [1.0], dtype=float)
            self._sample = np.asarray(reference.get("sample") or [], dtype=float)
        else:
            self._buffer = deque(maxlen=window)
            shares = dict(reference.get("fractions") or {})
            self._categories = sorted(shares)
            self._ref_fractions = np.asarray([shares[c] for c in self._categories] + [0.0], dtype=float)

    @property
    def usable(self) -> bool:
        """Whether the reference has anything to compare against."""
        return bool(self._edges) if self.numeric else bool(self._categories)

    def add(self, values: np.ndarray | list[Any]) -> WindowResult | None:
        """Add a batch of present values; return a comparison when one is due, else None."""
        if not self.usable or len(values) == 0:
            return None
        if self.numeric:
            arr = np.asarray(values, dtype=float)
            arr = arr[np.isfinite(arr)]
            self._buffer.extend(arr)  # type: ignore[union-attr]
            added, filled = arr.size, self._buffer.total >= self.window  # type: ignore[union-attr]
        else:
            self._buffer.extend(str(v) for v in values)  # type: ignore[union-attr]
            added, filled = len(values), len(self._buffer) >= self.window
        self._since += added
        if not filled or self._since < self.every:
            return None
        self._since = 0
        return self.evaluate()

    def evaluate(self) -> WindowResult:
        """Compare the current window with the reference now."""
        t = self.thresholds
        if self.numeric:
            current = self._buffer.values()  # type: ignore[union-attr]
            value = psi(self._ref_fractions, np.asarray(bin_fractions(current, self._edges)))
            ks_stat, ks_p = ks_two_sample(self._sample, current) if self._sample.size else (None, None)
        else:
            counts = Counter(self._buffer)
            n = max(1, len(self._buffer))
            known = set(self._categories)
            cur = [counts.get(c, 0) / n for c in self._categories]
            cur.append(sum(v for k, v in counts.items() if k not in known) / n)
            value = psi(self._ref_fractions, np.asarray(cur))
            ks_stat = ks_p = None
        level = None
        if value >= t.psi_alert or (ks_p is not None and ks_p < t.ks_alert_pvalue):
            level = "alert"
        elif value >= t.psi_warning:
            level = "warning"
        return WindowResult(value, ks_stat, ks_p, level, self.window)
