"""Comparisons with a reference profile: effect, dependence-corrected evidence, persistence."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from loopline.profile import categorical_profile, numeric_profile
from loopline.services.monitor.evidence import bin_test
from loopline.services.monitor.windowed import (
    MIN_EXPECTED,
    Comparison,
    RingBuffer,
    Thresholds,
    WindowedDrift,
    psi,
)

T = Thresholds(psi_warning=0.1, psi_alert=0.25, p_value=1e-4)


def feed(w: WindowedDrift, values: Any, start: int = 0, batch: int = 250) -> list[Comparison]:
    """Add ``values`` in batches; every comparison that came due."""
    out = []
    for lo in range(0, len(values), batch):
        chunk = values[lo : lo + batch]
        r = w.add(
            chunk, np.arange(start + lo, start + lo + len(chunk)), np.zeros(len(chunk), dtype=int)
        )
        if r is not None:
            out.append(r)
    return out


def test_psi_is_zero_for_equal_shares_and_grows_with_difference() -> None:
    ref = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(ref, ref) == pytest.approx(0.0)
    assert 0 < psi(ref, np.array([0.3, 0.2, 0.25, 0.25])) < psi(ref, np.array([0.7, 0.1, 0.1, 0.1]))


def test_ring_buffer_keeps_the_last_values_in_order() -> None:
    buf = RingBuffer(5)
    buf.extend(np.arange(3))
    assert buf.values().tolist() == [0, 1, 2] and buf.values(2).tolist() == [1, 2]
    buf.extend(np.arange(3, 9))
    assert buf.values().tolist() == [4, 5, 6, 7, 8] and buf.values(3).tolist() == [6, 7, 8]
    buf.extend(np.arange(9, 20))  # more than it holds at once
    assert buf.values().tolist() == [15, 16, 17, 18, 19] and buf.total == 20
    codes = RingBuffer(4, dtype=np.int16)
    codes.extend([1, 2, 3])
    codes.extend([4, 5])
    assert codes.values().tolist() == [2, 3, 4, 5] and codes.values().dtype == np.int16


def test_same_distribution_stays_quiet_and_a_shift_alerts() -> None:
    rng = np.random.default_rng(0)
    w = WindowedDrift(
        numeric_profile(rng.normal(10, 2, 20_000)), window=1000, every=250, thresholds=T
    )
    same = feed(w, rng.normal(10, 2, 5000))
    assert same and all(r.level is None for r in same)
    assert max(r.effect for r in same) < 0.05, "chance is taken out of the PSI"
    shifted = feed(w, rng.normal(12, 2, 1000), start=5000)
    last = shifted[-1]  # the whole window shifted
    assert last.level == "alert" and last.effect > 0.25 and last.p_value < 1e-6
    assert last.reference_value == pytest.approx(
        10, abs=0.1
    ) and last.current_value == pytest.approx(12, abs=0.2)


def test_values_beyond_the_reference_range_count_in_its_first_and_last_deciles() -> None:
    w = WindowedDrift(numeric_profile(np.linspace(0, 1, 5000)), window=100, every=100, thresholds=T)
    feed(w, np.random.default_rng(0).uniform(0, 1, 400))  # history to judge dependence by
    r = feed(w, np.full(100, 5.0), start=400)[-1]
    assert r.level == "alert" and r.psi > 5


def test_a_moderate_shift_is_a_warning_and_an_immaterial_one_nothing() -> None:
    rng = np.random.default_rng(1)
    w = WindowedDrift(
        numeric_profile(rng.normal(0, 1, 50_000)), window=5000, every=5000, thresholds=T
    )
    feed(w, rng.normal(0, 1, 5000), batch=5000)
    tiny = feed(w, rng.normal(0.15, 1, 5000), start=5000, batch=5000)[-1]
    assert tiny.p_value < T.p_value and tiny.effect < T.psi_warning and tiny.level is None, (
        "significant with 5000 events, but immaterial"
    )
    moderate = feed(w, rng.normal(0.45, 1, 5000), start=10_000, batch=5000)[-1]
    assert T.psi_warning <= moderate.effect < T.psi_alert and moderate.level == "warning"


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    x = np.empty(n)
    x[0] = rng.normal()
    e = rng.normal(0, np.sqrt(1 - phi**2), n)
    for i in range(1, n):
        x[i] = phi * x[i - 1] + e[i]
    return x


def test_an_autocorrelated_stream_needs_more_evidence_than_an_independent_one() -> None:
    # A stretch of an AR(1) stream wanders away from the long-run distribution by chance; counted
    # as independent events it would look like overwhelming evidence of a drift.
    rng = np.random.default_rng(4)
    ref = numeric_profile(rng.normal(0, 1, 20_000))
    stream = ar1(rng, 30_000, 0.95)
    w = WindowedDrift(ref, window=500, every=500, thresholds=T)
    results = feed(w, stream, batch=500)
    assert all(r.level is None for r in results)
    assert min(r.tau for r in results[4:]) > 10, "the autocorrelation time of AR(0.95) is 39"
    wandering = max(results, key=lambda r: r.psi)
    assert wandering.psi > 0.25, "a stretch did move, by chance"
    segment = stream[wandering.start : wandering.start + wandering.n]
    counts = np.bincount(w.encode(segment), minlength=w.bins)
    naive = bin_test(w._ref_fractions, counts, w._m, tau=1.0)  # as if every event were independent
    assert naive.p_value < T.p_value < wandering.p_value


def test_a_change_segment_is_found_and_judged_from_its_start() -> None:
    rng = np.random.default_rng(2)
    w = WindowedDrift(
        numeric_profile(rng.normal(0, 1, 5000)), window=1000, every=1000, thresholds=T
    )
    feed(w, rng.normal(0, 1, 3000))
    assert w.compare_since_change(1000) is None or w.compare_since_change(1000).level is None  # type: ignore[union-attr]  # not None here
    feed(w, rng.normal(1.5, 1, 100), start=3000, batch=100)
    c = w.compare_since_change(1000)
    assert c is not None and c.level == "alert"
    assert 2950 <= c.first_offset <= 3030 and 70 <= c.n <= 150
    assert c.recent_effect > T.psi_alert / 2, "persistent: the latest half moved too"


def test_no_verdict_on_a_change_segment_without_history_to_judge_dependence() -> None:
    rng = np.random.default_rng(3)
    w = WindowedDrift(
        numeric_profile(rng.normal(0, 1, 5000)), window=1000, every=1000, thresholds=T
    )
    feed(w, rng.normal(3, 1, 200))
    assert w.compare_since_change(1000) is None


def test_categorical_columns_compare_shares_including_unseen_values() -> None:
    ref = categorical_profile(["a"] * 500 + ["b"] * 500)
    w = WindowedDrift(ref, window=200, every=200, thresholds=T)
    assert all(r.level is None for r in feed(w, ["a", "b"] * 300, batch=200))
    r = feed(w, ["c"] * 200, start=600, batch=200)[-1]
    assert r.level == "alert" and r.moved == "other values" and r.current_value == 1.0


def test_an_empty_reference_is_not_usable() -> None:
    w = WindowedDrift(numeric_profile([]), window=100, every=10, thresholds=T)
    assert not w.usable and feed(w, np.ones(200)) == []


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
    ref_shares = np.asarray([shares[c] for c in categories] + [pooled])
    # The comparison floors reference shares at half a count, as a prior.
    ref_shares = np.maximum(ref_shares, 0.5 / ref["count"])
    return psi(ref_shares / ref_shares.sum(), np.asarray(cur))


@pytest.mark.parametrize("seed", range(5))
def test_categorical_psi_is_identical_to_counting_strings(seed: int) -> None:
    rng = np.random.default_rng(seed)
    known = [f"c{i}" for i in range(int(rng.integers(2, 60)))]  # some kept, some pooled
    ref = categorical_profile([*rng.choice(known, 5000).tolist(), True, 7])
    window, every = int(rng.integers(250, 1000)), int(rng.integers(1, 300))
    w = WindowedDrift(ref, window=window, every=every, thresholds=T)
    seen: list[str] = []
    pool = [*known, "unseen", "other", True, 7, 7.5]
    evaluations = 0
    for _ in range(60):
        batch = [pool[j] for j in rng.integers(0, len(pool), int(rng.integers(1, 400)))]
        seen.extend(str(v) for v in batch)
        r = w.add(batch, np.arange(len(batch)), np.zeros(len(batch), dtype=int))
        if r is not None:
            evaluations += 1
            assert r.psi == pytest.approx(counter_psi(ref, seen[-window:], window), rel=1e-12)
    assert evaluations > 0


def test_an_id_like_column_has_no_comparison_but_common_categories_do() -> None:
    rng = np.random.default_rng(0)
    customers = [f"c{i}" for i in range(1000)]
    ids = WindowedDrift(
        categorical_profile(rng.choice(customers, 5000).tolist()),
        window=1000,
        every=250,
        thresholds=T,
    )
    assert not ids.usable, "1000 customers in a 1000-event window: each expected once"
    assert feed(ids, rng.choice(customers, 5000).tolist()) == []

    def draw(n: int, p_a: float) -> list[str]:
        tail = rng.choice(customers, n).tolist()
        u = rng.random(n)
        return ["A" if x < p_a else "B" if x < 0.8 else t for x, t in zip(u, tail)]

    w = WindowedDrift(categorical_profile(draw(5000, 0.4)), window=1000, every=1000, thresholds=T)
    same = feed(w, draw(2000, 0.4), batch=1000)
    assert same[-1].level is None
    shifted = feed(w, draw(1000, 0.1), start=2000, batch=1000)
    assert shifted[-1].level == "alert" and shifted[-1].moved in ("A", "B")


def test_recent_profile_is_the_last_window() -> None:
    rng = np.random.default_rng(5)
    w = WindowedDrift(numeric_profile(rng.normal(0, 1, 2000)), window=500, every=500, thresholds=T)
    feed(w, rng.normal(0, 1, 200))
    assert w.recent_profile() is None, "too few values to be a reference"
    feed(w, rng.normal(5, 1, 1000), start=200)
    profile = w.recent_profile()
    assert (
        profile is not None
        and profile["count"] == 500
        and profile["mean"] == pytest.approx(5, abs=0.2)
    )
    c = WindowedDrift(categorical_profile(["a", "b"] * 100), window=100, every=100, thresholds=T)
    feed(c, ["b", "c"] * 200)
    assert c.recent_profile()["fractions"] == {"b": 0.5, "c": 0.5}  # type: ignore[index]  # not None here


def test_an_id_like_column_is_not_watched_nor_warmed_up_again() -> None:
    from loopline.services.monitor.streams import ColumnWatch

    rng = np.random.default_rng(9)
    ids = [f"c{i}" for i in range(5000)]
    w = ColumnWatch(
        "customer",
        categorical_profile(rng.choice(ids, 5000).tolist()),
        False,
        ["adwin"],
        1,
        1000,
        250,
        T,
    )
    for lo in range(0, 5000, 500):
        f = w.update(rng.choice(ids, 500).tolist(), list(range(lo, lo + 500)), [0] * 500)
        assert f.windowed is None and f.detections == []
    assert w.unusable and w.warmup == [] and w.streams == []
