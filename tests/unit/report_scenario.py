"""A pipeline's story written straight into a lineage store and a registry state (no broker).

Five minutes of traffic, ten events a second: champion v1 serves; at minute two the inputs drift
(x1 moves up) and the concept changes, so v1's accuracy drops; the monitor raises a drift alert; the
trainer registers v2 as a shadow with a scorecard of several contenders; v2 is promoted and v1
retired. Feedback comes back two seconds after each event, by event id, by prediction id, or as a
verdict. Imported by test_report.py and test_report_browser.py (a plain module, not a test file).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loopline.alerts import alert_event
from loopline.model_profile import ModelProfile
from loopline.profile import build_profile
from loopline.registry import RegistryState, spec_event
from loopline.services.lineage import rows
from loopline.services.lineage.store import LineageStore
from loopline.spec import PipelineSpec, parse_spec

PIPELINE = "shop"
T0 = int(datetime(2026, 1, 5, 10, 0, tzinfo=UTC).timestamp() * 1000)
EVENTS, EVERY_MS, DRIFT_AT = 3000, 100, 1200  # events, spacing, first drifted event
ALERT_AT, REGISTERED_AT, PROMOTED_AT = T0 + 140_000, T0 + 170_000, T0 + 200_000

SPEC = parse_spec(
    {
        "name": PIPELINE,
        "key": "user",
        "partitions": 1,
        "features": [
            {"name": "user", "type": "string"},
            {"name": "x1", "type": "float"},
            {"name": "x2", "type": "float"},
            {"name": "flag", "type": "bool"},
        ],
        "label": {"classes": ["false", "true"], "positive": "true"},
    }
)


@dataclass
class Scenario:
    """What was written, for the tests' own arithmetic."""

    store: LineageStore
    state: RegistryState
    alerts: list[dict[str, Any]]
    truth: list[str]
    served: list[
        tuple[int, str, str]
    ]  # (event index, model, predicted label) of served predictions


def _features(i: int, rng: np.random.Generator) -> dict[str, Any]:
    shift = 4.0 if i >= DRIFT_AT else 0.0
    return {
        "user": f"u{i % 300}",
        "x1": float(rng.uniform(0, 10) + shift),
        "x2": float(rng.uniform(0, 10)),
        "flag": bool(rng.random() < 0.3),
    }


def _label(x: dict[str, Any], i: int) -> str:
    threshold = 11.0 if i < DRIFT_AT else 14.0  # the concept moves with the drift
    return str(x["x1"] + x["x2"] > threshold).lower()


def _profile(spec: PipelineSpec, data: list[dict[str, Any]]) -> str:
    columns = {f.name: [r[f.name] for r in data] for f in spec.features}
    return orjson.dumps(build_profile(columns, {f.name: f.type for f in spec.features})).decode()


def _version(version: int, stage: str, at: int, reference: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "model_version",
        "pipeline": PIPELINE,
        "at": at,
        "spec": None,
        "stage_change": None,
        "model": {
            "name": PIPELINE,
            "version": version,
            "sha256": f"{version:x}" * 64,
            "uri": f"file:///artifacts/{version}.onnx",
            "stage": stage,
            "traffic": 1.0 if stage == "champion" else 0.0,
            "parent": extra.get("parent"),
            "created_at": at,
            "library_versions": {},
            "metrics": extra.get("metrics", {}),
            "reference_profile_json": reference,
            "training_ranges": [],
            "trigger": extra.get("trigger"),
            "scorecard_json": extra.get("scorecard"),
            "fill_values": {},
            "input_features": [],
        },
    }


def _stage(
    version: int, at: int, from_stage: str | None, to_stage: str, reason: str
) -> dict[str, Any]:
    return {
        "kind": "stage_change",
        "pipeline": PIPELINE,
        "at": at,
        "spec": None,
        "model": None,
        "stage_change": {
            "name": PIPELINE,
            "version": version,
            "from_stage": from_stage,
            "to_stage": to_stage,
            "traffic": 1.0 if to_stage == "champion" else 0.0,
            "reason": reason,
            "actor": "trainer" if version > 1 else "cli",
        },
    }


