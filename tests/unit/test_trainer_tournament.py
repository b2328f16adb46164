"""The candidate tournament: change points, holdout sizes, contenders, the champion's family, and
the service's decision on a drifted stream (registration with the scorecard, promotion on
probation)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from loopline import avro
from loopline.artifacts import ArtifactStore, read_artifact
from loopline.models import ModelRegistry, NewVersion, versions_of
from loopline.registry import RegistryState, spec_event
from loopline.scoring import Scorer
from loopline.services.trainer import tournament
from loopline.services.trainer.data import Holdout, Ranges
from loopline.services.trainer.export import to_onnx
from loopline.services.trainer.join import Example, PredRow
from loopline.services.trainer.learner import Learner
from loopline.services.trainer.metrics import TrainerMetrics
from loopline.services.trainer.service import TrainerService, new_state
from loopline.services.trainer.settings import TrainerSettings
from loopline.services.trainer.validation import scorecard
from loopline.spec import PipelineSpec, parse_spec


def circle_spec(**trainer: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "circle",
            "partitions": 1,
            "features": [{"name": "x", "type": "float"}, {"name": "y", "type": "float"}],
            "label": {"classes": ["in", "out"], "positive": "in"},
            "deployment": {"promotion": "auto"},
            "trainer": trainer,
        }
    )


def circle(n: int, seed: int, centre: tuple[float, float]) -> list[tuple[dict[str, float], str]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        x, y = rnd.random(), rnd.random()
        inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 < 0.09
        out.append(({"x": x, "y": y}, "in" if inside else "out"))
    return out


OLD, NEW = (0.35, 0.4), (0.6, 0.6)


def sklearn_champion(spec: PipelineSpec, kind: str = "poly_logistic") -> bytes:
    """A user's model of the old concept, exported by skl2onnx with a float32 input."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    from loopline.services.trainer.batch import _tree_converter

    rows = circle(1500, 99, OLD)
    x = np.array([[r["x"], r["y"]] for r, _ in rows], dtype=np.float32)
    y = np.array([lab for _, lab in rows])
    if kind == "poly_logistic":
        model = make_pipeline(PolynomialFeatures(2), StandardScaler(), LogisticRegression()).fit(
            x, y
        )
        options, custom = {id(model.steps[-1][1]): {"zipmap": False}}, None
    else:
        model = HistGradientBoostingClassifier(max_iter=20).fit(x, y)
        options = {id(model): {"zipmap": False}}
        custom = {
            HistGradientBoostingClassifier: _tree_converter("SklearnHistGradientBoostingClassifier")
        }
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, 2]))],
        options=options,
        target_opset={"": 17, "ai.onnx.ml": 3},
        custom_conversion_functions=custom,
    )
    return onx.SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped


def window_of(
    spec: PipelineSpec, rows: list[tuple[dict[str, float], str]]
) -> tuple[Holdout, Learner, Ranges]:
    """Labeled examples pushed the way the service pushes them: holdout, window, river learner."""
    holdout, learner, trained = (
        Holdout(spec.trainer.holdout),
        Learner(spec),
        Ranges(spec.topics.features),
    )
    for i, (x, y) in enumerate(rows):
        leaving = holdout.push(Example(f"e{i}", x, y, 0, i, i, None, []), keep=spec.trainer.window)
        if leaving is not None:
            learner.learn(leaving.features, leaving.target)
            trained.add(leaving.partition, leaving.offset, leaving.ts)
    return holdout, learner, trained


# ---- sizes and change points ---------------------------------------------------------------------
def test_change_point_finds_a_jump_and_leaves_a_stationary_window_whole() -> None:
    rng = np.random.default_rng(0)
    errors = np.concatenate([rng.random(800) < 0.05, rng.random(120) < 0.35]).astype(float)
    found = tournament.change_point(errors, binary=True)
    assert found is not None and abs(found[0] - 800) <= 15
    start, changes = tournament.current_concept(errors, binary=True)
    assert abs(start - 800) <= 15 and changes[0]["error_after"] > 0.25
    for seed in range(20):
        still = (np.random.default_rng(seed).random(2000) < 0.2).astype(float)
        assert tournament.change_point(still, binary=True) is None
    drift = np.concatenate([rng.normal(1, 0.3, 500), rng.normal(1.4, 0.3, 100)])
    assert tournament.change_point(drift, binary=False) is not None


