"""ONNX export of trainer learners: parity with river
within 1e-5, and the registry's own validation."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from loopline.models import validate_model
from loopline.scoring import Scorer
from loopline.services.trainer.export import to_onnx
from loopline.services.trainer.learner import Learner
from loopline.spec import PipelineSpec, parse_spec

FEATURES = [{"name": "amount", "type": "float", "min": 0, "max": 1000},
            {"name": "hour", "type": "int", "min": 0, "max": 23},
            {"name": "card_present", "type": "bool"},
            {"name": "country", "type": "string", "values": ["DE", "FR"]}]


def make_spec(label: dict[str, Any], learner: str) -> PipelineSpec:
    return parse_spec({"name": "p", "features": FEATURES, "label": label,
                       "trainer": {"learner": learner}})


def stream(n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    return [{"amount": rnd.uniform(0, 1000), "hour": rnd.randint(0, 23),
             "card_present": rnd.random() < 0.5,
             "country": rnd.choice(["DE", "FR"])} for _ in range(n)]


def target(r: dict[str, Any], task: str, classes: list[str]) -> Any:
    z = r["amount"] / 100 - r["hour"] / 3 + 2 * r["card_present"]
    if task == "regression":
        return 3 * z + 1
    if len(classes) == 2:
        return classes[1] if z > 1 else classes[0]
    return classes[0] if z < -2 else classes[1] if z < 3 else classes[2]


CASES = [
    ({"classes": ["no", "yes"], "positive": "yes"}, "logistic_regression"),
    # positive first in spec order
    ({"classes": ["yes", "no"], "positive": "yes"}, "logistic_regression"),
    ({"classes": ["low", "mid", "high"]}, "logistic_regression"),  # one-vs-rest
    ({"task": "regression"}, "linear_regression"),
]


@pytest.mark.parametrize(("label", "learner"), CASES)
def test_onnx_matches_river_on_held_out_inputs(label: dict[str, Any], learner: str) -> None:
    spec = make_spec(label, learner)
    model = Learner(spec)
    classes = list(spec.label.classes or [])
    for r in stream(3000, seed=1):
        model.learn(r, target(r, spec.label.task, classes))
    held_out = stream(500, seed=2)
    session = ort.InferenceSession(to_onnx(model))
    x = np.array([[r["amount"], r["hour"], float(r["card_present"])] for r in held_out])
    out = session.run(None, {"input": x})
    if spec.label.task == "regression":
        river_values = np.array(model.predict(held_out))
        assert np.abs(out[0][:, 0] - river_values).max() < 1e-5
        return
    labels, probs = out
    river_probs = np.array(model.predict_proba(held_out))
    assert probs.shape == (500, len(classes))
    assert np.abs(probs - river_probs).max() < 1e-5
    assert labels.tolist() == model.predict(held_out)
    assert len(set(labels.tolist())) > 1  # the test would be vacuous on a constant model


@pytest.mark.parametrize(("label", "learner"), CASES)
def test_exported_model_passes_registry_validation_and_scores_like_river(label: dict[str, Any],
                                                                         learner: str) -> None:
    spec = make_spec(label, learner)
    model = Learner(spec)
    classes = list(spec.label.classes or [])
    train = stream(1000, seed=3)
    for r in train:
        model.learn(r, target(r, spec.label.task, classes))
    onnx_model = to_onnx(model)
    checked = validate_model(onnx_model, spec, train[:200])
    assert checked.input_features == ["amount", "hour", "card_present"]
    held_out = stream(100, seed=4)
    result = Scorer(onnx_model, spec, checked.fill_values).score(held_out)
    if spec.label.task == "regression":
        assert np.allclose(result.values, model.predict(held_out), atol=1e-5)
    else:
        assert result.labels == model.predict(held_out)
        for row, river_row in zip(result.scores or [], model.predict_proba(held_out)):
            assert [row[c] for c in classes] == pytest.approx(river_row, abs=1e-5)


def test_untrained_model_exports_and_scores() -> None:
    spec = make_spec({"classes": ["no", "yes"]}, "logistic_regression")
    session = ort.InferenceSession(to_onnx(Learner(spec)))
    _, probs = session.run(None, {"input": np.zeros((3, 3))})
    assert np.allclose(probs, 0.5)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_adaptive_tree_with_alternate_subtrees_matches_river(task: str) -> None:
    from river import datasets

    label = {"classes": ["false", "true"]} if task == "classification" else {"task": "regression"}
    spec = parse_spec({"name": "s",
                       "features": [{"name": f"x{i}", "type": "float"} for i in range(3)],
                       "label": label, "trainer": {"learner": "hoeffding_adaptive_tree"}})
    model = Learner(spec)
    # A concept drift halfway makes the tree grow alternate subtrees, which river also consults.
    data = [*datasets.synth.SEA(variant=0, seed=1).take(20000),
            *datasets.synth.SEA(variant=3, seed=2).take(20000)]
    for k, (x, y) in enumerate(data):
        record = {f"x{i}": v for i, v in x.items()}
        model.learn(record, str(y).lower() if task == "classification"
                    else x[0] * 2 + x[1] * (1 if k < 20000 else -1))
    assert model.model.n_alternate_trees > 0 and model.model.n_nodes > 5
    held_out = [{f"x{i}": v for i, v in x.items()}
                for x, _ in datasets.synth.SEA(seed=9).take(2000)]
    out = ort.InferenceSession(to_onnx(model)).run(None, {"input": np.array([[r["x0"], r["x1"],
                                                                              r["x2"]]
                                                                            for r in held_out])})
    if task == "regression":
        assert np.abs(out[0][:, 0] - np.array(model.predict(held_out))).max() < 1e-5
    else:
        assert np.abs(out[1] - np.array(model.predict_proba(held_out))).max() < 1e-5
        assert out[0].tolist() == model.predict(held_out)
