"""The statistics behind drift decisions: dependence, change points, effect and evidence."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.services.monitor.evidence import (
    MIN_HISTORY,
    batch_means_tau,
    bin_test,
    change_point,
    dependence,
    lag1_tau,
    mean_change_point,
    rate_test,
    z_pvalue,
)


def ar1(seed: int, n: int, phi: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty(n)
    x[0] = rng.normal()
    e = rng.normal(0, np.sqrt(1 - phi**2), n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_lag1_tau_is_the_ar1_effective_sample_factor(phi: float) -> None:
    expected = (1 + phi) / (1 - phi)  # n_eff = n (1 - phi) / (1 + phi)
    assert lag1_tau(ar1(1, 50_000, phi)) == pytest.approx(expected, rel=0.1)


def test_batch_means_see_a_season_that_one_lag_misses_and_whole_seasons_that_cancel() -> None:
    rng = np.random.default_rng(2)
    t = np.arange(6000)
    season = np.sin(2 * np.pi * t / 365) + rng.normal(0, 1, t.size)  # a slow wave under white noise
    assert lag1_tau(season) < 3, "one lag sees mostly the noise"
    assert batch_means_tau(season, 120) > 20, "but means of 120 events swing with the season"
    assert batch_means_tau(season, 1095) < batch_means_tau(season, 120) / 4, (
        "three whole years cancel out"
    )
    assert batch_means_tau(rng.normal(size=6000), 120) == pytest.approx(1.0, abs=0.5)


def test_dependence_needs_history_unless_asked_to_judge_within() -> None:
    x = np.random.default_rng(3).normal(size=2000)
    assert dependence(x[:100], x[100 : 100 + MIN_HISTORY - 1]) is None
    assert dependence(x[:100], x[100 : 100 + MIN_HISTORY - 1], within=True) == pytest.approx(
        1.0, abs=0.6
    )
    assert dependence(x[:100], x[100:]) == pytest.approx(1.0, abs=0.6)
    slow = ar1(4, 3000, 0.99)
    # Too short a history for batch means of a slow stream: lag-1's estimate (199) keeps it honest.
    assert dependence(slow[2500:], slow[:2500]) > 100


def test_change_points_are_found_where_the_distribution_changed() -> None:
    rng = np.random.default_rng(5)
    codes = np.r_[rng.integers(0, 5, 700), rng.integers(3, 8, 300)]
    assert abs(change_point(codes, 8) - 700) < 15
    level = np.r_[rng.normal(0, 1, 800), rng.normal(0.8, 1, 200)]
    assert abs(mean_change_point(level) - 800) < 30
    assert change_point(codes[:40], 8) == 0 and mean_change_point(level[:40]) == 0, (
        "too short to split"
    )


def test_bin_test_takes_chance_out_of_the_effect_and_counts_effective_events() -> None:
    rng = np.random.default_rng(6)
    ref = np.full(10, 0.1)
    same = np.bincount(rng.integers(0, 10, 100), minlength=10)
    t = bin_test(ref, same, 1000, tau=1.0)
    assert t.psi > 0.05 and abs(t.effect) < 0.05 and t.p_value > 1e-3
    moved = np.bincount(rng.integers(5, 10, 100), minlength=10)
    independent, dependent = (
        bin_test(ref, moved, 1000, tau=1.0),
        bin_test(ref, moved, 1000, tau=20.0),
    )
    assert independent.p_value < 1e-10 < dependent.p_value and dependent.n_eff == pytest.approx(5.0)
    assert independent.effect > dependent.effect > 0


def test_rate_test_does_not_take_one_error_of_a_perfect_model_for_a_drop() -> None:
    one = np.r_[1.0, np.zeros(15)]
    assert rate_test(one, 0.0, 500, 1.0).p_value > 0.01
    many = np.r_[np.ones(6), np.zeros(10)]
    assert rate_test(many, 0.0, 500, 1.0).p_value < 1e-8
    common = (np.random.default_rng(7).random(400) < 0.3).astype(float)
    assert (
        rate_test(common, 0.15, 500, 1.0).p_value < 1e-4 < rate_test(common, 0.15, 500, 8.0).p_value
    )


def test_z_pvalue_is_two_sided_and_counts_effective_events() -> None:
    x = np.full(100, 0.3)
    assert z_pvalue(x, 0.0, 1.0, 1000, 1.0) == pytest.approx(z_pvalue(-x, 0.0, 1.0, 1000, 1.0))
    assert z_pvalue(x, 0.0, 1.0, 1000, 1.0) < 0.01 < z_pvalue(x, 0.0, 1.0, 1000, 10.0)
