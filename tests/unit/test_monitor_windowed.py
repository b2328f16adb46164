"""Windowed PSI/KS against a reference profile, and the ring buffer under it."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from scipy import stats

from loopline.profile import categorical_profile, numeric_profile
from loopline.services.monitor.windowed import (MIN_EXPECTED, RingBuffer, Thresholds, WindowedDrift,
                                                ks_sorted, ks_two_sample, psi)

T = Thresholds(psi_warning=0.1, psi_alert=0.25, ks_alert_pvalue=0.001)


def test_psi_is_zero_for_equal_shares_and_grows_with_difference() -> None:
    ref = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(ref, ref) == pytest.approx(0.0)
    assert 0 < psi(ref, np.array([0.3, 0.2, 0.25, 0.25])) < psi(ref, np.array([0.7, 0.1, 0.1, 0.1]))


def test_ring_buffer_keeps_the_last_values_in_order() -> None:
    buf = RingBuffer(5)
    buf.extend(np.arange(3))
    assert buf.values().tolist() == [0, 1, 2]
    buf.extend(np.arange(3, 9))
    assert buf.values().tolist() == [4, 5, 6, 7, 8]
    buf.extend(np.arange(9, 20))
    assert buf.values().tolist() == [15, 16, 17, 18, 19]


def test_same_distribution_stays_quiet_and_a_shift_alerts() -> None:
    rng = np.random.default_rng(0)
    ref = numeric_profile(rng.normal(10, 2, 20_000))
    w = WindowedDrift(ref, window=1000, every=250, thresholds=T)
    same = [r for chunk in np.split(rng.normal(10, 2, 5000), 20) if (r := w.add(chunk)) is not None]
    assert same and all(r.level is None for r in same)
    assert max(r.psi for r in same) < 0.1
    shifted = [r for chunk in np.split(rng.normal(12, 2, 2000), 8) if (r := w.add(chunk)) is not None]
    assert shifted[-1].level == "alert" and shifted[-1].psi > 0.25 and shifted[-1].ks_pvalue < 1e-6


def test_values_outside_the_reference_range_land_in_the_outlier_bins() -> None:
    ref = numeric_profile(np.linspace(0, 1, 5000))
    w = WindowedDrift(ref, window=100, every=100, thresholds=T)
    r = w.add(np.full(100, 5.0))
    assert r is not None and r.level == "alert" and r.psi > 5


def test_a_small_shift_is_a_warning() -> None:
    rng = np.random.default_rng(1)
    ref = numeric_profile(rng.normal(0, 1, 50_000))
    w = WindowedDrift(ref, window=5000, every=5000, thresholds=Thresholds(0.1, 0.25, 1e-300))
    r = w.add(rng.normal(0.4, 1, 5000))
    assert r is not None and 0.1 <= r.psi < 0.25 and r.level == "warning"


def test_categorical_columns_compare_shares_including_unseen_values() -> None:
    ref = categorical_profile(["a"] * 500 + ["b"] * 500)
    w = WindowedDrift(ref, window=200, every=200, thresholds=T)
    assert w.add(["a", "b"] * 100).level is None  # type: ignore[union-attr]
    r = w.add(["c"] * 200)
    assert r is not None and r.level == "alert" and r.ks_pvalue is None


def test_an_empty_reference_is_not_usable() -> None:
    w = WindowedDrift(numeric_profile([]), window=100, every=10, thresholds=T)
    assert not w.usable and w.add(np.ones(200)) is None


def ks_samples(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (current, reference) pair: continuous, shifted, discrete (ties) or rounded values."""
    rng = np.random.default_rng(seed)
    n1 = int(rng.choice([2, 3, 40, 141, 250, 999, 1000, 2000]))
    n2 = int(rng.choice([1, 5, 100, 1000, 1500]))
    kind = seed % 4
    if kind == 0:
        return rng.normal(rng.uniform(-0.3, 0.3), 1, n1), rng.normal(0, 1, n2)
    if kind == 1:
        return rng.integers(0, 5, n1).astype(float), rng.integers(0, 6, n2).astype(float)
    if kind == 2:
        return rng.normal(0.05, 1.1, n1).round(1), rng.normal(0, 1, n2).round(1)
    return rng.normal(rng.uniform(0.5, 3), 1, n1), rng.normal(0, 1, n2)


def test_ks_is_identical_to_scipy_ks_2samp_asymp() -> None:
    for seed in range(600):
        current, reference = ks_samples(seed)
        expected = stats.ks_2samp(current, reference, method="asymp")
        got = (ks_sorted(np.sort(reference), current), ks_two_sample(reference, current))
        for stat, pvalue in got:
            assert stat == float(expected.statistic), seed
            assert pvalue == float(expected.pvalue), seed


