"""Model profiles: real ONNX models measured in a child ONNX Runtime process, side by side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from loopline.model_profile import (
    PREFIX,
    SLOWER_WARNING,
    ModelProfile,
    ProfileError,
    at_registration,
    measure,
    profile_of,
    subject,
)
from loopline.spec import parse_spec

SPEC = parse_spec(
    {
        "name": "p",
        "features": [{"name": f"x{i}", "type": "float"} for i in range(4)]
        + [{"name": "opt", "type": "float", "required": False}],
        "label": {"classes": ["0", "1"]},
    }
)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(400, 5)).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(int)
ROWS = [
    {**{f"x{i}": float(r[i]) for i in range(4)}, "opt": None if j % 5 == 0 else float(r[4])}
    for j, r in enumerate(X)
]


def onnx_of(model: Any) -> bytes:
    return to_onnx(model.fit(X, Y), X[:1], options={"zipmap": False}).SerializeToString()


FAST = onnx_of(LogisticRegression())
# 300 deep trees: about as slow to score 1,000 rows as a model can be and still be registered.
SLOW = onnx_of(RandomForestClassifier(n_estimators=300, max_depth=14, random_state=0))


def test_a_model_is_measured_at_one_row_and_at_the_batch_size() -> None:
    subjects = [subject(FAST, SPEC, ROWS, 256, fill_values={"opt": 0.0})]
    prof = profile_of(measure(subjects, budget_s=0.1), subjects, 256)
    assert 0 < prof.latency_p50_ms <= prof.latency_p99_ms
    assert 0 < prof.batch_latency_p50_ms <= prof.batch_latency_p99_ms
    assert prof.rows_per_s == pytest.approx(256 / (prof.batch_latency_p50_ms / 1000))
    assert prof.model_bytes == len(FAST) and prof.batch_size == 256
    assert prof.peak_memory_bytes is not None and prof.peak_memory_bytes > 0  # an ORT session costs
    assert prof.runs >= 60 and prof.slowdown is None and prof.champion_version is None
    # Stored in the version's metrics map and read back whole; other metrics are not a profile.
    assert ModelProfile.from_metrics({**prof.to_metrics(), "auc": 0.9}) == prof
    assert all(k.startswith(PREFIX) for k in prof.to_metrics())
    assert ModelProfile.from_metrics({"auc": 0.9}) is None


def test_a_far_slower_version_is_flagged_beside_the_champion_and_a_twin_is_not() -> None:
    slow = [subject(SLOW, SPEC, ROWS, 1000), subject(FAST, SPEC, ROWS, 1000)]
    prof = profile_of(measure(slow, budget_s=0.1), slow, 1000, champion_version=3)
    assert prof.slow and prof.slowdown is not None and prof.slowdown > SLOWER_WARNING
    assert prof.champion_version == 3 and prof.champion_batch_latency_p50_ms is not None
    assert "x the champion's latency" in prof.summary()
    twins = [subject(FAST, SPEC, ROWS, 1000), subject(FAST, SPEC, ROWS, 1000)]
    same = profile_of(measure(twins, budget_s=0.1), twins, 1000, champion_version=3)
    assert same.slowdown is not None and not same.slow


def test_registration_measures_beside_the_champion_and_refuses_only_past_max_slowdown() -> None:
    champion = {
        "version": 1,
        "uri": "file:///champion.onnx",
        "sha256": "c" * 64,
        "fill_values": {},
        "input_features": [],
    }
    stored = {("file:///champion.onnx", "c" * 64): FAST}
    metrics = at_registration(
        SLOW,
        SPEC,
        ROWS,
        {"opt": 0.0},
        [],
        champion,
        "p/p v2",
        read=lambda uri, sha: stored[(uri, sha)],
    )
    prof = ModelProfile.from_metrics(metrics)
    assert prof is not None and prof.slow and prof.champion_version == 1
    with pytest.raises(ProfileError, match=r"p/p v2: latency is .*x the champion's.*max_slowdown"):
        at_registration(
            SLOW,
            SPEC,
            ROWS,
            {"opt": 0.0},
            [],
            champion,
            "p/p v2",
            max_slowdown=2.0,
            read=lambda uri, sha: stored[(uri, sha)],
        )


def test_an_unreadable_champion_loses_only_the_comparison() -> None:
    def gone(uri: str, sha256: str) -> bytes:
        raise OSError("artifact store unreachable")

    champion = {"version": 1, "uri": "s3://gone/x", "sha256": "c" * 64}
    prof = ModelProfile.from_metrics(
        at_registration(FAST, SPEC, None, {}, [], champion, "p/p v2", max_slowdown=1.5, read=gone)
    )
    assert prof is not None and prof.slowdown is None and prof.champion_version is None
