"""The statistics of a drift decision: effect size, dependence-corrected evidence, change points.

Events of a real stream are rarely independent: seasons, slowly moving sensors and weather make
neighbouring events alike, and a test that counts every event as a new observation calls a
season a drift. Every comparison here counts *effective* observations instead: a segment's
length divided by the stream's integrated autocorrelation time ``tau``, the largest of

- ``(1 + rho) / (1 - rho)`` from the lag-1 autocorrelation ``rho`` inside the segment
  (``n_eff = n (1 - rho) / (1 + rho)``, exact for an AR(1) stream), and
- the batch-means ratio over the history before the segment: the variance of the means of blocks
  as long as the segment, over the variance of single values, times the block length. It sees
  what one lag misses or overstates: a season is a slow wave under fast noise, so rho can be
  modest while means of a few hundred events still swing by a whole season, and means of
  several whole seasons hardly swing at all however large rho is.

The reference is taken to be as dependent as the live stream (it is usually consecutive rows
of training data), so it counts ``m / tau`` effective observations.

The comparison is on bins: a numeric column's reference deciles (its outlier bins merged into the
first and last decile, so a sparse tail cannot make a few values look significant), a
categorical column's reference categories. The effect size is the PSI of the segment against the
reference minus its expected value by chance, ``(k - 1) / n``, for the effective counts; the
evidence is Pearson's chi-square test of the same bins with the effective counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

#: Values before a segment needed to judge how dependent the stream is; less: no verdict yet.
MIN_HISTORY = 300
#: Fewest values in a tested segment of a column: fewer, and a PSI over ten bins is mostly noise.
MIN_SEGMENT = 30
#: Fewest errors in a tested segment of an error stream (a mean of 0/1 or absolute errors).
MIN_ERRORS = 16
_RHO_MAX = 0.999  # a constant stream has rho ~ 1: tau stays finite
_FLOOR = 1e-4  # smallest bin share in PSI: an empty bin costs a lot, not infinity


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    ref = np.clip(np.asarray(reference, dtype=float), _FLOOR, None)
    cur = np.clip(np.asarray(current, dtype=float), _FLOOR, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _as_columns(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1) if x.ndim == 1 else x


def _varies(cols: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
    """Columns that vary beyond rounding (a constant column's deviations are ~1e-16 of its size)."""
    size = np.max(np.abs(cols), axis=0, initial=0.0)
    return sum_sq / max(1, cols.shape[0]) > (1e-9 * size) ** 2 + 1e-300


def lag1_tau(x: np.ndarray) -> float:
    """``(1 + rho) / (1 - rho)`` from the lag-1 autocorrelation (of each column; the largest)."""
    cols = _as_columns(np.asarray(x, dtype=float))
    if cols.shape[0] < 3:
        return 1.0
    centred = cols - cols.mean(axis=0)
    var = np.einsum("ij,ij->j", centred, centred)
    cov = np.einsum("ij,ij->j", centred[1:], centred[:-1])
    live = _varies(cols, var)
    if not live.any():
        return 1.0
    rho = float(np.clip(np.max(cov[live] / var[live]), 0.0, _RHO_MAX))
    return (1 + rho) / (1 - rho)


def batch_means_tau(x: np.ndarray, block: int) -> float:
    """Integrated autocorrelation time at ``block`` by overlapping batch means (largest column)."""
    cols = _as_columns(np.asarray(x, dtype=float))
    n = cols.shape[0]
    if block < 2 or n < 2 * block:
        return 1.0
    centred = cols - cols.mean(axis=0)
    var = np.einsum("ij,ij->j", centred, centred) / n
    sums = np.cumsum(np.vstack([np.zeros((1, cols.shape[1])), centred]), axis=0)
    means = (sums[block:] - sums[:-block]) / block
    live = _varies(cols, var * n)
    if not live.any():
        return 1.0
    tau = block * np.mean(means[:, live] ** 2, axis=0) / var[live]
    return float(max(1.0, np.max(tau)))


def dependence(segment: np.ndarray, history: np.ndarray, within: bool = False) -> float | None:
    """The stream's integrated autocorrelation time for a segment of this length (>= 1).

    When ``history`` (the values before the segment, in order) holds at least five segments and
    ten lag-1 autocorrelation times, the batch-means estimate at blocks as long as the segment:
    what the history says about means of that length. With less the estimate is biased low (a
    short history of a slow stream has a mean close to its blocks'), so the largest of the lag-1
    estimates (segment and history) and the batch means at a fifth of the history is used. With
    fewer than :data:`MIN_HISTORY` values of history the answer is None (no verdict yet), unless
    ``within``: then the segment's own lag-1 and batch means (blocks of an eighth of it) are used.
    """
    n = len(segment)
    h = len(history)
    if h >= MIN_HISTORY:
        slow = lag1_tau(history)
        if h >= 5 * n and h >= 10 * slow:
            return batch_means_tau(history, n)
        return max(lag1_tau(segment), slow, batch_means_tau(history, h // 5))
    if within:
        return max(lag1_tau(segment), batch_means_tau(segment, max(2, n // 8)))
    return None


def change_point(codes: np.ndarray, bins: int, min_segment: int = MIN_SEGMENT) -> int:
    """Where the distribution of binned values most likely changed: the split with the largest
    two-sample chi-square between the bins before and after it (an index into ``codes``).

    Only splits that leave at least ``min_segment`` values after them are considered; 0 when
    ``codes`` is too short to split.
    """
    n = len(codes)
    if n < 2 * min_segment:
        return 0
    counts = np.zeros((n + 1, bins))
    counts[np.arange(1, n + 1), codes] = 1.0
    np.cumsum(counts, axis=0, out=counts)
    total = counts[-1]
    shares = np.maximum(total / n, 1.0 / n)
    j = np.arange(min_segment, n - min_segment + 1)
    before = counts[j] / j[:, None]
    after = (total - counts[j]) / (n - j)[:, None]
    stat = (j * (n - j) / n) * np.sum((before - after) ** 2 / shares, axis=1)
    return int(j[int(np.argmax(stat))])


def mean_change_point(x: np.ndarray, min_segment: int = MIN_SEGMENT) -> int:
    """Where the mean of ``x`` most likely changed (the CUSUM split); 0 when too short to split.

    More sensitive to a shift of the level than :func:`change_point`'s bins, which see any change.
    """
    n = len(x)
    if n < 2 * min_segment:
        return 0
    sums = np.cumsum(np.asarray(x, dtype=float) - np.mean(x))
    j = np.arange(min_segment, n - min_segment + 1)
    stat = np.abs(sums[j - 1]) / np.sqrt(j * (n - j) / n)
    return int(j[int(np.argmax(stat))])


@dataclass(frozen=True)
class BinTest:
    """One segment against the reference bins."""

    n: int
    n_eff: float
    psi: float  # as observed
    effect: float  # PSI minus what chance alone gives for these effective counts
    p_value: float  # chi-square, effective counts


def bin_test(reference: np.ndarray, counts: np.ndarray, m: int, tau: float) -> BinTest:
    """Compare bin ``counts`` of a segment with reference shares (from ``m`` reference values)."""
    n = int(counts.sum())
    k = len(reference)
    # A +0.5 count prior on the reference: a category it never saw is rare, not impossible.
    ref = np.maximum(np.asarray(reference, dtype=float), 0.5 / max(m, 1))
    ref = ref / ref.sum()
    cur = counts / max(n, 1)
    n_eff = max(1.0, n / tau)
    m_eff = max(1.0, m / tau)
    scale = n_eff * m_eff / (n_eff + m_eff)
    observed = psi(ref, cur)
    chi2 = scale * float(np.sum((cur - ref) ** 2 / ref))
    p = float(special.chdtrc(k - 1, chi2)) if k > 1 else 1.0
    return BinTest(n, n_eff, observed, observed - (k - 1) / scale, p)


@dataclass(frozen=True)
class MeanTest:
    """One segment's mean against a baseline mean (errors of a model)."""

    n: int
    n_eff: float
    mean: float
    baseline: float
    p_value: float  # one-sided: the segment's mean is higher


def mean_test(segment: np.ndarray, baseline: float, var: float, m: int, tau: float) -> MeanTest:
    """Is the segment's mean above ``baseline`` (from ``m`` values of variance ``var``), counting
    effective values?"""
    n = len(segment)
    mean = float(np.mean(segment)) if n else baseline
    n_eff, m_eff = max(1.0, n / tau), max(1.0, m / tau)
    se = math.sqrt(var * (1 / n_eff + 1 / m_eff))
    z = (mean - baseline) / se if se > 0 else (math.inf if mean > baseline else 0.0)
    return MeanTest(n, n_eff, mean, baseline, float(special.ndtr(-z)))


def rate_test(segment: np.ndarray, baseline: float, m: int, tau: float) -> MeanTest:
    """Is a 0/1 segment's rate above ``baseline`` (from ``m`` values), counting effective values?

    With few expected events (a near-perfect model) the normal approximation is far too bold,
    so the binomial tail is used, at the baseline's posterior mean under a uniform prior (a
    baseline with no error at all is not taken to mean errors are impossible).
    """
    n = len(segment)
    k = float(np.sum(segment))
    n_eff, m_eff = max(1.0, n / tau), max(1.0, m / tau)
    p0 = (baseline * m_eff + 1) / (m_eff + 2)
    if n_eff * p0 >= 10 and n_eff * (1 - p0) >= 10:
        return mean_test(segment, baseline, baseline * (1 - baseline) or p0 * (1 - p0), m, tau)
    k_eff = k / tau
    # P(X >= k_eff) for X ~ Binomial(n_eff, p0), continuous in k and n: I_p0(k, n - k + 1).
    p = 1.0 if k_eff <= 0 else float(special.betainc(k_eff, max(n_eff - k_eff, 0.0) + 1.0, p0))
    return MeanTest(n, n_eff, k / n if n else baseline, baseline, p)


def z_pvalue(segment: np.ndarray, mean: float, var: float, m: int, tau: float) -> float:
    """Two-sided p-value of the segment's mean against a reference ``mean``/``var`` of ``m``."""
    n = len(segment)
    if n == 0 or var <= 0:
        return 1.0
    se = math.sqrt(var * (tau / n + tau / max(m, 1)))
    return float(2 * special.ndtr(-abs(float(np.mean(segment)) - mean) / se))
