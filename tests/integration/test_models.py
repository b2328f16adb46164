"""Model registration, promotion, rollback and stage
history on the real broker with real ONNX models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from loopline.app.cli import main as cli
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore, read_artifact
from loopline.errors import LooplineError
from loopline.kafka import KafkaConfig
from loopline.models import (
    ModelRegistry,
    NewVersion,
    champion,
    serving_at,
    stage_history,
    versions_of,
)
from loopline.registry import now_ms
from loopline.settings import LooplineSettings
from loopline.spec import parse_spec

pytestmark = pytest.mark.integration


def lr_model(width: int = 3, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.random((200, width)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(int)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


@pytest.fixture
def registry(kafka: KafkaConfig, unique: str, tmp_path: Path) -> ModelRegistry:
    spec = parse_spec({"name": unique, "features": [
        {"name": "a", "type": "float"}, {"name": "b", "type": "float"},
        {"name": "flag", "type": "bool"},
        {"name": "opt", "type": "float", "required": False}, {"name": "city", "type": "string"}],
        "label": {"classes": ["0", "1"], "positive": "1"}})
    apply_spec(kafka, spec)
    return ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test")


def reference_csv(path: Path, rows: int = 50) -> Path:
    rng = np.random.default_rng(1)
    lines = ["a,b,flag,opt,city"]
    for i in range(rows):
        lines.append(f"{rng.random():.4f},{rng.random():.4f},{'true' if i % 2 else 'false'},"
                     f"{'' if i % 4 == 0 else f'{rng.random() * 10:.3f}'},x{i % 3}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_register_with_reference_profile_and_fill(registry: ModelRegistry, unique: str,
                                                  tmp_path: Path) -> None:
    from loopline.models import load_reference

    state = registry.state()
    ref = load_reference(reference_csv(tmp_path / "ref.csv"), state.specs[unique])
    rec = registry.register(unique, lr_model(4), NewVersion(reference=ref, metrics={"auc": 0.9}))
    stored = registry.state().versions[(unique, unique, 1)]
    assert stored["stage"] == "champion"
    # The user's metrics, beside the profile measured at registration (loopline.model_profile).
    user = {k: v for k, v in stored["metrics"].items() if not k.startswith("profile.")}
    assert user == {"auc": 0.9} and "profile.latency_p99_ms" in stored["metrics"]
    assert stored["input_features"] == ["a", "b", "flag", "opt"]
    assert 0 < stored["fill_values"]["opt"] < 10
    assert {"onnxruntime", "numpy", "onnx"} <= set(stored["library_versions"])
    profile = orjson.loads(stored["reference_profile_json"])
    assert set(profile["features"]) == {"a", "b", "flag", "opt", "city"}
    assert profile["features"]["opt"]["missing"] == 13
    assert set(profile["outputs"]) == {"label", "score"}
    assert read_artifact(rec["uri"], rec["sha256"]) == lr_model(4)


@pytest.mark.parametrize(("model", "rule"),
                         [(lr_model(3), "input_shape"), (b"\x08\x07garbage", "loads")])
def test_registration_refuses_bad_models(registry: ModelRegistry, unique: str, model: bytes,
                                         rule: str) -> None:
    with pytest.raises(LooplineError, match=rule):
        registry.register(unique, model)
    assert not versions_of(registry.state(), unique)


def test_nan_output_and_sha_mismatch_refused(registry: ModelRegistry, unique: str) -> None:
    node = helper.make_node("Div", ["X", "X"], ["r"])
    sub = helper.make_node("Sub", ["r", "r"], ["z"])
    out = helper.make_node("Div", ["z", "z"], ["value"])
    graph = helper.make_graph([node, sub, out], "nan",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("value", TensorProto.FLOAT,
                                                             [None, 2])])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(LooplineError, match="finite_output"):
        registry.register(unique, model)
    with pytest.raises(LooplineError, match="sha256_match"):
        registry.register(unique, lr_model(4), NewVersion(expected_sha256="0" * 64))
    assert not versions_of(registry.state(), unique)


def test_promote_rollback_and_history(registry: ModelRegistry, unique: str) -> None:
    registry.register(unique, lr_model(4, 1))
    t_v1 = now_ms()
    registry.register(unique, lr_model(4, 2), NewVersion(stage="challenger", traffic=0.2))
    with pytest.raises(LooplineError, match="traffic_sum"):
        registry.register(unique, lr_model(4, 3), NewVersion(stage="canary", traffic=0.9))
    registry.promote(unique, 2)
    state = registry.state()
    assert champion(state, unique)["version"] == 2
    assert state.versions[(unique, unique, 1)]["stage"] == "retired"
    registry.rollback(unique)
    state = registry.state()
    assert champion(state, unique)["version"] == 1
    assert state.versions[(unique, unique, 2)]["stage"] == "rejected"
    history = [(c["version"], c["from_stage"], c["to_stage"]) for c in stage_history(state, unique)]
    assert history == [(1, None, "champion"), (2, None, "challenger"),
                       (2, "challenger", "champion"),
                       (1, "champion", "retired"), (1, "retired", "champion"),
                       (2, "champion", "rejected")]
    assert serving_at(state, unique, t_v1) == {(unique, 1): ("champion", 1.0)}
    with pytest.raises(LooplineError, match="earlier champion"):
        registry.rollback(unique)


def test_cli_register_list_promote(settings: LooplineSettings, registry: ModelRegistry, unique: str,
                                   tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(lr_model(4))
    env = {"LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "LOOPLINE_KAFKA_PROFILE": "embedded",
           "COLUMNS": "250", "LOOPLINE_HOME": str(settings.home),
           "LOOPLINE_ARTIFACT_URI": str(tmp_path / "store")}
    runner = CliRunner(env=env)
    ref = reference_csv(tmp_path / "ref.csv")
    r = runner.invoke(cli, ["models", "register", unique, "--onnx", str(model), "--reference",
                            str(ref), "--metrics", "auc=0.8"])
    assert r.exit_code == 0, r.output
    assert f"registered {unique}/1 " in r.output and "reference profile stored" in r.output
    r = runner.invoke(cli,
                      ["models", "register", unique, "--onnx", str(model), "--stage", "shadow"])
    assert r.exit_code == 0, r.output
    assert f"scored beside champion {unique}/{unique} v1" in r.output
    r = runner.invoke(cli, ["models", "register", unique, "--onnx", str(model),
                            "--name", "Bad.Name"])
    assert r.exit_code == 2 and "rule: pattern" in r.output, r.output
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"corrupt")
    r = runner.invoke(cli, ["models", "register", unique, "--onnx", str(bad)])
    assert r.exit_code == 2 and "rule: loads" in r.output
    r = runner.invoke(cli, ["models", "promote", unique, "2"])
    assert r.exit_code == 0 and "shadow -> champion" in r.output, r.output
    r = runner.invoke(cli, ["models", "rollback", unique])
    assert r.exit_code == 0 and f"champion is now {unique}/1" in r.output, r.output
    r = runner.invoke(cli, ["models", "list", unique, "--history"])
    assert r.exit_code == 0 and r.output.count("champion") >= 3


def lr_model64(width: int = 4, seed: int = 0) -> bytes:
    """A LogisticRegression exported from float64 data: its input is tensor(double)."""
    rng = np.random.default_rng(seed)
    x = rng.random((200, width))
    y = (x[:, 1] > 0.5).astype(int)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def test_float32_and_float64_versions_register_beside_each_other_and_both_score(
        registry: ModelRegistry, unique: str) -> None:
    registry.register(unique, lr_model(4))  # float32 input, the usual skl2onnx export
    registry.register(unique, lr_model64(4), NewVersion(stage="shadow"))
    assert [(r.label, r.stage, r.ok) for r in registry.last_trial] == [
        (f"{unique}/{unique} v2", "shadow", True), (f"{unique}/{unique} v1", "champion", True)]
    rows = registry.last_trial[0].rows
    registry.register(unique, lr_model64(4, seed=1), NewVersion(stage="challenger", traffic=0.3))
    assert [r.stage for r in registry.last_trial] == ["challenger", "champion", "shadow"]
    assert all(r.ok and r.rows == rows for r in registry.last_trial), registry.last_trial
    assert rows > 64, "the test batch has no rows with missing optional features"


def log_of_opt_model() -> bytes:
    """A classifier whose scores are log(opt): fine on the synthetic rows, -inf when opt is missing
    (filled with 0, the fill value without reference data)."""
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    three = helper.make_tensor("three", TensorProto.INT64, [1], [3])
    four = helper.make_tensor("four", TensorProto.INT64, [1], [4])
    nodes = [helper.make_node("Slice", ["X", "three", "four", "one"], ["opt"]),
             helper.make_node("Log", ["opt"], ["log"]),
             helper.make_node("Concat", ["log", "log"], ["probabilities"], axis=1)]
    graph = helper.make_graph(nodes, "log_opt",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                             [None, 2])],
                              initializer=[one, three, four])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_registration_refuses_a_version_that_cannot_score_what_inference_feeds(
        registry: ModelRegistry, unique: str) -> None:
    registry.register(unique, lr_model(4))
    with pytest.raises(LooplineError, match="rule: scores_beside_deployment") as info:
        registry.register(unique, log_of_opt_model(), NewVersion(stage="shadow"))
    assert f"champion {unique}/{unique} v1" in str(info.value) and "NaN or inf" in str(info.value)
    assert [v["version"] for v in versions_of(registry.state(), unique)] == [1]


def test_names_and_sizes_are_checked_at_registration(kafka: KafkaConfig, registry: ModelRegistry,
                                                     unique: str, tmp_path: Path) -> None:
    with pytest.raises(LooplineError, match="rule: pattern"):
        registry.register(unique, lr_model(4), NewVersion(name="Fraud/v2"))
    with pytest.raises(LooplineError, match="rule: pattern"):
        registry.register("Bad.Pipeline", lr_model(4))
    with pytest.raises(LooplineError, match="rule: pattern"):
        registry.promote(unique, 1, name="a b")
    with pytest.raises(LooplineError, match="rule: traffic_range"):
        registry.register(unique, lr_model(4), NewVersion(traffic=float("nan")))
    small = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "small"), max_bytes=100),
                          actor="test")
    with pytest.raises(LooplineError, match="rule: size_limit"):
        small.register(unique, lr_model(4))
    assert not versions_of(registry.state(), unique)