def test_windowed_ks_is_identical_to_scipy_on_its_window() -> None:
    rng = np.random.default_rng(2)
    ref = numeric_profile(rng.normal(0, 1, 20_000))
    w = WindowedDrift(ref, window=1000, every=250, thresholds=T)
    for chunk in np.split(np.r_[rng.normal(0, 1, 3000), rng.normal(0.3, 1, 3000)], 24):
        r = w.add(chunk)
        if r is not None:
            expected = stats.ks_2samp(w._buffer.values(), ref["sample"], method="asymp")
            assert (r.ks_statistic, r.ks_pvalue) == (expected.statistic, expected.pvalue)


def counter_psi(ref: dict[str, Any], window: list[str], size: int) -> float:
    """PSI of a categorical window the straightforward way: shares from a Counter of strings, the
    categories expected fewer than MIN_EXPECTED times in ``size`` values pooled with unseen ones."""
    shares = ref["fractions"]
    categories = sorted(c for c, share in shares.items() if share * size >= MIN_EXPECTED)
    counts = Counter(window)
    n = max(1, len(window))
    cur = [counts.get(c, 0) / n for c in categories]
    cur.append(sum(v for k, v in counts.items() if k not in categories) / n)
    pooled = sum(share for c, share in shares.items() if c not in categories)
    return psi(np.asarray([shares[c] for c in categories] + [pooled]), np.asarray(cur))


def test_an_id_like_column_has_no_windowed_comparison_but_common_categories_do() -> None:
    rng = np.random.default_rng(0)
    customers = [f"c{i}" for i in range(1000)]
    ids = WindowedDrift(categorical_profile(rng.choice(customers, 5000).tolist()), window=1000,
                        every=250, thresholds=T)
    assert not ids.usable, "1000 customers in a 1000-event window: each expected once"
    assert all(ids.add(rng.choice(customers, 250).tolist()) is None for _ in range(20))
    # Two common categories and a long tail: the same distribution stays quiet, a shift between
    # the common ones is still seen.
    def draw(n: int, p_a: float) -> list[str]:
        tail = rng.choice(customers, n).tolist()
        u = rng.random(n)
        return ["A" if x < p_a else "B" if x < 0.8 else t for x, t in zip(u, tail)]

    w = WindowedDrift(categorical_profile(draw(5000, 0.4)), window=1000, every=1000, thresholds=T)
    same = w.add(draw(1000, 0.4))
    assert same is not None and same.level is None, same
    shifted = w.add(draw(1000, 0.1))
    assert shifted is not None and shifted.level == "alert", shifted


@pytest.mark.parametrize("seed", range(5))
def test_categorical_psi_is_identical_to_counting_strings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    known = [f"c{i}" for i in range(int(rng.integers(2, 60)))]  # some kept, some pooled
    ref = categorical_profile(rng.choice(known, 5000).tolist() + [True, 7])
    window, every = int(rng.integers(250, 1000)), int(rng.integers(1, 300))
    w = WindowedDrift(ref, window=window, every=every, thresholds=T)
    seen: list[str] = []
    pool = known + ["unseen", "other", True, 7, 7.5]
    evaluations = 0
    for _ in range(60):
        batch = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 400)))]
        seen.extend(str(v) for v in batch)
        r = w.add(batch)
        if r is not None:
            evaluations += 1
            assert r.psi == counter_psi(ref, seen[-window:], window)
    assert evaluations > 0 and w.evaluate().psi == counter_psi(ref, seen[-window:], window)


def test_ring_buffer_of_integer_codes() -> None:
    buf = RingBuffer(4, dtype=np.intp)
    buf.extend([1, 2, 3])
    buf.extend([4, 5])
    assert buf.values().tolist() == [2, 3, 4, 5] and buf.values().dtype == np.intp


def test_a_significant_but_immaterial_ks_difference_is_no_alert() -> None:
    rng = np.random.default_rng(11)
    ref = numeric_profile(rng.normal(0, 1, 5000), seed=0)
    w = WindowedDrift(ref, window=5000, every=5000, thresholds=T)
    tiny = w.add(rng.normal(0.2, 1, 5000))  # large windows make a 0.2-sd shift "significant"
    assert tiny is not None and tiny.ks_pvalue is not None and tiny.ks_pvalue < T.ks_alert_pvalue
    assert tiny.psi < T.psi_warning and tiny.level is None
    moderate = w.add(rng.normal(0.5, 1, 5000))  # material too: PSI past the warning level
    assert moderate is not None and T.psi_warning <= moderate.psi < T.psi_alert
    assert moderate.level == "alert", "significant and material"
