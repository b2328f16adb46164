"""Windowed batch learners: scikit-learn estimators fitted on the newest labeled examples, exported
with skl2onnx behind the feature transforms, under the inference service's model contract.

The exported graph: the pipeline's inputs in the champion's float type (one ``input`` tensor
``[N, k]``, or one ``[N, 1]`` tensor per feature when strings are one-hot encoded), cast to
double, the fitted :class:`FeatureMap`, then the estimator as skl2onnx converts it (double for
linear models, which is exact; float for boosted trees, whose ONNX operator computes in float),
then a head that orders the probabilities as the Scorer will name them (see
:attr:`BatchModel.out_classes`) and derives ``label`` from them. Regressors output
``variable`` ``[N, 1]``.
:meth:`BatchModel.predict_proba` computes the same numbers in Python, which is what the parity
test compares with ONNX Runtime.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from loopline.services.trainer.errors import BatchError
from loopline.services.trainer.transforms import FeatureMap, Graph
from loopline.spec import BatchLearner, PipelineSpec

OPSET = 17
ML_OPSET = 3
_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}


@dataclass
class Inputs:
    """A batch of records as the exported model will see them: numbers (rounded through the input
    float type, missing optional values filled) and the raw strings."""

    x: np.ndarray  # [N, k] double
    s: dict[str, list[str]]


def model_inputs(
    spec: PipelineSpec, records: Sequence[Mapping[str, Any]], fills: Mapping[str, float], dtype: Any
) -> Inputs:
    """The numeric matrix and string columns of ``records``, as the Scorer would feed them."""
    numeric = [f.name for f in spec.features if f.type != "string"]
    optional = [
        j for j, f in enumerate(f for f in spec.features if f.type != "string") if not f.required
    ]
    get = operator.itemgetter(*numeric)
    rows = [get(r) if len(numeric) > 1 else (get(r),) for r in records]
    x = np.array(rows, dtype=dtype).reshape(len(records), len(numeric))
    if optional:
        fill = np.array([fills.get(numeric[j], np.nan) for j in optional], dtype=dtype)
        sub = x[:, optional]
        nan = np.isnan(sub)
        if nan.any():
            sub[nan] = np.broadcast_to(fill, sub.shape)[nan]
            x[:, optional] = sub
    strings = {
        f.name: ["" if r.get(f.name) is None else str(r[f.name]) for r in records]
        for f in spec.features
        if f.type == "string"
    }
    return Inputs(x.astype(np.float64), strings)


def one_thread() -> Any:
    """Run scikit-learn's OpenMP/BLAS code on one thread.

    The trainer shares its machine with the broker and the other services: boosting on a few
    thousand rows with every core spin-waiting took 1-7 s on a busy 2-core host, 0.1 s on one.
    """
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    return threadpool_limits(limits=1)


def _estimator(cfg: BatchLearner, task: str, seed: int) -> Any:
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,  # heavy import
        HistGradientBoostingRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge

    if cfg.kind == "linear":
        if task == "regression":
            return Ridge(alpha=cfg.l2)
        return LogisticRegression(C=1.0 / cfg.l2, max_iter=2000)
    common = {
        "max_iter": cfg.max_iter,
        "max_leaf_nodes": cfg.max_leaf_nodes,
        "learning_rate": cfg.learning_rate,
        "min_samples_leaf": cfg.min_samples_leaf,
        "early_stopping": False,
        "random_state": seed,
    }
    if task == "regression":
        return HistGradientBoostingRegressor(**common)
    return HistGradientBoostingClassifier(**common)


class BatchModel:
    """One fitted batch learner: transforms + estimator, scored in Python or exported to ONNX."""

    def __init__(self, spec: PipelineSpec, cfg: BatchLearner, dtype: Any = np.float64) -> None:
        self.spec = spec
        self.cfg = cfg
        self.task = spec.label.task
        self.classes = list(spec.label.classes or [])
        self.dtype = np.dtype(dtype)
        self.transforms = [*spec.trainer.transforms, *cfg.transforms]
        self.fmap: FeatureMap | None = None
        self.estimator: Any = None
        self.trained = 0

    @property
    def name(self) -> str:
        """The learner's name in scorecards."""
        return self.cfg.label()

    @property
    def _float_trees(self) -> bool:
        # ONNX's tree-ensemble operators compare and sum in float: train on what they will see.
        return self.cfg.kind == "hist_gradient_boosting"

    def _z(self, inputs: Inputs) -> np.ndarray:
        assert self.fmap is not None
        z = self.fmap.transform(inputs.x, inputs.s)
        return z.astype(np.float32).astype(np.float64) if self._float_trees else z

    def fit(self, inputs: Inputs, targets: Sequence[Any]) -> BatchModel:
        """Fit transforms and estimator on a window; raise :class:`BatchError` if impossible."""
        keep = ~np.isnan(inputs.x).any(axis=1)  # a required value that was missing: not learnable
        if not keep.all():
            idx = np.flatnonzero(keep).tolist()
            inputs = Inputs(inputs.x[idx], {k: [v[i] for i in idx] for k, v in inputs.s.items()})
            targets = [targets[i] for i in idx]
        if len(targets) < 2:
            raise BatchError(
                f"{self.name}: {len(targets)} usable example(s) in the window (rule: min_examples)"
            )
        y = (
            np.array([float(t) for t in targets])
            if self.task == "regression"
            else np.array([str(t) for t in targets], dtype=object)
        )
        if self.task == "classification" and len(set(y.tolist())) < 2:
            raise BatchError(
                f"{self.name}: the window holds a single class {y[0]!r} (rule: two_classes)"
            )
        self.fmap = FeatureMap.fit(self.spec, self.transforms, inputs.x, inputs.s)
        self.estimator = _estimator(self.cfg, self.task, self.spec.trainer.seed)
        with warnings.catch_warnings(), one_thread():
            # lbfgs may stop at max_iter on separable windows; the holdout judges the result anyway.
            warnings.simplefilter("ignore")
            self.estimator.fit(self._z(inputs), y)
        self.trained = len(targets)
        return self

    # ---- Python scoring (the parity reference) -------------------------------------------------
    @property
    def out_classes(self) -> list[str]:
        """The classes of the probability columns, in order.

        The Scorer names the columns after the first ``classlabels_*`` attribute in the graph, else
        after the spec's classes. skl2onnx's tree operator carries the estimator's classes (sorted,
        only those in the window), so tree models keep that order; linear ones (double precision,
        no such attribute) output the spec's order, a class missing from the window scoring 0.
        """
        if self._float_trees:
            return [str(c) for c in self.estimator.classes_]
        return self.classes

    def _order(self) -> np.ndarray:
        """Per output class, its column in the estimator's probabilities (absent: zero column)."""
        have = [str(c) for c in self.estimator.classes_]
        return np.array(
            [have.index(c) if c in have else len(have) for c in self.out_classes], dtype=np.int64
        )

    def predict_proba(self, inputs: Inputs) -> np.ndarray:
        """Class probabilities [N, C] in :attr:`out_classes` order, as the exported graph does."""
        with one_thread():
            p = self.estimator.predict_proba(self._z(inputs))
        padded = np.concatenate([p, np.zeros((p.shape[0], 1))], axis=1)
        return padded[:, self._order()]

    def scores(self, inputs: Inputs) -> list[dict[str, float]]:
        """Per record, class -> probability (the Scorer's ``scores``)."""
        return [dict(zip(self.out_classes, row)) for row in self.predict_proba(inputs).tolist()]

    def predict(self, inputs: Inputs) -> list[Any]:
        """Labels (classification: the most probable output class) or values (regression)."""
        if self.task == "regression":
            with one_thread():
                return [float(v) for v in self.estimator.predict(self._z(inputs))]
        probs = self.predict_proba(inputs)
        return [self.out_classes[i] for i in probs.argmax(axis=1)]

    # ---- ONNX ---------------------------------------------------------------------------------
    def to_onnx(self, name: str = "loopline-trainer") -> bytes:
        """The fitted learner as an ONNX model (bytes) under the inference contract."""
        if self.fmap is None:
            raise BatchError(f"{self.name}: not fitted")
        g = Graph("lp_")
        inputs, x, strings = self._inputs(g)
        z = self.fmap.graph(g, x, strings)
        est = _convert(
            self.estimator,
            self.fmap.width,
            double=not self._float_trees,
            classification=self.task == "classification",
        )
        if self._float_trees:
            z = g.op("Cast", [z], "z_float", to=TensorProto.FLOAT)
        g.op("Identity", [z], out="sk_Z")
        taken = {i.name for i in inputs}
        head = Graph("lh_")  # after the estimator's nodes: ONNX wants them topologically sorted
        if self.task == "regression":
            out_name = _free("variable", taken)
            head.op("Cast", [est.graph.output[0].name], out=out_name, to=TensorProto.DOUBLE)
            outputs = [helper.make_tensor_value_info(out_name, TensorProto.DOUBLE, ["N", 1])]
        else:
            from loopline.scoring import graph_class_labels

            named = graph_class_labels(est.SerializeToString())
            if named is not None and named != self.out_classes:
                raise BatchError(
                    f"{self.name}: the graph names classes {named}, expected {self.out_classes}"
                )
            outputs = self._head(head, est.graph.output[1].name, taken)
        graph = helper.make_graph(
            [*g.nodes, *est.graph.node, *head.nodes],
            name,
            inputs,
            outputs,
            initializer=[*g.inits, *est.graph.initializer, *head.inits],
        )
        opsets = {"": OPSET, "ai.onnx.ml": ML_OPSET}
        for o in est.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
            producer_name="loopline-trainer",
            producer_version=_version("scikit-learn"),
        )
        model.ir_version = 8
        helper.set_model_props(
            model,
            {
                "learner": self.name,
                "loopline.learner": orjson.dumps(self.cfg.model_dump(mode="json")).decode(),
                "features": ",".join(self.fmap.numeric + self.fmap.strings),
                "classes": ",".join(self.classes),
                "columns": ",".join(self.fmap.columns()),
            },
        )
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise BatchError(f"exported {self.name} model is not valid ONNX: {e}") from e
        return model.SerializeToString()

    def _inputs(self, g: Graph) -> tuple[list[Any], str, dict[str, str]]:
        """Graph inputs in the deployment's float type; the double matrix and the string inputs."""
        assert self.fmap is not None
        ftype = _ONNX_TYPES[self.dtype]
        if not self.fmap.multi_input:
            inputs = [helper.make_tensor_value_info("input", ftype, ["N", len(self.fmap.numeric)])]
            return inputs, g.op("Cast", ["input"], "x64", to=TensorProto.DOUBLE), {}
        inputs, cols, strings = [], [], {}
        for f in self.spec.features:
            if f.type == "string":
                if f.name in self.fmap.strings:
                    inputs.append(
                        helper.make_tensor_value_info(f.name, TensorProto.STRING, ["N", 1])
                    )
                    strings[f.name] = f.name
                continue
            inputs.append(helper.make_tensor_value_info(f.name, ftype, ["N", 1]))
            cols.append(g.op("Cast", [f.name], f"{f.name}_64", to=TensorProto.DOUBLE))
        x = g.op("Concat", cols, "x64", axis=1) if len(cols) > 1 else cols[0]
        return inputs, x, strings

    def _head(self, g: Graph, probs: str, taken: set[str]) -> list[Any]:
        """Probabilities in spec class order and the label of the most probable class."""
        p = g.op("Cast", [probs], "p64", to=TensorProto.DOUBLE)
        padded = g.op(
            "Pad",
            [
                p,
                g.const(np.array([0, 0, 0, 1], dtype=np.int64), "pads"),
                g.const(np.array(0.0), "pad_value"),
            ],
            "padded_p",
            mode="constant",
        )
        prob_name, label_name = _free("probabilities", taken), _free("label", taken)
        g.op("Gather", [padded, g.const(self._order(), "class_order")], out=prob_name, axis=1)
        idx = g.op("ArgMax", [prob_name], "label_index", axis=1, keepdims=0)
        classes = self.out_classes
        g.op(
            "LabelEncoder",
            [idx],
            out=label_name,
            domain="ai.onnx.ml",
            keys_int64s=list(range(len(classes))),
            values_strings=classes,
            default_string="",
        )
        return [
            helper.make_tensor_value_info(label_name, TensorProto.STRING, ["N"]),
            helper.make_tensor_value_info(prob_name, TensorProto.DOUBLE, ["N", len(classes)]),
        ]