SCORECARD = {
    "accepted": True,
    "reason": "river-lr beats champion by margin 0.02: score 0.9100 vs 0.6200 (gain +0.2900)",
    "trigger": "drift",
    "margin": 0.02,
    "metric": "accuracy",
    "winner": "river-lr",
    "candidate": {"accuracy": 0.91, "score": 0.91, "n": 200.0},
    "champion": {"accuracy": 0.62, "score": 0.62, "n": 200.0},
    "champion_version": f"{PIPELINE}:1",
    "contenders": [
        {
            "learner": "river-lr",
            "score": 0.91,
            "metrics": {},
            "trained_on": 800,
            "winner": True,
            "error": None,
        },
        {
            "learner": "sklearn-gbt",
            "score": 0.89,
            "metrics": {},
            "trained_on": 800,
            "winner": False,
            "error": None,
        },
        {
            "learner": "sklearn-mlp",
            "score": None,
            "metrics": {},
            "trained_on": 800,
            "winner": False,
            "error": "did not converge",
        },
        {
            "learner": f"champion {PIPELINE}:1",
            "score": 0.62,
            "metrics": {},
            "trained_on": None,
            "winner": False,
            "error": None,
        },
    ],
    "evidence": {"note": "holdout of 200 labels: gain +0.290 (95% CI +0.21..+0.37); decisive"},
}

PROFILE_V1 = ModelProfile(1000, 0.011, 0.035, 0.021, 0.09, 47_000_000.0, 389, 9_800_000, 5500, 2)
PROFILE_V2 = ModelProfile(
    1000,
    0.02,
    0.12,
    9.3,
    15.4,
    107_000.0,
    760_000,
    19_300_000,
    600,
    2,
    champion_version=1,
    champion_latency_p99_ms=0.034,
    champion_batch_latency_p50_ms=0.02,
    slowdown=465.0,
)


