"""The incremental river learner of one pipeline, chosen by ``spec.trainer.learner``, seeded.

Inputs are the spec's numeric and bool features (the single-tensor contract of the inference
service, bool -> 0/1). A missing optional feature is left out of the example: after standard
scaling that is the same as imputing the running mean, which is what the served model's fill
value (the reference mean) does too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from river import compose, linear_model, multiclass, optim, preprocessing, tree

from loopline.services.trainer.errors import LearnerError
from loopline.spec import PipelineSpec

#: Learners whose export to ONNX is exact (a parity test holds them to 1e-5).
LINEAR = ("logistic_regression", "linear_regression")


def input_features(spec: PipelineSpec) -> list[str]:
    """The features the learner uses, in spec order (numeric and bool; strings are not modelled)."""
    names = [f.name for f in spec.features if f.type != "string"]
    if not names:
        raise LearnerError(f"pipeline {spec.name}: the trainer needs at least one numeric or bool "
                           "feature (rule: tabular_features)")
    return names


def classes_of(spec: PipelineSpec) -> list[str]:
    """The class names of a classification pipeline, in spec order."""
    classes = list(spec.label.classes or [])
    if spec.label.task == "classification" and len(classes) < 2:
        raise LearnerError(f"pipeline {spec.name}: label.classes must list the classes for the "
                           "trainer (rule: classes)")
    return classes


def positive_class(spec: PipelineSpec) -> str:
    """The positive class of a binary pipeline (label.positive, else the last class)."""
    classes = classes_of(spec)
    return spec.label.positive or classes[-1]


def make_learner(spec: PipelineSpec) -> Any:
    """A fresh river model for ``spec.trainer.learner``
    (deterministic given ``spec.trainer.seed``)."""
    cfg = spec.trainer
    task = spec.label.task
    if cfg.learner == "hoeffding_adaptive_tree":
        if task == "regression":
            return tree.HoeffdingAdaptiveTreeRegressor(seed=cfg.seed, leaf_prediction="mean")
        # Majority-class leaves keep the served tree a pure function of the split structure.
        return tree.HoeffdingAdaptiveTreeClassifier(seed=cfg.seed, leaf_prediction="mc")
    if cfg.learner == "linear_regression":
        if task != "regression":
            raise LearnerError(f"pipeline {spec.name}: trainer.learner linear_regression needs "
                               "label.task regression (rule: learner_fits_task)")
        model: Any = linear_model.LinearRegression(optimizer=optim.SGD(cfg.learning_rate),
                                                   intercept_lr=cfg.learning_rate)
    else:
        if task != "classification":
            raise LearnerError(f"pipeline {spec.name}: trainer.learner logistic_regression needs "
                               "label.task classification (rule: learner_fits_task)")
        binary = linear_model.LogisticRegression(optimizer=optim.SGD(cfg.learning_rate),
                                                 intercept_lr=cfg.learning_rate)
        model = binary if len(classes_of(spec)) == 2 else multiclass.OneVsRestClassifier(binary)
    return compose.Pipeline(preprocessing.StandardScaler(), model)


class Learner:
    """A river model plus the mapping between feature records / labels and river's inputs."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.features = input_features(spec)
        self.task = spec.label.task
        self.classes = classes_of(spec) if self.task == "classification" else []
        self.positive = positive_class(spec) if self.task == "classification" else None
        self.binary_linear = (spec.trainer.learner == "logistic_regression"
                              and len(self.classes) == 2)
        self.kind = spec.trainer.learner
        self.model = make_learner(spec)
        self.learned = 0

    def x(self, record: Mapping[str, Any]) -> dict[str, float]:
        """The river input of one feature record (missing optional features are left out)."""
        out = {}
        for name in self.features:
            v = record.get(name)
            if v is not None:
                out[name] = float(v)
        return out

    def y(self, label: Any) -> Any:
        """River's target for a label (bool for binary logistic regression)."""
        if self.task == "regression":
            return float(label)
        if self.binary_linear:
            return label == self.positive
        return label

    def learn(self, record: Mapping[str, Any], label: Any) -> None:
        """Learn one labeled example."""
        self.model.learn_one(self.x(record), self.y(label))
        self.learned += 1

    def predict_proba(self, records: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        """Class probabilities per record, columns in ``self.classes`` order."""
        out = []
        for r in records:
            p = self.model.predict_proba_one(self.x(r))
            if self.binary_linear:
                out.append([p.get(c == self.positive, 0.0) for c in self.classes])
            else:
                out.append([p.get(c, 0.0) for c in self.classes])
        return out

    def predict(self, records: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Predicted label (classification) or value (regression) per record."""
        if self.task == "regression":
            return [float(self.model.predict_one(self.x(r)) or 0.0) for r in records]
        return [self.classes[max(range(len(row)), key=row.__getitem__)]
                for row in self.predict_proba(records)]
