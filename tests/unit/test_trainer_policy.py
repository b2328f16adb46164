"""Retrain triggers, live trials and learner reproducibility of the trainer."""

from __future__ import annotations

import pickle
import random
from typing import Any

import pytest
from river import datasets

from loopline.services.trainer.data import Holdout, Ranges
from loopline.services.trainer.join import Example, PredRow
from loopline.services.trainer.learner import Learner, LearnerError
from loopline.services.trainer.policy import RetrainPolicy
from loopline.services.trainer.promotion import Trial
from loopline.spec import Trainer, parse_spec


def alert(signal: str = "performance", state: str = "raised", severity: str = "alert") -> dict[str, Any]:
    return {"alert_id": "a" * 32, "state": state, "signal": signal, "severity": severity, "feature": None,
            "detector": "ddm", "message": "m"}


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
    assert Trainer(holdout=10).retrain.drift_settle_labels is None  # default: 2 x holdout


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
    t.observe(example("yes", [("m", 1, "no", 50), ("m", 2, "yes", 150)]))  # champion's before the start
    assert t.stats == {}
    for i in range(10):
        t.observe(example("yes", [("m", 1, "yes" if i < 5 else "no", 150), ("m", 2, "yes", 150)]))
    assert t.decision(11, 0.1) is None
    assert t.decision(10, 0.1) == "challenger"
    assert t.decision(10, 0.6) == "incumbent"
    assert t.summary()["challenger"] == {"version": "m:2", "n": 10, "score": 1.0}


def test_probation_keeps_the_new_champion_unless_worse_by_margin() -> None:
    t = Trial("probation", ("m", 2), ("m", 1), started_ms=0, paired=True, regression=False)
    for i in range(10):
        t.observe(example("yes", [("m", 2, "yes" if i < 7 else "no", 1), ("m", 1, "yes" if i < 8 else "no", 1)]))
    assert t.decision(10, 0.1) == "challenger"  # 0.7 vs 0.8: within the margin
    assert t.decision(10, 0.05) == "incumbent"


def test_learner_is_reproducible_and_tree_is_seeded() -> None:
    for learner in ("logistic_regression", "hoeffding_adaptive_tree"):
        spec = parse_spec({"name": "s", "features": [{"name": f"x{i}", "type": "float"} for i in range(3)],
                           "label": {"classes": ["false", "true"]}, "trainer": {"learner": learner, "seed": 7}})
        runs = []
        for _ in range(2):
            m = Learner(spec)
            for x, y in datasets.synth.SEA(variant=0, seed=3).take(3000):
                m.learn({f"x{i}": v for i, v in x.items()}, str(y).lower())
            probe = [{f"x{i}": v for i, v in x.items()} for x, _ in datasets.synth.SEA(seed=9).take(200)]
            runs.append(m.predict_proba(probe))
        assert runs[0] == runs[1]


def test_learner_rejects_a_task_it_cannot_learn() -> None:
    spec = parse_spec({"name": "s", "features": [{"name": "x", "type": "float"}], "label": {"task": "regression"},
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
    assert r.records() == [{"topic": "t", "partition": 0, "first_offset": 10, "last_offset": 10, "count": 1},
                           {"topic": "t", "partition": 1, "first_offset": 11, "last_offset": 11, "count": 1}]
    assert h.ranges("t").count == 3 and r.merged(h.ranges("t")).count == 5
