"""Export a trainer learner to ONNX under the inference service's model contract.

One input ``input`` of shape ``[N, k]`` holding the learner's features in spec order (see
``loopline.scoring``), in the float type of the pipeline's deployment (float32 when the champion
takes float32, so shadows and champions are fed alike), cast to double as the graph's first step.
Classifiers output ``label`` (string ``[N]``) and
``probabilities`` (double ``[N, C]``, columns in the spec's class order); regressors output
``variable`` (double ``[N, 1]``). Linear models are exact: standard scaling, one MatMul, then
sigmoid (binary), normalised one-vs-rest sigmoids (multiclass) or identity (regression). Double
precision throughout keeps ONNX Runtime and river within 1e-5 of each other.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from river import compose, multiclass

from loopline.services.trainer.errors import ExportError
from loopline.services.trainer.learner import Learner

OPSET = 17
ML_OPSET = 3
INPUT = "input"
X = "x64"  # the input as double: what every node of the graph reads


def _scaler_arrays(scaler: Any, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    means = np.array([float(scaler.means.get(f, 0.0)) for f in features])
    var = np.array([float(scaler.vars.get(f, 0.0)) for f in features])
    # river maps a feature with zero variance to 0 after scaling: a zero factor does the same.
    inv_std = np.divide(1.0, np.sqrt(var), out=np.zeros_like(var), where=var > 0)
    return means, inv_std


def _linear(model: Any, features: list[str]) -> tuple[np.ndarray, float]:
    weights = model.weights
    return np.array([float(weights.get(f, 0.0)) for f in features]), float(model.intercept)


def _graph_linear(learner: Learner) -> tuple[list[Any], list[Any], list[Any]]:
    pipeline = learner.model
    if not isinstance(pipeline, compose.Pipeline):
        raise ExportError(
            f"cannot export {type(pipeline).__name__}: expected scaler | linear model")
    scaler, model = list(pipeline.steps.values())
    features = learner.features
    means, inv_std = _scaler_arrays(scaler, features)
    inits = [numpy_helper.from_array(means, "mean"), numpy_helper.from_array(inv_std, "inv_std")]
    nodes = [helper.make_node("Sub", [X, "mean"], ["centered"]),
             helper.make_node("Mul", ["centered", "inv_std"], ["scaled"])]
    outputs = []
    if learner.task == "regression":
        w, b = _linear(model, features)
        inits += [numpy_helper.from_array(w.reshape(-1, 1), "W"),
                  numpy_helper.from_array(np.array([b]), "B")]
        nodes += [helper.make_node("MatMul", ["scaled", "W"], ["dot"]),
                  helper.make_node("Add", ["dot", "B"], ["variable"])]
        outputs.append(helper.make_tensor_value_info("variable", TensorProto.DOUBLE, ["N", 1]))
        return nodes, inits, outputs
    classes = learner.classes
    if isinstance(model, multiclass.OneVsRestClassifier):
        cols = [_linear(model.classifiers[c], features) if c in model.classifiers
                else (np.zeros(len(features)), 0.0)
                for c in classes]
        W = np.stack([c[0] for c in cols], axis=1)
        B = np.array([c[1] for c in cols])
        # A class never seen has no binary model in river (probability 0): mask it out.
        present = np.array([1.0 if c in model.classifiers else 0.0 for c in classes])
        inits += [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"),
                  numpy_helper.from_array(present, "present"),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
        nodes += [helper.make_node("MatMul", ["scaled", "W"], ["dot"]),
                  helper.make_node("Add", ["dot", "B"], ["logit"]),
                  helper.make_node("Sigmoid", ["logit"], ["sig"]),
                  helper.make_node("Mul", ["sig", "present"], ["votes"]),
                  helper.make_node("ReduceSum", ["votes", "axis1"], ["total"], keepdims=1),
                  helper.make_node("Div", ["votes", "total"], ["probabilities"])]
    else:
        w, b = _linear(model, features)
        pos = classes.index(learner.positive)  # type: ignore[arg-type]  # a classifier has one
        # Column j gets sign +1 for the positive class, -1 otherwise: sigmoid(-z) = 1 - sigmoid(z).
        sign = np.array([1.0 if j == pos else -1.0 for j in range(len(classes))])
        W = np.outer(w, sign)
        B = b * sign
        inits += [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]
        nodes += [helper.make_node("MatMul", ["scaled", "W"], ["dot"]),
                  helper.make_node("Add", ["dot", "B"], ["logit"]),
                  helper.make_node("Sigmoid", ["logit"], ["probabilities"])]
    nodes += [helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=1, keepdims=0),
              helper.make_node("LabelEncoder", ["label_index"], ["label"], domain="ai.onnx.ml",
                               keys_int64s=list(range(len(classes))), values_strings=classes,
                               default_string="")]
    outputs += [helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]),
                helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE,
                                              ["N", len(classes)])]
    return nodes, inits, outputs


def to_onnx(learner: Learner, name: str = "loopline-trainer",
            input_dtype: Any = np.float64) -> bytes:
    """Serialise ``learner`` as an ONNX model (bytes); raise :class:`ExportError` if unsupported.

    ``input_dtype`` (float32 or float64) is the type of the model's input tensor.
    """
    if learner.kind == "hoeffding_adaptive_tree":
        from loopline.services.trainer.export_tree import tree_graph

        nodes, inits, outputs = tree_graph(learner)
    else:
        nodes, inits, outputs = _graph_linear(learner)
    in_type = TensorProto.FLOAT if np.dtype(input_dtype) == np.float32 else TensorProto.DOUBLE
    nodes = [helper.make_node("Cast", [INPUT], [X], to=TensorProto.DOUBLE), *nodes]
    inputs = [helper.make_tensor_value_info(INPUT, in_type, ["N", len(learner.features)])]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("ai.onnx.ml", ML_OPSET)],
                              producer_name="loopline-trainer",
                              producer_version=_version("river"))
    model.ir_version = 8
    helper.set_model_props(model, {"learner": learner.kind, "features": ",".join(learner.features),
                                   "classes": ",".join(learner.classes)})
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported {learner.kind} model is not valid ONNX: {e}") from e
    return model.SerializeToString()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that trained and exported a model (recorded with the version)."""
    return {f"trainer.{d}": v for d in ("river", "onnx", "numpy") if (v := _version(d))}