def build(root: Path) -> Scenario:
    """Write the scenario's lineage files and return it with its registry state and alerts."""
    rng = np.random.default_rng(42)
    xs = [_features(i, rng) for i in range(EVENTS)]
    truth = [_label(x, i) for i, x in enumerate(xs)]
    before = [_features(i, np.random.default_rng(i)) for i in range(1000)]  # v1's reference
    after = [_features(DRIFT_AT + i, np.random.default_rng(i)) for i in range(1000)]  # v2's
    state = RegistryState()
    for off, event in enumerate(
        [
            spec_event(SPEC)[1],
            _version(
                1, "champion", T0 - 5000, _profile(SPEC, before), metrics=PROFILE_V1.to_metrics()
            ),
            _stage(1, T0 - 5000, None, "champion", "registered"),
            _version(
                2,
                "shadow",
                REGISTERED_AT,
                _profile(SPEC, after),
                trigger="drift",
                parent=f"{PIPELINE}:1",
                scorecard=orjson.dumps(SCORECARD).decode(),
                metrics={"holdout_accuracy": 0.91, **PROFILE_V2.to_metrics()},
            ),
            _stage(2, REGISTERED_AT, None, "shadow", "registered"),
            _stage(2, PROMOTED_AT, "shadow", "champion", "live trial won (sign test p=0.001)"),
            _stage(1, PROMOTED_AT, "champion", "retired", "replaced by shop v2"),
        ]
    ):
        state.apply(event, off)
    alerts = [
        alert_event(
            PIPELINE,
            "drift",
            "feature x1 drifted: PSI 0.41 over the last 1000 events",
            severity="alert",
            at=ALERT_AT,
            model_name=PIPELINE,
            model_version=1,
            feature="x1",
            detector="psi",
            statistic=0.41,
            threshold=0.25,
        ),
        alert_event("other", "drift", "not this pipeline", at=ALERT_AT),
        alert_event(
            PIPELINE,
            "drift",
            "x1 back to normal",
            state="resolved",
            at=PROMOTED_AT + 30_000,
            feature="x1",
            detector="psi",
        ),
    ]
    store = LineageStore(root)
    features, predictions, feedback, served = [], [], [], []
    offset = 0
    for i, x in enumerate(xs):
        ts = T0 + i * EVERY_MS
        eid = f"e{i}"
        features.append(
            {
                "event_id": eid,
                "key": x["user"],
                "ts": ts,
                "ingested_at": ts + 1,
                "raw_topic": f"loopline.{PIPELINE}.raw",
                "raw_partition": 0,
                "raw_offset": i,
                "features": x,
                "content_hash": f"h{i}",
                "_topic": f"loopline.{PIPELINE}.features",
                "_partition": 0,
                "_offset": i,
            }
        )
        variants = []
        if ts < PROMOTED_AT:
            variants.append((1, "champion", True, 0.92 if i < DRIFT_AT else 0.6))
            if ts >= REGISTERED_AT:
                variants.append((2, "shadow", False, 0.9))
        else:
            variants.append((2, "champion", True, 0.9))
        for version, variant, is_served, skill in variants:
            right = rng.random() < skill
            label = truth[i] if right else ("true" if truth[i] == "false" else "false")
            pid = f"p{i}-{version}"
            predictions.append(
                {
                    "prediction_id": pid,
                    "event_id": eid,
                    "key": x["user"],
                    "model_name": PIPELINE,
                    "model_version": version,
                    "model_sha256": f"{version:x}" * 64,
                    "variant": variant,
                    "served": is_served,
                    "label": label,
                    "value": 0.8 if label == "true" else 0.2,
                    "scores": [("false", 0.2), ("true", 0.8)],
                    "features_topic": f"loopline.{PIPELINE}.features",
                    "features_partition": 0,
                    "features_offset": i,
                    "event_ts": ts,
                    "scored_at": ts + 5 + int(rng.integers(0, 25)) + (40 if version == 2 else 0),
                    "_topic": f"loopline.{PIPELINE}.predictions",
                    "_partition": 0,
                    "_offset": offset,
                }
            )
            offset += 1
            if is_served:
                served.append((i, f"{PIPELINE}/{version}", label))
                fb = {
                    "feedback_id": f"f{i}",
                    "prediction_id": None,
                    "event_id": None,
                    "label": None,
                    "value": None,
                    "verdict": None,
                    "ts": ts + 2000,
                    "_topic": f"loopline.{PIPELINE}.feedback",
                    "_partition": 0,
                    "_offset": i,
                }
                if i % 10 == 0:  # a verdict on the served prediction, by its id
                    fb.update(
                        prediction_id=pid, verdict="accept" if label == truth[i] else "reject"
                    )
                elif i % 3 == 0:
                    fb.update(prediction_id=pid, label=truth[i])
                else:
                    fb.update(event_id=eid, label=truth[i])
                feedback.append(fb)
    # A later relabel of an event must not count: the first feedback on an event is its truth.
    feedback.append(
        {
            "feedback_id": "late",
            "prediction_id": None,
            "event_id": "e1",
            "label": "maybe",
            "value": None,
            "verdict": None,
            "ts": T0 + 290_000,
            "_topic": f"loopline.{PIPELINE}.feedback",
            "_partition": 0,
            "_offset": EVENTS,
        }
    )
    topic_id = "scenario"
    store.write(
        PIPELINE,
        "features",
        f"loopline.{PIPELINE}.features",
        topic_id,
        0,
        features,
        rows.features_schema(SPEC),
    )
    store.write(
        PIPELINE,
        "predictions",
        f"loopline.{PIPELINE}.predictions",
        topic_id,
        0,
        predictions,
        rows.PREDICTIONS,
    )
    store.write(
        PIPELINE, "feedback", f"loopline.{PIPELINE}.feedback", topic_id, 0, feedback, rows.FEEDBACK
    )
    return Scenario(store, state, alerts, truth, served)
