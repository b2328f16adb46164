"""Retrain triggers, live trials and learner reproducibility of the trainer."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from river import datasets

from loopline.services.trainer.data import Holdout, Ranges
from loopline.services.trainer.join import Example, PredRow
from loopline.services.trainer.learner import Learner, LearnerError
from loopline.services.trainer.policy import RetrainPolicy
from loopline.services.trainer.promotion import Trial
from loopline.spec import Trainer, parse_spec


def alert(signal: str = "performance", state: str = "raised",
          severity: str = "alert") -> dict[str, Any]:
    return {"alert_id": "a" * 32, "state": state, "signal": signal, "severity": severity,
            "feature": None, "detector": "ddm", "message": "m"}


def test_every_n_labels_and_reset() -> None:
    cfg = Trainer(retrain={"on_drift": False, "every_n_labels": 3})
    p = RetrainPolicy(last_version_ms=1)
    for _ in range(2):
        p.on_example(None, labeled=True)
    assert p.due(cfg, 10) is None
    p.on_example(None, labeled=True)
    assert p.due(cfg, 10) == "every_n_labels(3)"
    p.reset(20)
    assert p.due(cfg, 30) is None and p.last_version_ms == 20


def test_business_rule_needs_both_accepts_and_rejects() -> None:
    cfg = Trainer(retrain={"on_drift": False, "min_accepts": 2, "min_rejects": 1})
    p = RetrainPolicy(last_version_ms=1)
    p.on_example("accept", True)
    p.on_example("accept", True)
    assert p.due(cfg, 5) is None
    p.on_example("reject", False)  # a verdict without a learnable label still counts
    assert p.due(cfg, 5) == "verdicts(accepts>=2,rejects>=1)"


def test_drift_alert_arms_then_fires_after_settle_labels() -> None:
    cfg = Trainer(holdout=10, retrain={"drift_settle_labels": 5})
    p = RetrainPolicy(last_version_ms=1)
    assert not p.on_alert(alert(state="resolved"))
    assert not p.on_alert(alert(severity="warning"))
    assert not p.on_alert(alert(signal="zombie"))
    assert p.on_alert(alert())
    assert not p.on_alert(alert("drift"))  # already armed: one candidate per episode
    for _ in range(4):
        p.on_example(None, True)
    assert p.due(cfg, 5) is None
    p.on_example(None, True)
    assert (p.due(cfg, 5) or "").startswith("drift_alert(performance:ddm:")
    assert Trainer(holdout=10).retrain.drift_settle_labels is None
    assert RetrainPolicy().settle(Trainer()) == 150  # default: 3 x min_holdout
    assert RetrainPolicy().settle(Trainer(holdout=20)) == 60  # min_holdout never exceeds holdout


def armed(cfg: Trainer, labels: int) -> RetrainPolicy:
    p = RetrainPolicy(last_version_ms=1)
    assert p.on_alert(alert())
    for _ in range(labels):
        p.on_example(None, True)
    return p


def test_rejected_drift_candidate_is_retried_with_twice_the_labels_and_fresh_ones() -> None:
    cfg = Trainer(retrain={"drift_settle_labels": 10, "drift_retries": 2})
    p = armed(cfg, 10)
    trigger = p.due(cfg, 5) or ""
    p.after_version(cfg, 6, trigger, accepted=False)
    assert p.drift_alert is not None and p.retries == 1 and p.due(cfg, 7) is None
    for _ in range(9):
        p.on_example(None, True)
    assert p.due(cfg, 7) is None  # 19 labels since the alert: the retry waits for 20
    p.on_example(None, True)
    assert (p.due(cfg, 7) or "").endswith(",retry1)")
    p.after_version(cfg, 8, p.due(cfg, 7) or "", accepted=False)
    p.labels_since_drift = 1000  # a long pause: the count since the alert is far past 40 ...
    assert p.due(cfg, 9) is None  # ... but the retry also needs 10 labels since the last candidate
    for _ in range(10):
        p.on_example(None, True)
    assert (p.due(cfg, 9) or "").endswith(",retry2)")
    p.after_version(cfg, 10, "drift_alert(x,retry2)", accepted=False)
    assert p.drift_alert is None and p.retries == 0  # drift_retries used up: the episode is over


def test_a_lost_live_trial_reopens_its_drift_episode_and_a_won_one_closes_it() -> None:
    cfg = Trainer(retrain={"drift_settle_labels": 10})
    for won, reopened in ((False, True), (True, False)):
        p = armed(cfg, 10)
        p.after_version(cfg, 6, p.due(cfg, 5) or "", accepted=True)
        assert p.drift_alert is None and p.episode is not None
        for _ in range(25):  # the trial's labels
            p.on_example(None, True)
        p.after_trial(cfg, won=won)
        assert (p.drift_alert is not None) == reopened and p.episode is None
        if reopened:
            # The trial's 25 labels count as waited for: the retry is due at once.
            assert p.retries == 1 and (p.due(cfg, 7) or "").endswith(",retry1)")


def test_a_deferred_policy_fires_once_the_missing_labels_arrived() -> None:
    cfg = Trainer(retrain={"on_drift": False, "every_n_labels": 5})
    p = RetrainPolicy(last_version_ms=1)
    for _ in range(5):
        p.on_example(None, True)
    assert p.due(cfg, 2) == "every_n_labels(5)"
    p.defer(3)
    p.on_example(None, True)
    p.on_example(None, False)  # unlabeled feedback brings no new concept data
    assert p.due(cfg, 2) is None
    p.on_example(None, True)
    p.on_example(None, True)
    assert p.due(cfg, 2) == "every_n_labels(5)"


def test_schedule_needs_new_labels() -> None:
    cfg = Trainer(retrain={"on_drift": False, "schedule_s": 1.0})
    p = RetrainPolicy(last_version_ms=1000)
    assert p.due(cfg, 5000) is None
    p.on_example(None, True)
    assert p.due(cfg, 1999) is None
    assert p.due(cfg, 2000) == "schedule(1s)"


def example(target: str, preds: list[tuple[str, int, str, int]]) -> Example:
    rows = [PredRow("e", n, v, "x", True, lab, None, at, 0) for n, v, lab, at in preds]
    return Example("e", {}, target, 0, 0, 0, None, rows)


def test_trial_decides_on_paired_labels_after_min_samples() -> None:
    t = Trial("trial", ("m", 2), ("m", 1), started_ms=100, paired=True, regression=False)
    t.observe(example("yes", [("m", 1, "no", 150)]))  # unpaired: ignored
    # champion's before the start
    t.observe(example("yes", [("m", 1, "no", 50), ("m", 2, "yes", 150)]))
    assert t.stats == {}
    for i in range(10):
        t.observe(example("yes", [("m", 1, "yes" if i < 5 else "no", 150), ("m", 2, "yes", 150)]))
    assert t.decision(11, 0.1) is None
    assert t.decision(10, 0.1) == "challenger"
    assert t.decision(10, 0.6) == "incumbent"
    assert t.summary()["challenger"] == {"version": "m:2", "n": 10, "score": 1.0}


def test_a_clear_paired_win_is_decided_early_but_not_before_the_floor() -> None:
    t = Trial("trial", ("m", 2), ("m", 1), started_ms=0, paired=True, regression=False)
    for i in range(29):  # the challenger is right every time, the champion every other time
        t.observe(example("yes", [("m", 1, "yes" if i % 2 else "no", 1), ("m", 2, "yes", 1)]))
    assert t.decision(200, 0.01, 0.01) is None  # 29 labels: below the floor of 30
    t.observe(example("yes", [("m", 1, "no", 1), ("m", 2, "yes", 1)]))
    assert t.pairs == [30, 16, 0]
    assert t.decision(200, 0.01, 0.01) == "challenger"  # 16 wins, no loss: p = 2e-5
    assert t.decision(200, 0.01, 0.0) is None  # early decisions off: wait for 200
    assert t.decision(200, 0.6, 0.01) is None  # significant, but not by the margin


def test_a_clearly_worse_challenger_is_rejected_early_and_probation_rolls_back_early() -> None:
    for phase in ("trial", "probation"):
        t = Trial(phase, ("m", 2), ("m", 1), started_ms=0, paired=True, regression=False)
        for i in range(40):
            t.observe(example("yes", [("m", 1, "yes", 1), ("m", 2, "no" if i % 3 else "yes", 1)]))
        assert t.decision(200, 0.01, 0.01) == "incumbent"


def test_unpaired_canary_uses_a_two_sample_test() -> None:
    t = Trial("trial", ("m", 2), ("m", 1), started_ms=0, paired=False, regression=True)
    for _ in range(60):
        t.observe(example("0", [("m", 1, None, 1)]))  # every version scores its own events
        t.observe(example("0", [("m", 2, None, 1)]))
    # MAE 1.0 vs 0.1, with a small spread
    t.stats = {("m", 1): [60, -60.0, 60.0], ("m", 2): [60, -6.0, 0.6]}
    assert t.pairs is None and t.decision(200, 0.01, 0.01) == "challenger"
    t.stats[("m", 2)] = [60, -57.0, 60.0]  # MAE 0.95, as noisy as the champion: not yet
    assert t.decision(200, 0.01, 0.01) is None


def test_probation_keeps_the_new_champion_unless_worse_by_margin() -> None:
    t = Trial("probation", ("m", 2), ("m", 1), started_ms=0, paired=True, regression=False)
    for i in range(10):
        t.observe(example("yes", [("m", 2, "yes" if i < 7 else "no", 1),
                                  ("m", 1, "yes" if i < 8 else "no", 1)]))
    assert t.decision(10, 0.1) == "challenger"  # 0.7 vs 0.8: within the margin
    assert t.decision(10, 0.05) == "incumbent"


def test_learner_is_reproducible_and_tree_is_seeded() -> None:
    for learner in ("logistic_regression", "hoeffding_adaptive_tree"):
        spec = parse_spec({"name": "s",
                           "features": [{"name": f"x{i}", "type": "float"} for i in range(3)],
                           "label": {"classes": ["false", "true"]},
                           "trainer": {"learner": learner, "seed": 7}})
        runs = []
        for _ in range(2):
            m = Learner(spec)
            for x, y in datasets.synth.SEA(variant=0, seed=3).take(3000):
                m.learn({f"x{i}": v for i, v in x.items()}, str(y).lower())
            probe = [{f"x{i}": v for i, v in x.items()}
                     for x, _ in datasets.synth.SEA(seed=9).take(200)]
            runs.append(m.predict_proba(probe))
        assert runs[0] == runs[1]


def test_learner_rejects_a_task_it_cannot_learn() -> None:
    spec = parse_spec({"name": "s", "features": [{"name": "x", "type": "float"}],
                       "label": {"task": "regression"},
                       "trainer": {"learner": "logistic_regression"}})
    with pytest.raises(LearnerError, match="learner_fits_task"):
        Learner(spec)


def test_holdout_lags_the_learner_and_ranges_count_examples() -> None:
    h = Holdout(3)
    r = Ranges("t")
    out = [h.push(Example(f"e{i}", {}, "y", i % 2, 10 + i, 1000 + i, None, [])) for i in range(5)]
    assert [o.event_id if o else None for o in out] == [None, None, None, "e0", "e1"]
    for o in out:
        if o:
            r.add(o.partition, o.offset, o.ts)
    assert r.records() == [{"topic": "t", "partition": 0, "first_offset": 10, "last_offset": 10,
                            "count": 1},
                           {"topic": "t", "partition": 1, "first_offset": 11, "last_offset": 11,
                            "count": 1}]
    assert h.ranges("t").count == 3 and r.merged(h.ranges("t")).count == 5


def test_window_keeps_the_newest_labels_without_their_predictions() -> None:
    h = Holdout(3)
    pred = [PredRow("e", "m", 1, "champion", True, "y", None, 0, 0)]
    for i in range(10):
        h.push(Example(f"e{i}", {"x": i}, "y", 0, i, i, None, pred), keep=6)
    assert [e.event_id for e in h.window()] == [f"e{i}" for i in range(4, 10)]
    assert [e.event_id for e in h.window(2)] == ["e8", "e9"] and h.labeled == 6
    assert all(e.predictions == [] for e in h.past) and all(e.predictions for e in h.items)
    restored = pickle.loads(pickle.dumps(h))
    assert restored.window() == h.window()


def test_a_holdout_checkpointed_before_the_window_existed_restores_empty() -> None:
    h = Holdout(2)
    h.push(Example("e0", {}, "y", 0, 0, 0, None, []))
    state = dict(h.__dict__)
    del state["past"]  # what a checkpoint written by the previous release holds
    old = Holdout.__new__(Holdout)
    old.__setstate__(state)
    assert old.labeled == 1 and old.push(Example("e1", {}, "y", 0, 1, 1, None, []), keep=5) is None


def test_business_rules_count_one_verdict_per_event_the_latest() -> None:
    p = RetrainPolicy()
    cfg = Trainer(retrain={"on_drift": False, "min_rejects": 20})
    repeats = [p.on_example("reject", False, "e1") for _ in range(300)]  # a flood on one prediction
    assert repeats.count(True) == 299 and (p.accepts, p.rejects) == (0, 1)
    assert p.due(cfg, 0) is None
    assert p.on_example("accept", False, "e1") is True  # a change of mind moves the count
    assert (p.accepts, p.rejects) == (1, 0)
    for i in range(2, 22):
        p.on_example("reject", False, f"e{i}")
    assert p.rejects == 20 and p.due(cfg, 0) is not None
    p.reset(1)
    assert (p.accepts, p.rejects, p.verdicts) == (0, 0, {})
