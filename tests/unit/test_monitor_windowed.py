"""Windowed PSI/KS against a reference profile, and the ring buffer under it."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.profile import categorical_profile, numeric_profile
from loopline.services.monitor.windowed import RingBuffer, Thresholds, WindowedDrift, psi

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
