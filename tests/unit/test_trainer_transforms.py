"""Batch learners behind spec transforms: ONNX vs Python parity, Scorer contract, input types."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import onnx
import pytest

from loopline.errors import SpecError
from loopline.models import fill_values, validate_model
from loopline.scoring import Scorer
from loopline.services.trainer.batch import BatchModel, model_inputs
from loopline.services.trainer.transforms import FeatureMap, TransformError
from loopline.spec import PipelineSpec, parse_spec

FEATURES = [
    {"name": "amount", "type": "float", "min": 0, "max": 1000},
    {"name": "hour", "type": "int", "min": 0, "max": 23},
    {"name": "card_present", "type": "bool"},
    {"name": "device_age", "type": "float", "required": False},
    {"name": "country", "type": "string", "values": ["DE", "FR", "GB"]},
]

ALL = [
    {"kind": "log", "features": ["amount"]},
    {"kind": "bucketize", "features": ["hour"], "bounds": [6, 12, 18]},
    {"kind": "one_hot", "features": ["country"]},
    {"kind": "standardize"},
    {"kind": "polynomial", "degree": 2},
]
TRANSFORMS = {
    "standardize": [{"kind": "standardize"}],
    "cubic": [{"kind": "standardize"}, {"kind": "polynomial", "degree": 3}],
    "all": ALL,
}
LABELS = {
    "binary, positive first": {"classes": ["yes", "no"], "positive": "yes"},
    "three classes, one never seen": {"classes": ["no", "maybe", "yes"]},
    "regression": {"task": "regression"},
}


def records(n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    # "XX" is a country the spec does not list: it must encode as all zeros, in Python and ONNX.
    return [
        {
            "amount": rnd.uniform(0, 1000),
            "hour": rnd.randint(0, 23),
            "card_present": rnd.random() < 0.5,
            "device_age": None if rnd.random() < 0.2 else rnd.uniform(-1, 5),
            "country": rnd.choice(["DE", "FR", "GB", "XX"]),
        }
        for _ in range(n)
    ]


def target(r: dict[str, Any], task: str) -> Any:
    # A linear part (amount) lets every learner predict both classes; the rest needs the transforms.
    z = (r["amount"] - 400) / 300 + ((r["hour"] - 12) / 6) ** 2 + (r["country"] == "FR") - 0.5
    if task == "regression":
        return 10 * z + (r["device_age"] or 0)
    return "yes" if z > 0.5 else "no"


def make_spec(label: dict[str, Any], transforms: list[dict[str, Any]], kind: str) -> PipelineSpec:
    return parse_spec(
        {
            "name": "p",
            "features": FEATURES,
            "label": label,
            "trainer": {"transforms": transforms, "learners": [{"kind": kind}]},
        }
    )


# Every transform set with both learner kinds and both input types on the hardest labels (positive
# class listed first, so class order matters), and every label kind on the full transform set.
CASES = [
    (label, transforms, kind, dtype)
    for transforms in sorted(TRANSFORMS)
    for kind in ("linear", "hist_gradient_boosting")
    for label, dtype in (
        ("binary, positive first", np.float32),
        ("three classes, one never seen", np.float64),
    )
]
CASES += [
    (label, "all", kind, np.float32)
    for label in ("regression",)
    for kind in ("linear", "hist_gradient_boosting")
]


@pytest.mark.parametrize(("label", "transforms", "kind", "dtype"), CASES)
def test_onnx_scores_match_python_on_the_reference_rows(
    label: str, transforms: str, kind: str, dtype: Any
) -> None:
    spec = make_spec(LABELS[label], TRANSFORMS[transforms], kind)
    task = spec.label.task
    train = records(600, seed=1)
    fills = fill_values(spec, train)
    model = BatchModel(spec, spec.trainer.learners[0], dtype)
    model.fit(model_inputs(spec, train, fills, dtype), [target(r, task) for r in train])
    onnx_model = model.to_onnx()
    reference = records(400, seed=2)
    # The registry's own validation (ORT load, contract, test batch) accepts it ...
    checked = validate_model(onnx_model, spec, reference)
    scorer = Scorer(onnx_model, spec, checked.fill_values)
    # ... with the deployment's input type: one float tensor, or one per feature with one_hot.
    expected_type = "tensor(float)" if dtype is np.float32 else "tensor(double)"
    inputs = scorer.session.get_inputs()
    assert {i.type for i in inputs if i.name != "country"} == {expected_type}
    assert scorer.single == (transforms != "all")
    result = scorer.score(reference)
    python = model_inputs(spec, reference, checked.fill_values, dtype)
    if task == "regression":
        ours = np.array(model.predict(python))
        # Tree leaves are summed in float by ONNX Runtime's operator: relative, not absolute, 1e-5.
        tol = (
            1e-5 * max(1.0, float(np.abs(ours).max())) if kind == "hist_gradient_boosting" else 1e-5
        )
        assert np.abs(np.array(result.values) - ours).max() < tol
        return
    onnx_scores, py_scores = result.scores or [], model.scores(python)
    classes = spec.label.classes or []
    diff = max(
        abs(a.get(c, 0.0) - b.get(c, 0.0)) for a, b in zip(onnx_scores, py_scores) for c in classes
    )
    assert diff < 1e-5
    assert result.labels == model.predict(python)
    assert (
        len(set(result.labels or [])) == 2
    )  # both seen classes predicted: the test is not vacuous


def test_transforms_compute_what_they_say() -> None:
    spec = make_spec({"classes": ["no", "yes"]}, ALL, "linear")
    train = records(300, seed=3)
    x = model_inputs(spec, train, fill_values(spec, train), np.float64)
    fm = FeatureMap.fit(spec, spec.trainer.transforms, x.x, x.s)
    # amount, card_present, device_age stay numeric; hour becomes 4 buckets; country 3 indicators.
    block = ["amount", "card_present", "device_age"]
    assert fm.columns()[:3] == block and fm.multi_input
    probe = model_inputs(
        spec,
        [
            {
                "amount": np.e - 1,
                "hour": 12,
                "card_present": True,
                "device_age": 2.0,
                "country": "XX",
            }
        ],
        {},
        np.float64,
    )
    z = fm.transform(probe.x, probe.s)[0]
    assert z.size == fm.width == 3 + 6 + 4 + 3  # block, its 6 degree-2 products, buckets, countries
    amount_std = (1.0 - fm.mean[0]) * fm.inv_std[0]  # log(1 + (e - 1)) = 1, then standardized
    assert z[0] == pytest.approx(amount_std)
    assert z[3] == pytest.approx(amount_std**2)  # the first product term is amount * amount
    assert list(z[9:13]) == [0.0, 0.0, 1.0, 0.0]  # hour 12 is in [12, 18)
    assert list(z[13:]) == [0.0, 0.0, 0.0]  # an unknown country is no category


def test_constant_column_and_quantile_buckets() -> None:
    spec = make_spec(
        {"classes": ["no", "yes"]},
        [{"kind": "bucketize", "features": ["amount"], "buckets": 4}, {"kind": "standardize"}],
        "linear",
    )
    train = [dict(r, card_present=True) for r in records(400, seed=4)]
    x = model_inputs(spec, train, fill_values(spec, train), np.float64)
    fm = FeatureMap.fit(spec, spec.trainer.transforms, x.x, x.s)
    assert len(fm.buckets[0]) == 3  # three quartile edges
    assert fm.inv_std[fm.columns().index("card_present")] == 0.0  # constant: scaled to 0, not NaN
    assert np.isfinite(fm.transform(x.x, x.s)).all()


def test_too_many_polynomial_terms_are_refused() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "features": [{"name": f"x{i}", "type": "float"} for i in range(30)],
            "trainer": {"transforms": [{"kind": "polynomial", "degree": 3}]},
            "label": {"classes": ["a", "b"]},
        }
    )
    with pytest.raises(TransformError, match="max_terms"):
        FeatureMap.fit(spec, spec.trainer.transforms, np.zeros((5, 30)))


@pytest.mark.parametrize(
    ("transform", "rule"),
    [
        ({"kind": "one_hot", "features": ["amount"]}, "one_hot needs string features"),
        ({"kind": "log", "features": ["country"]}, "log needs numeric or bool features"),
        ({"kind": "log"}, "a log transform needs `features`"),
        ({"kind": "bucketize", "features": ["hour"], "bounds": [3, 1]}, "strictly ascending"),
        ({"kind": "standardize", "features": ["nope"]}, "'nope', which is not a feature"),
    ],
)
def test_spec_rejects_transforms_that_do_not_fit(transform: dict[str, Any], rule: str) -> None:
    with pytest.raises(SpecError, match=rule):
        parse_spec({"name": "p", "features": FEATURES, "trainer": {"transforms": [transform]}})


def test_exported_model_records_its_learner_for_the_next_tournament() -> None:
    spec = make_spec({"classes": ["no", "yes"]}, TRANSFORMS["cubic"], "hist_gradient_boosting")
    train = records(200, seed=5)
    model = BatchModel(spec, spec.trainer.learners[0]).fit(
        model_inputs(spec, train, {}, np.float64), [target(r, "classification") for r in train]
    )
    props = {p.key: p.value for p in onnx.load_model_from_string(model.to_onnx()).metadata_props}
    assert props["learner"] == "sklearn.hist_gradient_boosting"
    assert '"kind":"hist_gradient_boosting"' in props["loopline.learner"]