def _free(name: str, taken: set[str]) -> str:
    """An output name that no input uses (a multi-input model's inputs are named after features)."""
    return name if name not in taken else f"output_{name}"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


# ---- skl2onnx ----------------------------------------------------------------------------------
def _int_list(v: Any) -> Any:
    """A list of bools / numpy integers as plain ints (protobuf >= 7 refuses bools there)."""
    if isinstance(v, list) and v and all(isinstance(i, (bool, np.bool_, np.integer)) for i in v):
        return [int(i) for i in v]
    return v


def _tree_converter(alias: str) -> Any:
    """skl2onnx's own tree converter, with its leaves' boolean attribute values passed as ints.

    skl2onnx 1.20 writes ``nodes_missing_value_tracks_true=False`` for leaves, which protobuf 7
    rejects; the workaround is per call (``custom_conversion_functions``), nothing global.
    """
    from skl2onnx.common._registration import get_converter

    original = get_converter(alias)

    def convert(scope: Any, operator: Any, container: Any) -> None:
        add_node = container.add_node

        def add(*args: Any, **attrs: Any) -> Any:
            return add_node(*args, **{k: _int_list(v) for k, v in attrs.items()})

        container.add_node = add
        try:
            original(scope, operator, container)
        finally:
            del container.add_node

    return convert


