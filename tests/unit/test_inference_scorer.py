"""The ONNX input/output contract: feeds, imputation, classifier and regressor outputs, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.linear_model import LinearRegression, LogisticRegression

from loopline.scoring import ModelError, Scorer, synthetic_batch
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "unit", "features": [
    {"name": "city", "type": "string", "values": ["a", "b"]},
    {"name": "x", "type": "float", "min": 0, "max": 1},
    {"name": "n", "type": "int", "min": 0, "max": 10}, {"name": "flag", "type": "bool"},
    {"name": "opt", "type": "float", "required": False}],
    "label": {"classes": ["no", "yes"], "positive": "yes"}})


def classifier(zipmap: bool) -> bytes:
    rng = np.random.default_rng(0)
    x = rng.random((200, 4)).astype(np.float32)
    y = np.where(x[:, 0] > 0.5, "yes", "no")
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options=None if zipmap else {"zipmap": False}).SerializeToString()


@pytest.mark.parametrize("zipmap", [False, True])
def test_classifier_outputs(zipmap: bool) -> None:
    scorer = Scorer(classifier(zipmap), SPEC, {"opt": 0.25})
    batch = synthetic_batch(SPEC, 20)
    result = scorer.score(batch)
    assert result.labels is not None and set(result.labels) <= {"no", "yes"}
    assert result.scores is not None and all(set(s) == {"no", "yes"} for s in result.scores)
    assert result.values == pytest.approx([s["yes"] for s in result.scores])
    assert [lab for lab in result.labels] == [max(s, key=s.get) for s in result.scores]


def test_single_input_feeds_in_spec_order_with_fill() -> None:
    scorer = Scorer(classifier(False), SPEC, {"opt": 0.25})
    x = scorer.feeds([{"city": "a", "x": 0.5, "n": 3, "flag": True, "opt": None},
                      {"city": "b", "x": 0.1, "n": 0, "flag": False, "opt": 2.0}])["X"]
    assert x.dtype == np.float32
    assert x.tolist() == [[0.5, 3.0, 1.0, 0.25], [pytest.approx(0.1), 0.0, 0.0, 2.0]]


def test_wrong_width_refused() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 3)).astype(np.float32)
    model = to_onnx(LogisticRegression().fit(x, x[:, 0] > 0.5), x[:1]).SerializeToString()
    with pytest.raises(ModelError, match="input_shape"):
        Scorer(model, SPEC)


def test_corrupt_model_refused() -> None:
    with pytest.raises(ModelError, match="loads"):
        Scorer(b"definitely not onnx", SPEC)


def multi_input(names: list[str]) -> bytes:
    """value = x + n (per-feature inputs, [N, 1])."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1]) for n in names]
    node = helper.make_node("Sum", names, ["value"])
    graph = helper.make_graph([node], "m", inputs, [helper.make_tensor_value_info("value",
                                                                                  TensorProto.FLOAT,
                                                                                   [None, 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_multi_input_regression_and_unknown_input() -> None:
    spec = parse_spec({"name": "reg", "features": [{"name": "x", "type": "float"},
                                                   {"name": "n", "type": "int"},
                                                   {"name": "opt", "type": "float",
                                                    "required": False}],
                       "label": {"task": "regression"}})
    scorer = Scorer(multi_input(["x", "opt"]), spec, {"opt": 10.0})
    result = scorer.score([{"x": 1.5, "n": 1, "opt": None}, {"x": 2.0, "n": 1, "opt": 1.0}])
    assert result.values == [11.5, 3.0] and result.labels is None
    with pytest.raises(ModelError, match="input_name"):
        Scorer(multi_input(["x", "nope"]), spec)


def test_regressor_single_input() -> None:
    spec = parse_spec({"name": "reg",
                       "features": [{"name": "x", "type": "float"}, {"name": "y", "type": "float"}],
                       "label": {"task": "regression"}})
    x = np.array([[0, 1], [1, 0], [1, 1]], dtype=np.float32)
    model = to_onnx(LinearRegression().fit(x, [1.0, 2.0, 3.0]), x[:1]).SerializeToString()
    result = Scorer(model, spec).score([{"x": 1.0, "y": 1.0}])
    assert result.values == [pytest.approx(3.0, abs=1e-4)]
