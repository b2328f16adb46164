"""Windowed drift: PSI and two-sample KS of the most recent window against a reference profile.

The reference is one column of a profile (loopline/profile.py): numeric columns carry quantile
edges with outlier bins on both ends and a KS sample; categorical columns carry value shares.
Categorical windows hold integer codes of the reference's categories (one code for any other
value), so a comparison is one ``np.bincount``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from loopline.profile import bin_fractions

_EPS = 1e-4  # floor of a bin share in PSI, so an empty bin costs a lot but not infinity
OTHER = "__other__"
MIN_EXPECTED = 5  # expected count in a window below which a category is pooled (the chi-square rule)


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference, dtype=float), _EPS, None)
    cur = np.clip(np.asarray(current, dtype=float), _EPS, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def ks_two_sample(reference_sample: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and asymptotic p-value."""
    return ks_sorted(np.sort(np.asarray(reference_sample, dtype=float)), current)


def ks_sorted(sorted_reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """``ks_2samp(current, reference, method="asymp")`` (two-sided) on an already sorted reference.

    The same arithmetic as scipy's, so the statistic and p-value are identical, without scipy's
    argument handling and without sorting the reference on every call.
    """
    cur = np.sort(np.asarray(current, dtype=float))
    n1, n2 = cur.size, sorted_reference.size
    if n1 == 0 or n2 == 0 or np.isnan(cur[-1]) or np.isnan(sorted_reference[-1]):
        # Empty samples raise and NaN propagates in scipy: leave those cases to it.
        res = stats.ks_2samp(current, sorted_reference, method="asymp")
        return float(res.statistic), float(res.pvalue)
    both = np.concatenate([cur, sorted_reference])
    diffs = (np.searchsorted(cur, both, side="right") / n1
             - np.searchsorted(sorted_reference, both, side="right") / n2)
    # scipy picks max(diffs) or -min(diffs), whichever is larger: that is max |diffs|.
    d = float(np.max(np.abs(diffs)))
    return d, _ks_asymp_pvalue(d, n1, n2)


# D is a difference of two step functions, so it takes few distinct values for given sample
# sizes (multiples of 1/1000 for two samples of 1000): most evaluations repeat an earlier p-value,
# and computing one costs 50-300 us.
@functools.lru_cache(maxsize=4096)
def _ks_asymp_pvalue(d: float, n1: int, n2: int) -> float:
    """The two-sided p-value of ``ks_2samp(method="asymp")``: the same call on the same values."""
    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    return float(np.clip(stats.kstwo.sf(d, np.round(en)), 0, 1))


class RingBuffer:
    """The last ``capacity`` values (floats unless ``dtype`` says otherwise), oldest first."""

    def __init__(self, capacity: int, dtype: npt.DTypeLike = float) -> None:
        self.capacity = capacity
        self._data = np.empty(capacity, dtype=dtype)
        self.total = 0

    def extend(self, values: np.ndarray | list[Any]) -> None:
        """Append values (a batch)."""
        values = np.asarray(values, dtype=self._data.dtype)[-self.capacity:]
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
            self._buffer = RingBuffer(window)
            self._edges = list(reference.get("edges") or [])
            self._ref_fractions = np.asarray(reference.get("fractions") or [1.0], dtype=float)
            # Sorted once: every KS evaluation compares against it.
            self._sample = np.sort(np.asarray(reference.get("sample") or [], dtype=float))
        else:
            self._buffer = RingBuffer(window, dtype=np.intp)
            shares = dict(reference.get("fractions") or {})
            # A category expected fewer than MIN_EXPECTED times in a window is pooled with unseen
            # values: its window share is mostly noise (an ID-like column of 1000 customers has a
            # PSI above 1 between two samples of the same distribution). A column whose every
            # category is that rare has no windowed comparison.
            self._categories = sorted(c for c, share in shares.items()
                                      if share * window >= MIN_EXPECTED)
            # A value's code is its category's position; any other value gets the last code.
            self._codes = {c: i for i, c in enumerate(self._categories)}
            pooled = sum(share for c, share in shares.items() if c not in self._codes)
            self._ref_fractions = np.asarray([shares[c] for c in self._categories] + [pooled],
                                             dtype=float)

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
            self._buffer.extend(arr)
            added = arr.size
        else:
            # Categories are str(value), as in the profile; `str(v) for` is the interpreter's fast
            # path for str(), map(str, ...) is not.
            strings = [str(v) for v in values]
            codes = map(self._codes.get, strings, repeat(len(self._categories)))
            self._buffer.extend(np.fromiter(codes, dtype=np.intp, count=len(strings)))
            added = len(strings)
        filled = self._buffer.total >= self.window
        self._since += added
        if not filled or self._since < self.every:
            return None
        self._since = 0
        return self.evaluate()

    def evaluate(self) -> WindowResult:
        """Compare the current window with the reference now."""
        t = self.thresholds
        if self.numeric:
            current = self._buffer.values()
            value = psi(self._ref_fractions, np.asarray(bin_fractions(current, self._edges)))
            ks_stat, ks_p = ks_sorted(self._sample, current) if self._sample.size else (None, None)
        else:
            codes = self._buffer.values()
            counts = np.bincount(codes, minlength=len(self._categories) + 1)
            value = psi(self._ref_fractions, counts / max(1, codes.size))
            ks_stat = ks_p = None
        # KS alone calls immaterial differences significant, and over the thousands of evaluations
        # of a stationary stream p < ks_alert_pvalue happens by chance (seen live: PSI 0.035, p
        # 0.0003): a KS alert also needs the PSI to reach the warning level.
        level = None
        material = value >= t.psi_warning
        if value >= t.psi_alert or (material and ks_p is not None and ks_p < t.ks_alert_pvalue):
            level = "alert"
        elif material:
            level = "warning"
        return WindowResult(value, ks_stat, ks_p, level, self.window)
