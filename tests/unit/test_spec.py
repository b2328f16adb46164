"""Pipeline spec validation: valid examples load, each broken spec names its field and rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from loopline.errors import SpecError
from loopline.spec import load_spec, parse_spec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def minimal(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "demo", "features": [{"name": "x", "type": "float"}]}
    spec.update(changes)
    return spec


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.topics.raw == f"loopline.{spec.name}.raw"


def test_defaults_fill_sections() -> None:
    spec = parse_spec(minimal())
    assert spec.unknown_fields == "reject"
    assert spec.trainer.learner == "logistic_regression"
    assert spec.features[0].required


BAD = [
    (minimal(name="Bad.Name"), "name", "string_pattern_mismatch"),
    (minimal(features=[]), "features", "too_short"),
    (minimal(features=[{"name": "x", "type": "floot"}]), "features[x].type", "literal_error"),
    (minimal(features=[{"name": "x", "type": "string", "min": 1}]), "features[x]", "value_error"),
    (minimal(features=[{"name": "x", "type": "float", "min": 5, "max": 1}]), "features[x]",
     "value_error"),
    (minimal(features=[{"name": "x", "type": "float"}, {"name": "x", "type": "int"}]), "features",
     "value_error"),
    (minimal(features=[{"name": "bad name", "type": "float"}]), "features[bad name].name",
     "string_pattern_mismatch"),
    (minimal(key="nope"), "(top level)", "value_error"),
    (minimal(deployment={"canary_fraction": 2}), "deployment.canary_fraction", "less_than_equal"),
    (minimal(monitor={"psi_warning": 0.5, "psi_alert": 0.2}), "monitor", "value_error"),
    (minimal(label={"task": "regression", "classes": ["a", "b"]}), "label", "value_error"),
    (minimal(trainer={"learner": "svm"}), "trainer.learner", "literal_error"),
    (minimal(surprise=1), "surprise", "extra_forbidden"),
]


@pytest.mark.parametrize(("data", "field", "rule"), BAD, ids=[f"{f}:{r}" for _, f, r in BAD])
def test_bad_specs_name_field_and_rule(data: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(data, "bad.yaml")
    assert (field, rule) in [(f, r) for f, r, _ in info.value.problems]
    text = str(info.value)
    assert text.startswith("bad.yaml: invalid pipeline spec")
    assert field in text and rule in text


def test_every_problem_is_reported_at_once() -> None:
    data = minimal(name="X", deployment={"canary_fraction": -1}, extra=True)
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert {f for f, _, _ in info.value.problems} == {"name", "deployment.canary_fraction", "extra"}


def test_yaml_syntax_error_gives_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: a\nfeatures: [\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (where, rule, _), = info.value.problems
    assert rule == "yaml" and where.startswith("line 3")


@pytest.mark.parametrize("content", ["- a\n- b\n", "just text\n", ""])
def test_non_mapping_document(tmp_path: Path, content: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(content)
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(path)


def test_missing_file() -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec("/nonexistent/spec.yaml")


def test_canonical_json_round_trips_and_hash_is_stable() -> None:
    from loopline.spec import spec_from_json

    spec = load_spec(EXAMPLES[0])
    again = spec_from_json(spec.canonical_json())
    assert again == spec and again.sha256() == spec.sha256()
    reordered = yaml.safe_load(EXAMPLES[0].read_text())
    assert parse_spec(dict(reversed(list(reordered.items())))).sha256() == spec.sha256()


def test_generated_feature_schema_marks_optional_fields_nullable() -> None:
    spec = parse_spec(minimal(features=[{"name": "a", "type": "int"},
                                        {"name": "b", "type": "string", "required": False}]))
    fields = {f["name"]: f for f in spec.features_schema()["fields"]}["features"]["type"]["fields"]
    assert fields == [{"name": "a", "type": "long"},
                      {"name": "b", "type": ["null", "string"], "default": None}]
