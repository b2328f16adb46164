"""Drift episodes end: when the data looks like the reference again, or the reference is renewed."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from loopline import avro
from loopline.profile import build_profile
from loopline.registry import RegistryState, rebaseline_event, spec_event
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch, PipelineMonitor, Tuning
from loopline.spec import parse_spec

SPEC = parse_spec(
    {
        "name": "life",
        "features": [{"name": "x", "type": "float"}, {"name": "k", "type": "string"}],
        "label": {"classes": ["no", "yes"], "positive": "yes"},
        "monitor": {"window": 500},
    }
)
METRICS = MonitorMetrics(CollectorRegistry())


def version(state: RegistryState, v: int, stage: str, mean: float, offset: int) -> None:
    rng = np.random.default_rng(v)
    profile = build_profile(
        {"x": rng.normal(mean, 1, 3000), "k": rng.choice(["a", "b"], 3000)},
        {"x": "float", "k": "string"},
        {"score": rng.uniform(0, 1, 3000)},
    )
    state.apply(
        {
            "kind": "model_version",
            "pipeline": SPEC.name,
            "at": offset,
            "spec": None,
            "stage_change": None,
            "model": {
                "name": "m",
                "version": v,
                "sha256": "0" * 64,
                "uri": "u",
                "stage": stage,
                "traffic": 1.0,
                "created_at": offset,
                "reference_profile_json": orjson.dumps(profile).decode(),
            },
        },
        offset,
    )


def started() -> tuple[PipelineMonitor, RegistryState]:
    state = RegistryState()
    state.apply(spec_event(SPEC)[1], 0)
    version(state, 1, "champion", 0.0, 1)
    pm = PipelineMonitor(SPEC, Tuning())
    pm.refresh(state)
    return pm, state


class Feed:
    """Feature events (and champion predictions) with running offsets."""

    def __init__(self, pm: PipelineMonitor, seed: int = 0) -> None:
        self.pm, self.rng, self.offset = pm, np.random.default_rng(seed), 0

    def features(self, n: int, mean: float, batch: int = 100) -> list[dict[str, Any]]:
        out = []
        for _ in range(0, n, batch):
            idx = list(range(self.offset, self.offset + batch))
            self.offset += batch
            x, k = self.rng.normal(mean, 1, batch), self.rng.choice(["a", "b"], batch)
            records = [{"features": {"x": float(a), "k": str(b)}} for a, b in zip(x, k)]
            out += self.pm.on_features(
                Batch(records, idx, [0] * batch, "loopline.life.features"), METRICS, 1
            )
        return out

    def predictions(self, n: int, v: int, shift: float) -> list[dict[str, Any]]:
        idx = list(range(self.offset, self.offset + n))
        self.offset += n
        scores = self.rng.uniform(0, 1, n) + shift
        records = [
            {
                "prediction_id": f"p{i}",
                "event_id": f"e{i}",
                "model_name": "m",
                "model_version": v,
                "variant": "champion",
                "served": True,
                "label": "yes",
                "value": float(s),
                "scores": {},
                "scored_at": i,
            }
            for i, s in zip(idx, scores)
        ]
        return self.pm.on_predictions(
            Batch(records, idx, [0] * n, "loopline.life.predictions"), METRICS, 1, 1.0
        )


def states(alerts: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None]]:
    return [(a["state"], a["feature"], a["resolution"]) for a in alerts]


def test_an_episode_resolves_once_the_data_is_back_in_line() -> None:
    pm, _ = started()
    feed = Feed(pm)
    assert feed.features(2000, 0.0) == []
    raised = feed.features(500, 2.0)
    assert states(raised) == [("raised", "x", None)]
    back = feed.features(3000, 0.0)
    assert states(back) == [("resolved", "x", "cleared")], (
        "one resolve, once clear for resolve_after events"
    )
    assert "back in line" in back[0]["message"] and back[0]["severity"] == "alert"
    assert back[0]["first_offset"] == raised[0]["first_offset"], "the same episode"


def test_a_rebaseline_resolves_open_drift_and_takes_recent_traffic_as_the_reference() -> None:
    pm, state = started()
    feed = Feed(pm)
    feed.features(2000, 0.0)
    assert states(feed.features(1000, 3.0)) == [("raised", "x", None)]
    key, event = rebaseline_event(SPEC.name, reason="new sensor, expected")
    codec = avro.codec("registry")
    state.apply(
        codec.decode(codec.encode(event)), 5
    )  # as the monitor reads it from loopline.models
    assert key.startswith(b"pipeline/life/rebaseline/")
    pm.refresh(state)
    pm.refresh(state)  # a rebaseline is applied once
    closed = pm.tick(0.0, 0.0, METRICS)
    assert states(closed) == [("resolved", "x", "rebaseline")]
    assert "new sensor, expected" in closed[0]["message"]
    assert pm.tick(0.0, 0.0, METRICS) == [], "the outbox is emptied"
    watch = pm.features["x"]
    assert watch.reference is not None and abs(watch.reference["mean"] - 3.0) < 0.2
    assert "before `loopline monitor rebaseline`" in watch.reference_note
    assert feed.features(2000, 3.0) == [], "the new normal raises nothing"
    assert states(feed.features(1000, 0.0)) == [("raised", "x", None)], "a move away from it does"


def test_a_rebaseline_issued_before_the_monitor_had_data_is_not_applied() -> None:
    _, state = started()
    state.apply(rebaseline_event(SPEC.name)[1], 5)
    fresh = PipelineMonitor(SPEC, Tuning())
    fresh.refresh(state)
    assert (
        fresh.features["x"].reference is not None
        and abs(fresh.features["x"].reference["mean"]) < 0.1
    ), "the champion's profile, not a warm-up"


def test_a_new_champion_renews_the_reference_and_a_retired_version_closes_its_episodes() -> None:
    pm, state = started()
    feed = Feed(pm)
    feed.features(2000, 0.0)
    assert feed.predictions(2000, 1, 0.0) == []
    assert states(feed.features(1000, 3.0)) == [("raised", "x", None)]
    output = feed.predictions(1500, 1, 0.5)
    assert [(a["state"], a["feature"], a["detector"]) for a in output] == [
        ("raised", "score", "output_psi")
    ]
    version(state, 2, "champion", 3.0, 10)
    state.apply(
        {
            "kind": "stage_change",
            "pipeline": SPEC.name,
            "at": 11,
            "spec": None,
            "model": None,
            "stage_change": {
                "name": "m",
                "version": 1,
                "from_stage": "champion",
                "to_stage": "retired",
                "traffic": 0.0,
                "reason": "r",
                "actor": "t",
            },
        },
        11,
    )
    pm.refresh(state)
    closed = pm.tick(0.0, 0.0, METRICS)
    assert sorted(states(closed)) == [
        ("resolved", "score", "retired"),
        ("resolved", "x", "new_reference"),
    ]
    assert pm.champion == ("m", 2) and ("m", 1) not in pm.outputs
    assert feed.features(2000, 3.0) == [], "v2 was trained on the shifted data"


def seasonal_records(n: int, start: int, seed: int) -> tuple[list[dict[str, Any]], list[int]]:
    rng = np.random.default_rng(seed)
    t = np.arange(start, start + n)
    x = 10 * np.sin(2 * np.pi * t / 365) + rng.normal(0, 2, n)
    return [
        {
            "features": {
                "x": float(v),
                "k": "a" if rng.random() < 0.5 + 0.3 * np.sin(2 * np.pi * i / 365) else "b",
            }
        }
        for i, v in zip(t, x)
    ], t.tolist()


def test_seasons_raise_nothing() -> None:
    # The reference covers several seasons; each season alone differs from it a lot, and river's
    # detectors signal at every turn of the seasons: none of that is a drift.
    records, _ = seasonal_records(2000, 0, 1)
    profile = build_profile(
        {"x": [r["features"]["x"] for r in records], "k": [r["features"]["k"] for r in records]},
        {"x": "float", "k": "string"},
    )
    state = RegistryState()
    state.apply(spec_event(SPEC)[1], 0)
    state.apply(
        {
            "kind": "model_version",
            "pipeline": SPEC.name,
            "at": 1,
            "spec": None,
            "stage_change": None,
            "model": {
                "name": "m",
                "version": 1,
                "sha256": "0" * 64,
                "uri": "u",
                "stage": "champion",
                "traffic": 1.0,
                "created_at": 1,
                "reference_profile_json": orjson.dumps(profile).decode(),
            },
        },
        1,
    )
    pm = PipelineMonitor(SPEC, Tuning())
    pm.refresh(state)
    live, offsets = seasonal_records(10_000, 2000, 2)
    alerts = []
    for lo in range(0, len(live), 100):
        alerts += pm.on_features(
            Batch(live[lo : lo + 100], offsets[lo : lo + 100], [0] * 100, "t"), METRICS, 1
        )
    assert alerts == []
    assert sum(d.detections for d in pm.features["x"].detectors) > 10, "the early warnings did fire"