def _convert(estimator: Any, width: int, *, double: bool, classification: bool) -> Any:
    """The estimator alone as an ONNX model reading ``sk_Z``; every name prefixed ``sk_``."""
    from skl2onnx import convert_sklearn  # heavy import
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    tensor = DoubleTensorType if double else FloatTensorType
    options = {id(estimator): {"zipmap": False}} if classification else None
    custom = None
    if type(estimator).__name__.startswith("HistGradientBoosting"):
        custom = {type(estimator): _tree_converter(f"Sklearn{type(estimator).__name__}")}
    try:
        model = convert_sklearn(
            estimator,
            initial_types=[("Z", tensor([None, width]))],
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
            options=options,
            custom_conversion_functions=custom,
        )
    except Exception as e:  # skl2onnx raises many kinds
        raise BatchError(f"skl2onnx cannot convert {type(estimator).__name__}: {e}") from e
    _prefix(model.graph, "sk_")
    return model


def _prefix(graph: Any, prefix: str) -> None:
    """Rename every value and node of ``graph`` with ``prefix`` (it merges without collisions)."""

    def ren(n: str) -> str:
        return prefix + n if n else n

    for node in graph.node:
        node.input[:] = [ren(n) for n in node.input]
        node.output[:] = [ren(n) for n in node.output]
        node.name = ren(node.name)
    for init in graph.initializer:
        init.name = ren(init.name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = ren(value.name)
