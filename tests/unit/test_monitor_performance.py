"""Feedback joined to predictions: by id, late, early,
by verdict, deduplicated, bounded by the TTL."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from loopline.services.monitor.performance import PerformanceTracker


def tracker(task: str = "classification", ttl_ms: int = 10_000, **kw: Any) -> PerformanceTracker:
    return PerformanceTracker(task, ["no", "yes"] if task == "classification" else None, window=100,
                              ttl_ms=ttl_ms, detector_names=["ddm", "adwin"], seed=1, **kw)


def pred(i: int, variant: str = "champion", label: str = "yes", value: float = 0.9, ts: int = 1000,
         version: int = 1) -> dict[str, Any]:
    return {"prediction_id": f"p{i}-{variant}", "event_id": f"e{i}", "model_name": "m",
            "model_version": version,
            "variant": variant, "served": variant == "champion", "label": label, "value": value,
            "scored_at": ts}


def fb(n: int, ts: int = 2000, **kw: Any) -> dict[str, Any]:
    base = {"feedback_id": f"f{n}", "prediction_id": None, "event_id": None, "label": None,
            "value": None, "verdict": None, "ts": ts}
    return base | kw


def by_variant(scored: list) -> dict[str, list[float]]:  # type: ignore[type-arg]  # any records
    return {s.variant: s.errors.tolist() for s in scored}


def test_label_by_event_id_scores_champion_and_challenger_side_by_side() -> None:
    t = tracker()
    t.add_predictions([pred(1), pred(1, "challenger", label="no", version=2)], [0, 1])
    scored = t.add_feedback([fb(1, event_id="e1", label="no")], [7])
    assert by_variant(scored) == {"champion": [1.0], "challenger": [0.0]}
    assert {(s.model_version, s.metric) for s in scored} == {(1, 0.0), (2, 1.0)}
    assert t.side_by_side() == {"m:1:champion": 0.0, "m:2:challenger": 1.0}
    assert scored[0].offsets.tolist() == [7]


def test_feedback_arriving_before_its_prediction_is_joined_later() -> None:
    t = tracker()
    assert t.add_feedback([fb(1, prediction_id="p1-champion", label="yes")], [0]) == []
    scored = t.add_predictions([pred(1)], [5])
    assert by_variant(scored) == {"champion": [0.0]}


def test_truth_is_kept_for_predictions_of_the_same_event_that_arrive_late() -> None:
    t = tracker()
    t.add_predictions([pred(1)], [0])
    t.add_feedback([fb(1, event_id="e1", label="yes")], [0])
    assert by_variant(t.add_predictions([pred(1, "shadow", label="no")], [1])) == {"shadow": [1.0]}


@pytest.mark.parametrize(("verdict", "champion_err", "challenger_err"),
                         [("accept", 0.0, 1.0), ("reject", 1.0, 0.0)])
def test_verdicts_imply_a_truth_for_binary_classes(verdict: str, champion_err: float,
                                                   challenger_err: float) -> None:
    t = tracker()
    t.add_predictions([pred(1), pred(1, "challenger", label="no")], [0, 1])
    scored = t.add_feedback([fb(1, prediction_id="p1-champion", verdict=verdict)], [0])
    assert by_variant(scored) == {"champion": [champion_err], "challenger": [challenger_err]}


def test_duplicate_feedback_counts_once() -> None:
    t = tracker()
    t.add_predictions([pred(1), pred(2)], [0, 1])
    t.add_feedback([fb(1, event_id="e1", label="yes")], [0])
    assert t.add_feedback([fb(1, event_id="e1", label="yes")], [1]) == []


def test_predictions_expire_after_the_ttl() -> None:
    t = tracker(ttl_ms=1000)
    t.add_predictions([pred(1, ts=1000)], [0])
    t.add_predictions([pred(2, ts=5000)], [1])
    assert t.expired == 1
    assert t.add_feedback([fb(1, event_id="e1", label="yes", ts=5100)], [0]) == []
    assert by_variant(t.add_feedback([fb(2, event_id="e2", label="yes", ts=5100)],
                                     [1])) == {"champion": [0.0]}


def test_regression_uses_absolute_error_and_mae() -> None:
    t = tracker("regression")
    t.add_predictions([pred(1, value=3.0), pred(2, value=5.0)], [0, 1])
    scored = t.add_feedback([fb(1, event_id="e1", value=4.0), fb(2, event_id="e2", value=1.0)],
                            [0, 1])
    assert by_variant(scored) == {"champion": [1.0, 4.0]}
    assert scored[0].metric == pytest.approx(2.5)
    detectors = t.watches[("m", 1, "champion")].detectors
    assert [d.name for d in detectors] == ["adwin"], "ddm needs 0/1 errors"


def test_a_jump_of_the_error_rate_is_confirmed_soon_after_it() -> None:
    t = tracker(ttl_ms=10**9)
    rng = np.random.default_rng(0)
    n = 3000
    t.add_predictions([pred(i) for i in range(n)], list(range(n)))
    wrong = rng.random(n) < np.where(np.arange(n) < 1500, 0.1, 0.4)
    confirmed = []
    for lo in range(0, n, 100):
        idx = range(lo, lo + 100)
        feedback = [fb(i, event_id=f"e{i}", label="no" if wrong[i] else "yes") for i in idx]
        for s in t.add_feedback(feedback, list(idx)):
            confirmed += [r for r in (s.confirmed, s.windowed) if r is not None and r.degraded]
    assert confirmed, "accuracy fell from 0.9 to 0.6"
    first = confirmed[0]
    assert 1500 <= first.end < 1600 and first.first_offset >= 1400
    assert 0.15 < first.drop < 0.6 and first.test.p_value < 1e-4  # a short segment: rough


def test_a_resent_prediction_is_kept_once_with_its_latest_fields() -> None:
    t = tracker()
    t.add_predictions([pred(1, label="no"), pred(1, label="yes")], [0, 1])
    t.add_predictions([pred(1, label="yes")], [2])
    assert list(t.predictions) == ["p1-champion"] and t.by_event == {"e1": "p1-champion"}
    scored = t.add_feedback([fb(1, event_id="e1", label="yes")], [3])
    assert by_variant(scored) == {"champion": [0.0]}
    assert t.predictions == {} and t.by_event == {}


def test_a_verdict_before_the_predictions_waits_and_then_scores_every_variant() -> None:
    t = tracker()
    assert t.add_feedback([fb(1, event_id="e1", verdict="reject")], [4]) == []
    assert list(t.waiting) == ["e1"]
    scored = t.add_predictions([pred(1, "challenger", label="no"), pred(1, label="yes")], [0, 1])
    # the served champion said "yes" and was rejected: the truth is "no" for both variants
    assert by_variant(scored) == {"champion": [1.0], "challenger": [0.0]}
    assert scored[0].offsets.tolist() == [4] and t.waiting == {}


def test_a_label_for_an_unknown_prediction_id_waits_for_it() -> None:
    t = tracker()
    t.add_feedback([fb(1, prediction_id="p1-shadow", label="no")], [3])
    assert list(t.waiting) == ["p1-shadow"]
    scored = t.add_predictions([pred(1), pred(1, "shadow", label="no")], [0, 1])
    assert by_variant(scored) == {"champion": [1.0], "shadow": [0.0]}
    assert t.truths["e1"][0] == "no"


def test_one_expired_prediction_leaves_the_rest_of_its_event_waiting() -> None:
    t = tracker(ttl_ms=1000)
    t.add_predictions([pred(1, ts=1000), pred(1, "shadow", label="no", ts=2000)], [0, 1])
    assert t.by_event == {"e1": ["p1-champion", "p1-shadow"]}
    t.add_predictions([pred(2, ts=2500)], [2])
    assert t.expired == 1 and t.by_event["e1"] == ["p1-shadow"]
    scored = t.add_feedback([fb(1, event_id="e1", label="yes", ts=2700)], [5])
    assert by_variant(scored) == {"shadow": [1.0]}


def test_regression_accept_takes_the_served_value_as_truth() -> None:
    t = tracker("regression")
    t.add_predictions([pred(1, value=3.0), pred(1, "challenger", value=5.5, version=2)], [0, 1])
    scored = t.add_feedback([fb(1, event_id="e1", verdict="accept")], [2])
    assert by_variant(scored) == {"champion": [0.0], "challenger": [2.5]}
    assert {s.variant: s.metric for s in scored} == {"champion": 0.0, "challenger": 2.5}


def test_feedback_may_leave_out_the_fields_it_does_not_use() -> None:
    t = tracker()
    t.add_predictions([pred(1)], [0])
    bare = {"feedback_id": "f1", "event_id": "e1", "label": "no", "ts": 2000}
    scored = t.add_feedback([bare], [1])
    assert by_variant(scored) == {"champion": [1.0]}


def test_a_restored_tracker_joins_exactly_like_the_original() -> None:
    t = tracker(ttl_ms=5000)
    t.add_predictions([pred(i, ts=1000 + i) for i in range(20)] + [pred(3, "shadow", label="no")],
                      list(range(21)))
    t.add_feedback([fb(100, event_id="e50", verdict="accept"), fb(1, event_id="e2", label="no")],
                   [0, 1])
    copy = pickle.loads(pickle.dumps(t))
    steps = [(True, [pred(50, ts=1100), pred(4, "shadow", label="no", ts=1100)]),
             (False, [fb(i, event_id=f"e{i}", label="yes", ts=1200) for i in range(3, 12)]),
             (False, [fb(3, event_id="e3", label="no", ts=1300)])]
    for predictions, records in steps:
        offsets = list(range(len(records)))
        results = [by_variant(x.add_predictions(records, offsets) if predictions
                              else x.add_feedback(records, offsets)) for x in (t, copy)]
        assert results[0] == results[1]
    assert t.side_by_side() == copy.side_by_side() and t.predictions == copy.predictions


@pytest.mark.parametrize("batch", [1000, 400, 7])
def test_the_baseline_is_the_first_window_of_labels_however_they_are_batched(batch: int) -> None:
    # 100 right answers, then 900 wrong ones: a backlog read in one batch must not make the wrong
    # ones the baseline (then nothing would ever look degraded).
    t = tracker(ttl_ms=10**9)
    n = 1000
    t.add_predictions([pred(i) for i in range(n)], list(range(n)))
    labels = ["yes"] * 100 + ["no"] * (n - 100)
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        t.add_feedback([fb(i, prediction_id=f"p{i}-champion", label=labels[i]) for i in idx],
                       list(idx))
    key = ("m", 1, "champion")
    assert t.baseline[key] == 0.0
    assert t.recent(key) == (0.0, 1.0, n), "accuracy 0 now, 1 over the baseline window"