@pytest.mark.parametrize(("usable", "expected"), [(100, 50), (200, 60), (1000, 300), (5000, 500)])
def test_holdout_scales_with_the_labels_between_its_bounds(usable: int, expected: int) -> None:
    assert tournament.holdout_size(circle_spec(), usable) == expected


def test_a_small_holdout_setting_caps_the_minimum() -> None:
    spec = circle_spec(holdout=20)
    assert tournament.min_holdout(spec) == 20 and tournament.holdout_size(spec, 100) == 20


# ---- the tournament ------------------------------------------------------------------------------
def test_tournament_learns_the_new_concept_from_the_labels_after_the_change() -> None:
    spec = circle_spec()
    champion_model = sklearn_champion(spec)
    champion = Scorer(champion_model, spec, label="champion")
    rows = circle(800, 1, OLD) + circle(220, 2, NEW)
    holdout, learner, trained = window_of(spec, rows)
    t = tournament.run(
        spec,
        holdout,
        learner,
        trained,
        [x for x, _ in rows[-500:]],
        champion,
        champion_model,
        name="circle-trainer",
    )
    assert t.window_info["from"] >= 780 and t.window_info["usable"] <= 240  # the new concept only
    names = [c.name for c in t.contenders]
    assert names[:4] == [
        "river.logistic_regression",
        "sklearn.linear",
        "sklearn.linear+poly2",
        "sklearn.hist_gradient_boosting",
    ]
    assert t.champion is not None and t.winner.evaluation is not None
    assert t.winner.evaluation.metrics["score"] >= t.champion.metrics["score"] + 0.15
    # The champion takes float32: so does every exported contender (shadows are fed alike).
    assert t.input_type == "float32"
    assert Scorer(t.registered.model or b"", spec).session.get_inputs()[0].type == "tensor(float)"
    # The champion is a linear model on products of its inputs: the poly2 learner is its family.
    assert t.family is not None and t.family["family"] == "linear on products of inputs"
    assert t.family["in_tournament_as"] == "sklearn.linear+poly2"
    # The registered model is the winner refitted on its training labels plus the holdout.
    assert t.registered.name == t.winner.name
    assert t.registered.trained_on == t.winner.trained_on + len(t.holdout)
    card = scorecard(spec, t, "drift_alert(x)", "circle:1")
    rows_by_name = {r["learner"]: r for r in card["contenders"]}
    assert set(names) | {"champion circle:1"} == set(rows_by_name)
    assert [r["learner"] for r in card["contenders"] if r["winner"]] == [t.winner.name]
    assert card["accepted"] and card["evidence"]["p_adjusted"] < 0.01 and card["evidence"]["direct"]
    assert t.winner.name in card["summary"] and "champion circle:1" in card["summary"]
    assert card["training"]["count"] == t.registered.trained_on


def test_tournament_waits_when_the_concept_changed_too_recently() -> None:
    spec = circle_spec()
    champion_model = sklearn_champion(spec)
    rows = circle(800, 1, OLD) + circle(60, 2, NEW)
    holdout, learner, trained = window_of(spec, rows)
    with pytest.raises(tournament.Deferred) as e:
        tournament.run(
            spec, holdout, learner, trained, [], Scorer(champion_model, spec), champion_model, "c"
        )
    assert 30 <= e.value.labels <= 50  # about 100 labels after the change are needed


def test_a_contender_that_cannot_learn_is_listed_with_its_reason() -> None:
    spec = circle_spec(learner="hoeffding_adaptive_tree")
    rows = [
        (x, "out") for x, _ in circle(300, 3, OLD)
    ]  # one class only: the batch learners cannot fit
    holdout, learner, trained = window_of(spec, rows)
    t = tournament.run(spec, holdout, learner, trained, [], None, None, "c")
    assert t.winner.name == "river.hoeffding_adaptive_tree" and t.champion is None
    failed = {c.name: c.error for c in t.contenders if c.error}
    assert failed["sklearn.linear"] is not None and "two_classes" in failed["sklearn.linear"]
    card = scorecard(spec, t, "every_n_labels(300)", None)
    assert card["accepted"] and card["reason"] == "no champion to beat"
    assert "sklearn.linear failed" in card["summary"]


