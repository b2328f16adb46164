"""Contract every drift detector keeps, run over each one (as river's estimator checks do)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

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
