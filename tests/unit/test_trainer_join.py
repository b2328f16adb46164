"""The trainer's feedback join: late labels, verdicts, duplicates, orphans, TTL bounds."""

from __future__ import annotations

import pickle
from typing import Any

from loopline.services.trainer.join import FeedbackJoin

TTL = 10_000


def join() -> FeedbackJoin:
    return FeedbackJoin("classification", ["no", "yes"], TTL)


def event(i: int, ts: int = 0) -> dict[str, Any]:
    return {"event_id": f"e{i}", "ts": ts, "features": {"x": float(i)}}


def pred(i: int, variant: str = "champion", served: bool = True, label: str = "yes",
         version: int = 1) -> dict[str, Any]:
    return {"prediction_id": f"p{i}-{variant}", "event_id": f"e{i}", "model_name": "m",
            "model_version": version,
            "variant": variant, "served": served, "label": label, "value": 0.7, "scored_at": 5}


def fb(fid: str, **kw: Any) -> dict[str, Any]:
    return {"feedback_id": fid, "prediction_id": None, "event_id": None, "label": None,
            "value": None, "verdict": None, "ts": 0, **kw}


def test_label_by_prediction_id_joins_features_and_every_variant() -> None:
    j = join()
    j.add_event(event(1), partition=2, offset=40, seen=0)
    j.add_prediction(pred(1), seen=0)
    j.add_prediction(pred(1, "shadow", served=False, label="no", version=2), seen=0)
    [ex] = j.add_feedback(fb("f1", prediction_id="p1-champion", label="no"), seen=0)
    assert (ex.event_id, ex.target, ex.partition, ex.offset, ex.features) == ("e1", "no", 2, 40,
                                                                              {"x": 1.0})
    assert sorted((p.variant, p.label) for p in ex.predictions) == [("champion", "yes"),
                                                                    ("shadow", "no")]
    assert j.counts.joined == 1 and "e1" not in j.events


def test_feedback_before_its_prediction_and_features_waits_then_joins() -> None:
    j = join()
    assert j.add_feedback(fb("f1", prediction_id="p1-champion", label="yes"), seen=0) == []
    assert list(j.pending) == ["f1"]
    assert j.add_prediction(pred(1), seen=1) == []  # now it waits for the features
    [ex] = j.add_event(event(1), 0, 7, seen=2)
    assert ex.target == "yes" and ex.offset == 7


def test_label_by_event_id_needs_no_prediction() -> None:
    j = join()
    j.add_event(event(3), 0, 1, seen=0)
    [ex] = j.add_feedback(fb("f", event_id="e3", label="yes"), seen=0)
    assert ex.target == "yes" and ex.predictions == []


def test_duplicate_feedback_counts_once_and_a_second_label_is_not_learned() -> None:
    j = join()
    j.add_event(event(1), 0, 1, seen=0)
    assert len(j.add_feedback(fb("f1", event_id="e1", label="yes"), seen=0)) == 1
    assert j.add_feedback(fb("f1", event_id="e1", label="yes"), seen=0) == []
    assert j.add_feedback(fb("f2", event_id="e1", label="no"), seen=0) == []
    assert (j.counts.joined, j.counts.duplicates, j.counts.relabels) == (1, 1, 1)
    # A re-delivered feature event of a labeled event does not reopen it.
    j.add_event(event(1), 0, 1, seen=0)
    assert "e1" not in j.events


def test_verdicts_become_labels_from_the_served_prediction() -> None:
    j = join()
    for i in (1, 2):
        j.add_event(event(i), 0, i, seen=0)
        j.add_prediction(pred(i, label="yes"), seen=0)
        j.add_prediction(pred(i, "shadow", served=False, label="no", version=2), seen=0)
    [a] = j.add_feedback(fb("a", event_id="e1", verdict="accept"), seen=0)
    [r] = j.add_feedback(fb("r", prediction_id="p2-champion", verdict="reject"), seen=0)
    assert (a.target, a.verdict, r.target, r.verdict) == ("yes", "accept", "no", "reject")


def test_unusable_feedback_counts_for_rules_but_has_no_target() -> None:
    j = FeedbackJoin("classification", ["a", "b", "c"], TTL)
    j.add_event(event(1), 0, 1, seen=0)
    j.add_prediction(pred(1, label="a"), seen=0)
    # which class is right? unknown
    [ex] = j.add_feedback(fb("r", event_id="e1", verdict="reject"), seen=0)
    assert ex.target is None and ex.verdict == "reject" and j.counts.unusable == 1
    assert j.add_feedback(fb("bad", event_id="e1", label="zzz"), seen=0)[0].target is None


def test_unknown_prediction_waits_until_ttl_then_is_an_orphan() -> None:
    j = join()
    j.add_feedback(fb("f1", prediction_id="nope", label="yes"), seen=1000)
    j.advance(1000 + TTL)
    assert j.counts.orphans == 0 and len(j.pending) == 1
    j.advance(1001 + TTL)
    assert j.counts.orphans == 1 and not j.pending
    # A prediction arriving after the TTL no longer finds it.
    j.add_event(event(9), 0, 1, seen=20_000)
    assert j.add_prediction({**pred(9), "prediction_id": "nope"}, seen=20_000) == []


def test_late_label_within_ttl_joins_and_after_ttl_is_an_orphan() -> None:
    j = join()
    j.add_event(event(1), 0, 1, seen=0)
    j.add_event(event(2), 0, 2, seen=5000)
    j.advance(TTL + 1)  # e1 expired, e2 not
    assert j.counts.expired_events == 1
    assert len(j.add_feedback(fb("f2", event_id="e2", label="no"), seen=TTL + 1)) == 1
    assert j.add_feedback(fb("f1", event_id="e1", label="no"), seen=TTL + 1) == []
    j.advance(3 * TTL)
    assert j.counts.orphans == 1


def test_state_is_bounded_by_max_entries() -> None:
    j = FeedbackJoin("classification", ["no", "yes"], TTL, max_entries=100)
    for i in range(1000):
        j.add_event(event(i), 0, i, seen=0)
        j.add_prediction(pred(i), seen=0)
        j.add_feedback(fb(f"f{i}", prediction_id=f"missing{i}", label="yes"), seen=0)
        j.advance(0)
    assert len(j.events) <= 100 and len(j.preds) <= 100 and len(j.pending) <= 100
    assert len(j.seen_feedback) <= 100 and len(j.event_preds) <= 101


def test_clock_never_moves_back_and_join_pickles() -> None:
    j = join()
    j.advance(500)
    j.advance(100)
    assert j.clock == 500
    j.add_event(event(1), 0, 1, seen=500)
    j.add_feedback(fb("w", prediction_id="later", label="yes"), seen=500)
    k = pickle.loads(pickle.dumps(j))
    k.add_prediction({**pred(1), "prediction_id": "later"}, seen=600)
    assert k.counts.joined == 1


def test_regression_targets() -> None:
    j = FeedbackJoin("regression", [], TTL)
    j.add_event(event(1), 0, 1, seen=0)
    j.add_prediction({**pred(1), "label": None, "value": 4.5}, seen=0)
    j.add_event(event(2), 0, 2, seen=0)
    [a] = j.add_feedback(fb("a", event_id="e1", verdict="accept"), seen=0)
    [b] = j.add_feedback(fb("b", event_id="e2", value=2.0), seen=0)
    assert (a.target, b.target) == (4.5, 2.0)
