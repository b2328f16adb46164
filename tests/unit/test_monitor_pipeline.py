"""One pipeline's monitor without a broker: drift after a shift, once per episode, restorable."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loopline import avro
from loopline.profile import build_profile
from loopline.registry import RegistryState, spec_event
from loopline.services.monitor.evidence import MIN_SEGMENT
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch, PipelineMonitor, Tuning
from loopline.services.monitor.readers import furthest
from loopline.spec import parse_spec

SPEC = parse_spec(
    {
        "name": "shift",
        "features": [{"name": "amount", "type": "float"}, {"name": "kind", "type": "string"}],
        "label": {"classes": ["no", "yes"], "positive": "yes"},
        "monitor": {"detectors": ["adwin", "page_hinkley"], "window": 500},
    }
)
SHIFT = 3000


def registry_state(profile: dict[str, Any]) -> RegistryState:
    state = RegistryState()
    state.apply(spec_event(SPEC)[1], 0)
    state.apply({"kind": "model_version", "pipeline": SPEC.name, "at": 0, "spec": None,
                 "stage_change": None,
                 "model": {"name": "m", "version": 1, "sha256": "0" * 64, "uri": "u",
                           "stage": "champion", "traffic": 1.0, "created_at": 0,
                           "reference_profile_json": orjson.dumps(profile).decode()}}, 1)
    return state


def feature_batches(seed: int = 0, n: int = 6000) -> list[Batch]:
    rng = np.random.default_rng(seed)
    amount = np.r_[rng.normal(50, 10, SHIFT), rng.normal(65, 10, n - SHIFT)]
    kinds = rng.choice(["a", "b"], n)
    records = [{"features": {"amount": float(a), "kind": str(k)}} for a, k in zip(amount, kinds)]
    return [
        Batch(records[i : i + 250], list(range(i, i + 250)), [0] * 250, "loopline.shift.features")
        for i in range(0, n, 250)
    ]


def monitor() -> PipelineMonitor:
    rng = np.random.default_rng(99)
    profile = build_profile(
        {"amount": rng.normal(50, 10, 5000), "kind": rng.choice(["a", "b"], 5000)},
        {"amount": "float", "kind": "string"},
    )
    pm = PipelineMonitor(SPEC, Tuning())
    pm.refresh(registry_state(profile))
    return pm


def test_a_shift_raises_one_actionable_alert_per_column_soon_after_it() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    alerts = [a for b in feature_batches() for a in pm.on_features(b, metrics, at=1)]
    raised = [a for a in alerts if a["state"] == "raised"]
    assert [(a["feature"], a["detector"], a["severity"]) for a in raised] == [
        ("amount", "psi", "alert")
    ], "one episode; the early warnings of adwin and page_hinkley are no alerts of their own"
    a = raised[0]
    assert SHIFT - 50 <= a["first_offset"] <= SHIFT + 50, "since when: the change point"
    assert a["last_offset"] < SHIFT + 250, "found soon after the shift"
    assert a["model_name"] == "m" and a["model_version"] == 1
    assert a["reference_value"] == pytest.approx(50, abs=1) and a["current_value"] == pytest.approx(
        65, abs=3
    )
    assert (
        a["statistic"] >= 0.25
        and a["threshold"] == 0.25
        and a["p_value"] < 1e-4
        and a["effective_n"] >= MIN_SEGMENT - 2
    )
    assert "training profile of champion m v1" in a["message"] and "mean" in a["message"]
    assert "early warning of" in a["message"] and "No labeled feedback yet" in a["message"]
    assert "loopline monitor rebaseline shift" in a["action"]
    codec = avro.codec("alert")
    assert all(codec.decode(codec.encode(e)) == e for e in alerts)


def test_restored_state_continues_exactly_like_the_original() -> None:
    metrics = MonitorMetrics(CollectorRegistry())
    batches = feature_batches(seed=3)
    pm = monitor()
    for b in batches[:11]:  # before the shift: the alert comes after the copy
        pm.on_features(b, metrics, at=1)
    copy = pickle.loads(pickle.dumps(pm))
    rest = [a["alert_id"] for b in batches[11:] for a in pm.on_features(b, metrics, at=1)]
    assert rest and rest == [
        a["alert_id"] for b in batches[11:] for a in copy.on_features(b, metrics, at=1)
    ]


def test_feedback_performance_and_metrics_side_by_side() -> None:
    pm, registry = monitor(), CollectorRegistry()
    metrics = MonitorMetrics(registry)
    preds = [
        {
            "prediction_id": f"p{i}{v}",
            "event_id": f"e{i}",
            "model_name": "m",
            "model_version": ver,
            "variant": v,
            "served": v == "champion",
            "label": lab,
            "value": 0.5,
            "scores": {},
            "scored_at": 1000 + i,
        }
        for i in range(200)
        for v, ver, lab in (("champion", 1, "yes"), ("challenger", 2, "no"))
    ]
    pm.on_predictions(Batch(preds, list(range(400)), [0] * 400, "t"), metrics, at=1)
    feedback = [
        {
            "feedback_id": f"f{i}",
            "prediction_id": None,
            "event_id": f"e{i}",
            "label": "yes",
            "value": None,
            "verdict": None,
            "ts": 5000 + i,
        }
        for i in range(200)
    ]
    pm.on_feedback(Batch(feedback, list(range(200)), [0] * 200, "t"), metrics, at=1)
    text = generate_latest(registry).decode()
    assert (
        'loopline_monitor_model_metric{metric="accuracy",model="m",pipeline="shift",variant="champion",'
        'version="1"} 1.0' in text
    )
    assert 'variant="challenger",version="2"} 0.0' in text


def test_zombie_is_reported_once_and_resolved_by_traffic() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    limit = SPEC.monitor.zombie_after_s
    assert pm.check_zombies(limit / 2, 0.0, metrics) == []
    raised = pm.check_zombies(limit + 10, 0.0, metrics)
    assert [a["state"] for a in raised] == ["raised"] and "served no predictions" in raised[0][
        "message"
    ]
    assert pm.check_zombies(limit + 20, 0.0, metrics) == []
    pm.zombies.traffic("m", 1, limit + 25)
    assert [a["state"] for a in pm.check_zombies(limit + 30, 0.0, metrics)] == ["resolved"]


def predictions(offsets: range, partition: int) -> Batch:
    records = [
        {
            "prediction_id": f"p{partition}-{o}",
            "event_id": f"e{o}",
            "model_name": "m",
            "model_version": 1,
            "variant": "champion",
            "served": True,
            "label": "yes",
            "value": 0.9,
            "scores": {},
            "event_ts": o,
            "scored_at": o,
            "key": None,
        }
        for o in offsets
    ]
    return Batch(records, list(offsets), [partition] * len(offsets), "loopline.shift.predictions")


def test_predictions_nobody_reads_make_a_zombie_until_a_reader_commits_past_them() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    limit = SPEC.monitor.zombie_after_s

    def unread(now: float) -> list[dict[str, Any]]:
        return [a for a in pm.check_zombies(now, 0.0, metrics) if a["detector"] == "unread"]

    pm.on_predictions(predictions(range(5), 0), metrics, 1, now_s=100.0)
    pm.on_predictions(predictions(range(5), 1), metrics, 1, now_s=100.0)
    assert unread(100 + limit + 1) == [], "readers never checked (no admin API): no verdict"
    pm.readers({})  # checked: no group reads them
    pm.on_predictions(
        predictions(range(5, 10), 0), metrics, 1, now_s=100 + limit - 1
    )  # traffic goes on
    raised = unread(100 + limit + 1)
    assert [a["state"] for a in raised] == ["raised"], raised
    assert (
        "nobody has read its predictions" in raised[0]["message"]
        and raised[0]["model_version"] == 1
    )
    assert unread(100 + limit + 2) == [], "once per episode"
    pm.readers({0: 5, 1: 5})  # partition 1 read to the end; partition 0 only partway
    assert pm.zombies.check(100 + limit + 3, 0.0)[0].unread_s == 4.0, (
        "partition 0's unread part is younger"
    )
    assert [a["state"] for a in unread(100 + limit + 3)] == ["resolved"]
    pm.readers({0: 10})
    assert pm.zombies.check(100 + 10 * limit, 0.0)[0].unread_s == 0.0
    assert [a["state"] for a in unread(100 + 10 * limit)] == [], "nothing left unread, only idle"


def test_readers_are_groups_outside_loopline_or_the_named_ones() -> None:
    committed = {
        "billing": {"t": {0: 7, 1: 3}},
        "loopline-lineage": {"t": {0: 9, 1: 9}},
        "audit": {"t": {1: 5}, "other": {0: 99}},
    }
    assert furthest(committed, "t", []) == {0: 7, 1: 5}
    assert furthest(committed, "t", ["audit"]) == {1: 5}
    assert furthest(committed, "t", ["nobody"]) == {}


def test_near_perfect_model_raises_no_performance_alert_until_it_really_degrades() -> None:
    # With 0.5 % errors DDM alarms on a couple of errors in a row; the alert waits for a real drop.
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    rng = np.random.default_rng(3)
    n, drop_at = 6000, 4000
    wrong = np.r_[rng.random(drop_at) < 0.005, rng.random(n - drop_at) < 0.12]
    preds = [
        {
            "prediction_id": f"p{i}",
            "event_id": f"e{i}",
            "model_name": "m",
            "model_version": 1,
            "variant": "champion",
            "served": True,
            "label": "yes",
            "value": 0.9,
            "scores": {},
            "event_ts": i,
            "scored_at": i,
            "key": None,
        }
        for i in range(n)
    ]
    alerts = []
    for start in range(0, n, 100):
        idx = range(start, start + 100)
        pm.on_predictions(
            Batch([preds[i] for i in idx], list(idx), [0] * 100, "loopline.shift.predictions"),
            metrics,
            1,
            0.0,
        )
        fb = [
            {
                "feedback_id": f"f{i}",
                "prediction_id": f"p{i}",
                "event_id": None,
                "label": "no" if wrong[i] else "yes",
                "value": None,
                "verdict": None,
                "ts": i,
            }
            for i in idx
        ]
        alerts += pm.on_feedback(
            Batch(fb, list(idx), [0] * 100, "loopline.shift.feedback"), metrics, 1
        )
    perf = [a for a in alerts if a["signal"] == "performance" and a["state"] == "raised"]
    assert perf, "no alert after accuracy fell from 0.995 to 0.88"
    assert all(a["first_offset"] >= drop_at for a in perf), [a["message"] for a in perf]
    assert perf[0]["first_offset"] < drop_at + 300, "the alert came long after the drop"
    assert "degraded" in perf[0]["message"] and "in its baseline window" in perf[0]["message"]
    assert perf[0]["performance_metric"] == "accuracy" and perf[0]["labeled"] > drop_at
    assert "loopline models rollback shift" in perf[0]["action"]


def test_interleaved_versions_feed_their_own_outputs_and_traffic_spans() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    records, offsets, partitions = [], [], []
    for i in range(12):
        version = 1 if i % 3 else 2
        # Neither version has output profiles, so each watches "value": a score of a class named
        # "value" when there is one, else the value; scores may also be empty or null.
        scores = {"value": 10.0 + i} if version == 2 and i % 2 else ({} if i != 4 else None)
        variant = "champion" if version == 1 else "shadow"
        records.append(
            {
                "prediction_id": f"p{i}",
                "event_id": f"e{i}",
                "model_name": "m",
                "model_version": version,
                "variant": variant,
                "served": version == 1,
                "label": "yes" if i % 2 else "no",
                "value": float(i),
                "scores": scores,
                "scored_at": i,
            }
        )
        offsets.append(100 + i)
        partitions.append(i % 2)
    batch = Batch(records, offsets, partitions, "loopline.shift.predictions")
    pm.on_predictions(batch, metrics, 1, now_s=50.0)
    assert list(pm.outputs) == [("m", 2), ("m", 1)]
    # Without output profiles, each version's values warm up into a reference of their own.
    recent = {key: watches["value"].warmup for key, watches in pm.outputs.items()}
    assert recent == {
        ("m", 2): [0.0, 13.0, 6.0, 19.0],
        ("m", 1): [1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 11.0],
    }
    assert pm.zombies.oldest_unread[("m", 1)] == {1: (101, 50.0), 0: (102, 50.0)}
    assert pm.zombies.newest[("m", 1)] == {1: (111, 50.0), 0: (110, 50.0)}
    assert pm.zombies.oldest_unread[("m", 2)] == {0: (100, 50.0), 1: (103, 50.0)}
    assert pm.zombies.newest[("m", 2)] == {0: (106, 50.0), 1: (109, 50.0)}


def test_serving_stalled_while_features_arrive_and_no_prediction_comes() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    limit = SPEC.monitor.stalled_after_s
    batches = feature_batches()
    pm.on_features(batches[0], metrics, at=1_000_000)  # t = 1000 s
    pm.on_predictions(predictions(range(0, 250), 0), metrics, at=1_000_000, now_s=1000.0)
    assert pm.check_stalled(1000.0 + limit / 2, 0.0, metrics) == []
    # features go on, nothing served
    pm.on_features(batches[1], metrics, at=int((1000 + limit) * 1000))
    raised = pm.check_stalled(1000.0 + limit + 5, 0.0, metrics)
    assert [(a["state"], a["signal"]) for a in raised] == [("raised", "stalled")]
    assert "no prediction came" in raised[0]["message"] and raised[0]["statistic"] > limit
    assert pm.check_stalled(1000.0 + limit + 6, 0.0, metrics) == []  # once per episode
    pm.on_predictions(predictions(range(250, 500), 0), metrics, at=0, now_s=1000.0 + limit + 7)
    assert [a["state"] for a in pm.check_stalled(1000.0 + limit + 8, 0.0, metrics)] == ["resolved"]


def test_a_quiet_pipeline_is_not_stalled() -> None:
    pm, metrics = monitor(), MonitorMetrics(CollectorRegistry())
    pm.on_features(feature_batches()[0], metrics, at=1_000_000)
    pm.on_predictions(predictions(range(0, 250), 0), metrics, at=1_000_000, now_s=1000.0)
    # Neither features nor predictions for a long time: nothing to serve, nothing stalled.
    assert pm.check_stalled(1000.0 + 10 * SPEC.monitor.stalled_after_s, 0.0, metrics) == []


def test_keys_and_id_like_features_are_not_drift_tested() -> None:
    spec = parse_spec({"name": "ids", "key": "customer",
                       "features": [{"name": "customer", "type": "string"},
                                    {"name": "device", "type": "string"},
                                    {"name": "country", "type": "string"},
                                    {"name": "amount", "type": "float"}]})
    rng = np.random.default_rng(1)
    profile = build_profile({"customer": [f"c{i}" for i in range(500)],
                             "device": [f"d{i}" for i in rng.integers(0, 10**6, 500)],
                             "country": rng.choice(["DE", "FR"], 500).tolist(),
                             "amount": rng.normal(0, 1, 500)},
                            {"customer": "string", "device": "string", "country": "string",
                             "amount": "float"})
    state = RegistryState()
    state.apply(spec_event(spec)[1], 0)
    state.apply({"kind": "model_version", "pipeline": spec.name, "at": 0, "spec": None,
                 "stage_change": None,
                 "model": {"name": "m", "version": 1, "sha256": "0" * 64, "uri": "u",
                           "stage": "champion", "traffic": 1.0, "created_at": 0,
                           "reference_profile_json": orjson.dumps(profile).decode()}}, 1)
    pm = PipelineMonitor(spec, Tuning())
    pm.refresh(state)
    assert set(pm.features) == {"country", "amount"}
    assert pm.not_drift_tested == ["customer", "device"]
    pm.refresh(state)  # a refresh with the same spec keeps the watches (no rebuild loop)
    assert set(pm.features) == {"country", "amount"}
