"""`loopline models register` measures each version beside the champion; `models list` shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from skl2onnx import to_onnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from loopline.app.cli import main as cli
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import KafkaConfig
from loopline.model_profile import ModelProfile
from loopline.models import ModelRegistry, versions_of
from loopline.settings import LooplineSettings
from loopline.spec import parse_spec

pytestmark = pytest.mark.integration


def onnx_of(model: Any, x: np.ndarray, y: np.ndarray) -> bytes:
    return to_onnx(model.fit(x, y), x[:1], options={"zipmap": False}).SerializeToString()


def test_register_measures_warns_on_a_slow_version_refuses_past_the_limit_and_lists(
    kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path
) -> None:
    spec = parse_spec(
        {
            "name": unique,
            "label": {"classes": ["0", "1"]},
            "features": [{"name": f"x{i}", "type": "float"} for i in range(3)],
        }
    )
    apply_spec(kafka, spec)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(int)
    fast, slow = tmp_path / "fast.onnx", tmp_path / "slow.onnx"
    fast.write_bytes(onnx_of(LogisticRegression(), x, y))
    forest = RandomForestClassifier(n_estimators=300, max_depth=14, random_state=0)
    slow.write_bytes(onnx_of(forest, x, y))
    env = {
        "LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "LOOPLINE_KAFKA_PROFILE": settings.kafka_profile,
        "LOOPLINE_HOME": str(tmp_path),
        "LOOPLINE_ARTIFACT_URI": str(tmp_path / "artifacts"),
        "COLUMNS": "250",
    }
    runner = CliRunner()

    first = runner.invoke(cli, ["models", "register", unique, "--onnx", str(fast)], env=env)
    assert first.exit_code == 0, first.output
    assert "measured in ONNX Runtime: p50/p99" in first.output and "warning" not in first.output

    second = runner.invoke(
        cli,
        [
            "models",
            "register",
            unique,
            "--onnx",
            str(slow),
            "--stage",
            "challenger",
            "--traffic",
            "0.2",
        ],
        env=env,
    )
    assert second.exit_code == 0, second.output
    assert "warning:" in second.output and "slower than champion v1" in second.output

    refused = runner.invoke(
        cli,
        [
            "models",
            "register",
            unique,
            "--onnx",
            str(slow),
            "--stage",
            "shadow",
            "--max-slowdown",
            "3",
        ],
        env=env,
    )
    assert refused.exit_code == 2 and "(rule: max_slowdown)" in refused.output, refused.output

    state = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts"))).state()
    versions = versions_of(state, unique)
    assert [v["version"] for v in versions] == [1, 2]  # the refused one was never published
    one, two = (ModelProfile.from_metrics(v["metrics"]) for v in versions)
    assert one is not None and one.slowdown is None and one.model_bytes == fast.stat().st_size
    assert two is not None and two.slow and two.champion_version == 1

    listed = runner.invoke(cli, ["models", "list", unique], env=env)
    assert listed.exit_code == 0, listed.output
    assert "rows/s" in listed.output and f"{two.slowdown:.1f}x v1" in listed.output
    assert "profile." not in listed.output  # the profile has its own columns, not the metrics one
