"""Contract every drift detector keeps, run over each one (as river's estimator checks do)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from river import drift

from loopline.services.monitor import detectors
from loopline.services.monitor.detectors import KINDS, Detector, DetectorError, error_detector_names

ALL = sorted(KINDS)


def stream(name: str, seed: int, n_before: int = 2000, n_after: int = 2000) -> np.ndarray:
    """A stream with one abrupt change at ``n_before``: error rate 0.1 -> 0.5, or mean 0 -> 2 sd."""
    rng = np.random.default_rng(seed)
    if KINDS[name].binary:
        p = np.r_[np.full(n_before, 0.1), np.full(n_after, 0.5)]
        return (rng.random(p.size) < p).astype(float)
    return np.r_[rng.normal(0, 1, n_before), rng.normal(2, 1, n_after)]


@pytest.mark.parametrize("name", ALL)
def test_detects_a_strong_change_after_it_happens(name: str) -> None:
    det = Detector(name, seed=7, binary_stream=KINDS[name].binary)
    hits = det.update_many(stream(name, seed=1))
    after = hits[hits >= 2000]
    assert after.size >= 1, f"{name} missed a strong change"
    assert after[0] < 2000 + 600, f"{name} took {after[0] - 2000} events"
    assert det.seen == 4000 and det.detections == hits.size


@pytest.mark.parametrize("name", ALL)
def test_few_false_alarms_on_a_stationary_stream(name: str) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random(5000) < 0.2).astype(float) if KINDS[name].binary else rng.normal(0, 1, 5000)
    assert Detector(name, seed=0, binary_stream=KINDS[name].binary).update_many(data).size <= 2


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_signals(name: str) -> None:
    data = stream(name, seed=3)
    a = Detector(name, seed=11, binary_stream=KINDS[name].binary).update_many(data)
    b = Detector(name, seed=11, binary_stream=KINDS[name].binary).update_many(data)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("name", ALL)
def test_batches_equal_one_stream(name: str) -> None:
    data = stream(name, seed=4)
    whole = Detector(name, seed=5, binary_stream=KINDS[name].binary).update_many(data)
    det = Detector(name, seed=5, binary_stream=KINDS[name].binary)
    parts = [det.update_many(chunk) + start for start, chunk in
             ((s, data[s:s + 137]) for s in range(0, data.size, 137))]
    assert np.concatenate(parts).tolist() == whole.tolist()


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip_continues_identically(name: str) -> None:
    data = stream(name, seed=6)
    det = Detector(name, seed=9, binary_stream=KINDS[name].binary)
    det.update_many(data[:1500])
    copy = pickle.loads(pickle.dumps(det))
    assert copy.update_many(data[1500:]).tolist() == det.update_many(data[1500:]).tolist()
    assert copy.seen == det.seen


@pytest.mark.parametrize("name", ALL)
def test_missing_values_are_not_learned(name: str) -> None:
    data = stream(name, seed=8)
    with_gaps = np.insert(data, [10, 500, 2500], np.nan)
    a = Detector(name, seed=1, binary_stream=KINDS[name].binary).update_many(data)
    b = Detector(name, seed=1, binary_stream=KINDS[name].binary).update_many(with_gaps)
    assert len(a) == len(b)


@pytest.mark.parametrize("name", [n for n in ALL if KINDS[n].binary])
def test_binary_detectors_refuse_real_valued_streams(name: str) -> None:
    with pytest.raises(DetectorError, match="0/1 error streams"):
        Detector(name)


def test_unknown_detector_is_named() -> None:
    with pytest.raises(DetectorError, match="unknown detector 'nope'"):
        Detector("nope")


def test_regression_keeps_only_real_valued_error_detectors() -> None:
    assert error_detector_names(["ddm", "adwin", "hddm_w"], "regression") == ["adwin"]
    assert error_detector_names(["ddm", "adwin"], "classification") == ["ddm", "adwin"]


def shifting_stream(seed: int) -> np.ndarray:
    """Segments whose mean jumps up and down (z-score scale), with some values missing (NaN)."""
    rng = np.random.default_rng(seed)
    parts = [rng.normal(rng.uniform(-3, 3), rng.uniform(0.3, 2.0), int(rng.integers(50, 2500)))
             for _ in range(int(rng.integers(2, 7)))]
    data = np.concatenate(parts)
    data[rng.random(data.size) < 0.05] = np.nan
    return data


def river_reference(river_detector: Any, data: np.ndarray) -> list[int]:
    """Detection indices of a river detector fed value by value through its public API."""
    hits = []
    for i, v in enumerate(data.tolist()):
        if v != v:
            continue
        river_detector.update(v)
        if river_detector.drift_detected:
            hits.append(i)
    return hits


def fed_in_batches(det: Detector, data: np.ndarray, seed: int) -> list[int]:
    """Detection indices of ``det`` fed in batches of mixed sizes (1 included)."""
    rng = np.random.default_rng(seed)
    hits, pos = [], 0
    while pos < data.size:
        size = int(rng.choice([1, 2, 17, 31, 32, 100, 1000, 3000]))
        hits += (det.update_many(data[pos:pos + size]) + pos).tolist()
        pos += size
    return hits


@pytest.mark.parametrize("vector_min", [1, detectors.PH_VECTOR_MIN])
@pytest.mark.parametrize("seed", range(8))
def test_page_hinkley_detects_exactly_where_river_does(seed: int, vector_min: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # vector_min=1 sends even 1-value batches through the vectorised path.
    monkeypatch.setattr(detectors, "PH_VECTOR_MIN", vector_min)
    data = shifting_stream(seed)
    river = KINDS["page_hinkley"].build(0)
    expected = river_reference(river, data)
    det = Detector("page_hinkley")
    assert fed_in_batches(det, data, seed) == expected
    assert len(expected) >= 1 and det.detections == len(expected) and det.seen == data.size
    ours = det._river
    assert ours._drift_detected == river._drift_detected and ours._x_mean.n == river._x_mean.n
    for field in ("_sum_increase", "_sum_decrease", "_min_increase", "_max_decrease"):
        assert getattr(ours, field) == pytest.approx(getattr(river, field), rel=1e-9, abs=1e-9)
    assert ours._x_mean.get() == pytest.approx(river._x_mean.get(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mode", ["up", "down", "both"])
def test_vectorised_page_hinkley_follows_every_river_parameter(mode: str) -> None:
    data = shifting_stream(100)
    params = {"min_instances": 50, "delta": 0.05, "threshold": 20.0, "alpha": 0.999, "mode": mode}
    expected = river_reference(drift.PageHinkley(**params), data)
    det = Detector("page_hinkley")
    det._river = drift.PageHinkley(**params)
    assert fed_in_batches(det, data, 1) == expected and expected


def test_page_hinkley_after_an_infinite_value_behaves_as_river() -> None:
    data = shifting_stream(3)
    data[700] = np.inf
    expected = river_reference(KINDS["page_hinkley"].build(0), data)
    assert expected and max(expected) < 700  # river never detects again: its mean is inf, then NaN
    assert fed_in_batches(Detector("page_hinkley"), data, 3) == expected


@pytest.mark.parametrize("seed", range(8))
def test_adwin_detects_exactly_where_river_does(seed: int) -> None:
    data = shifting_stream(seed + 50)
    river = KINDS["adwin"].build(0)
    expected = river_reference(river, data)
    det = Detector("adwin")
    assert fed_in_batches(det, data, seed) == expected and expected
    ours = det._river
    assert ours._drift_detected == river._drift_detected
    assert (ours.width, ours.total, ours.variance) == (river.width, river.total, river.variance)


@pytest.mark.parametrize("name", ["adwin", "page_hinkley"])
def test_feature_detectors_stay_quiet_on_a_long_stationary_stream(name: str) -> None:
    # River's Page-Hinkley default (alpha 0.9999) alarmed about every 12k events on such a stream.
    rng = np.random.default_rng(7)
    det = Detector(name, seed=7)
    hits = [det.update_many(rng.normal(0, 1, 1000)) for _ in range(60)]
    assert sum(h.size for h in hits) == 0
    assert det.update_many(rng.normal(1, 1, 1000)).size > 0, "a 1-sd shift is still seen"