def test_a_tree_champion_brings_boosting_and_a_river_champion_its_own_kind() -> None:
    spec = circle_spec(learners=[{"kind": "linear"}])
    family, how = tournament.champion_family(spec, sklearn_champion(spec, "boosting"))
    assert (
        family is not None
        and family["family"] == "tree ensemble"
        and how.kind == "hist_gradient_boosting"
    )
    rows = circle(400, 4, NEW)
    tree_spec = circle_spec(learner="hoeffding_adaptive_tree")
    river_champion = Learner(tree_spec)
    for x, y in rows:
        river_champion.learn(x, y)
    model = to_onnx(river_champion)
    holdout, learner, trained = window_of(spec, rows)
    t = tournament.run(spec, holdout, learner, trained, [], Scorer(model, spec), model, "c")
    assert "river.hoeffding_adaptive_tree (champion's family)" in [c.name for c in t.contenders]
    assert t.input_type == "float64"  # the river champion takes doubles


# ---- the service's decision ----------------------------------------------------------------------
class _Registry(ModelRegistry):
    """The real registry logic over an in-memory state (no broker in unit tests)."""

    def __init__(self, store: ArtifactStore, state: RegistryState) -> None:
        self.store, self._state, self.actor = store, state, "trainer"
        self.codec = avro.codec("registry")

    def state(self) -> RegistryState:
        return self._state

    def _publish(self, events: list[tuple[bytes, dict[str, Any]]]) -> None:
        for _, event in events:
            self._state.apply(self.codec.decode(self.codec.encode(event)), self._state.offset + 1)


class _Reader:
    def __init__(self, state: RegistryState) -> None:
        self.state = state


def trainer_for(spec: PipelineSpec, tmp_path: Path) -> tuple[TrainerService, _Registry]:
    state = RegistryState()
    state.apply(spec_event(spec)[1], 0)
    registry = _Registry(ArtifactStore(str(tmp_path / "artifacts")), state)
    svc = TrainerService.__new__(TrainerService)  # its decision methods, without Kafka clients
    svc.settings = TrainerSettings(home=tmp_path, pipelines=[spec.name])
    svc.metrics, svc.reader, svc.models = (
        TrainerMetrics(CollectorRegistry()),
        _Reader(state),
        registry,
    )
    svc.states = {spec.name: new_state(spec, svc.settings)}
    svc.specs, svc._champions, svc.units, svc.codecs = {spec.name: spec}, {}, None, {}
    return svc, registry


def test_a_decisive_winner_is_registered_with_its_scorecard_and_promoted_on_probation(
    tmp_path: Path,
) -> None:
    spec = circle_spec()
    svc, registry = trainer_for(spec, tmp_path)
    old = circle(1500, 5, OLD)
    v1 = registry.register(
        spec.name, sklearn_champion(spec), NewVersion(reference=[x for x, _ in old[:300]])
    )
    st = svc.states[spec.name]
    rows = circle(700, 6, OLD) + circle(250, 7, NEW)
    for i, (x, y) in enumerate(rows):
        pred = PredRow(f"e{i}", v1["name"], v1["version"], "champion", True, "out", None, 0, 0)
        svc._example(spec.name, st, Example(f"e{i}", x, y, 0, i, i, None, [pred]))
    assert st.policy.on_alert(
        {
            "alert_id": "a" * 32,
            "state": "raised",
            "signal": "performance",
            "severity": "alert",
            "feature": None,
            "detector": "ddm",
            "message": "m",
        }
    )
    st.policy.labels_since_drift = (
        1000  # the settle count is the policy's own business (tested there)
    )
    svc.act()
    state = registry.state()
    [v2] = [v for v in versions_of(state, spec.name) if v["version"] > v1["version"]]
    card = orjson.loads(v2["scorecard_json"])
    assert card["accepted"] and card["decision"] == "promote now, on probation"
    assert {r["learner"] for r in card["contenders"]} >= {
        "river.logistic_regression",
        "sklearn.linear",
        "sklearn.linear+poly2",
        "sklearn.hist_gradient_boosting",
    }
    assert v2["library_versions"]["trainer.learner"] == card["winner"]
    assert v2["trigger"].startswith("drift_alert(performance:ddm:")
    assert state.versions[(spec.name, v1["name"], v2["version"])]["stage"] == "champion"
    assert state.versions[(spec.name, v1["name"], v1["version"])]["stage"] == "shadow"
    assert st.trial is not None and st.trial.phase == "probation"
    assert st.trial.challenger == (v2["name"], v2["version"])
    model = onnx.load_model_from_string(read_artifact(v2["uri"], v2["sha256"]))
    assert {p.key: p.value for p in model.metadata_props}["learner"] == card["winner"].split("@")[0]
