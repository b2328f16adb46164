"""Every registry record is checked before it changes the state: field and rule for each failure."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from loopline import avro
from loopline.errors import SpecError
from loopline.registry import (
    RegistryRecordError,
    RegistryState,
    RejectedRecord,
    model_version_key,
    spec_event,
    stage_change_key,
)
from loopline.spec import parse_spec
from loopline.topics import check_model_name, check_pipeline_name

SPEC = parse_spec({"name": "fraud", "features": [
    {"name": "amount", "type": "float"}, {"name": "opt", "type": "float", "required": False},
    {"name": "city", "type": "string"}], "label": {"classes": ["0", "1"]}})
SHA = "ab" * 32


def model_event(version: int = 1, **changes: Any) -> dict[str, Any]:
    model = {"name": "fraud", "version": version, "sha256": SHA, "uri": "file:///store/x.onnx",
             "stage": "champion", "traffic": 1.0, "parent": None, "created_at": 1,
             "library_versions": {}, "metrics": {"auc": float("nan")},
             "reference_profile_json": None,
             "training_ranges": [], "trigger": None, "scorecard_json": None,
             "fill_values": {"opt": 0.5}, "input_features": ["amount", "opt"]}
    model.update(changes)
    return {"kind": "model_version", "pipeline": "fraud", "at": 1, "spec": None, "model": model,
            "stage_change": None}


def stage_event(version: int = 1, **changes: Any) -> dict[str, Any]:
    change = {"name": "fraud", "version": version, "from_stage": "champion",
              "to_stage": "challenger", "traffic": 0.2, "reason": "test", "actor": "test"}
    change.update(changes)
    return {"kind": "stage_change", "pipeline": "fraud", "at": 2, "spec": None, "model": None,
            "stage_change": change}


def deployed() -> RegistryState:
    """fraud's spec and its champion v1, applied with the keys Loopline gives them."""
    state = RegistryState()
    key, event = spec_event(SPEC)
    state.apply(event, 0, key)
    state.apply(model_event(), 1, model_version_key("fraud", "fraud", 1))
    return state


def with_spec(**changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(spec_event(SPEC)[1])
    event["spec"].update(changes)
    return event


def respec(data: dict[str, Any]) -> dict[str, Any]:
    """A pipeline_spec event for the spec document ``data``, consistent in every other way."""
    spec = parse_spec(data)
    return spec_event(spec)[1]


SPEC_DOC = orjson.loads(SPEC.canonical_json())
NOT_AVRO = orjson.dumps({"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]})
OTHER_FIELDS = orjson.dumps(avro.with_features("features", [{"name": "amount", "type": "double"}]))

Case = tuple[str, Callable[[], dict[str, Any]], str, str]
CASES: list[Case] = [
    ("spec_json not JSON", lambda: with_spec(spec_json="{not json"), "spec.spec_json", "json"),
    ("spec without features", lambda: with_spec(spec_json=orjson.dumps(
        dict(SPEC_DOC, features=[])).decode()), "spec.spec_json.features", "too_short"),
    ("spec of another pipeline",
     lambda: dict(respec(dict(SPEC_DOC, name="other")), pipeline="fraud"),
     "spec.spec_json.name", "name_match"),
    ("spec_sha256 wrong", lambda: with_spec(spec_sha256="0" * 64), "spec.spec_sha256",
     "sha256_match"),
    ("features schema not JSON", lambda: with_spec(features_schema_json="]"),
     "spec.features_schema_json", "json"),
    ("features schema not Avro", lambda: with_spec(features_schema_json=NOT_AVRO.decode()),
     "spec.features_schema_json", "avro_schema"),
    ("features schema of other features",
     lambda: with_spec(features_schema_json=OTHER_FIELDS.decode()),
     "spec.features_schema_json", "features_match"),
    ("feature type changed", lambda: respec(dict(SPEC_DOC, features=[
        {"name": "amount", "type": "string"}, {"name": "city", "type": "string"}])),
     "spec.spec_json.features", "backward_compatible"),
    ("pipeline name", lambda: dict(model_event(), pipeline="Fraud.Prod"), "pipeline", "pattern"),
    ("negative time", lambda: dict(model_event(2), at=-5), "at", "min"),
    ("payload missing", lambda: dict(model_event(), model=None), "model", "required"),
    ("unknown pipeline", lambda: dict(model_event(), pipeline="nobody"), "pipeline",
     "known_pipeline"),
    ("model name", lambda: model_event(2, name="a/b"), "model.name", "pattern"),
    ("version 0", lambda: model_event(0), "model.version", "min"),
    ("sha256 not hex", lambda: model_event(2, sha256="../../etc/passwd"), "model.sha256",
     "sha256_format"),
    ("sha256 with newline", lambda: model_event(2, sha256=SHA[:63] + "\n"), "model.sha256",
     "sha256_format"),
    ("unknown stage", lambda: model_event(2, stage="boss"), "model.stage", "stage"),
    ("traffic 7", lambda: model_event(2, traffic=7.0), "model.traffic", "range"),
    ("traffic NaN", lambda: model_event(2, traffic=float("nan")), "model.traffic", "range"),
    ("uri too long", lambda: model_event(2, uri="x" * 5000), "model.uri", "max_length"),
    ("fill of no feature", lambda: model_event(2, fill_values={"ghost": 1.0}), "model.fill_values",
     "known_feature"),
    ("fill NaN", lambda: model_event(2, fill_values={"opt": float("nan")}), "model.fill_values.opt",
     "finite"),
    ("string input feature", lambda: model_event(2, input_features=["city"]),
     "model.input_features", "input_features"),
    ("profile not JSON", lambda: model_event(2, reference_profile_json="{"),
     "model.reference_profile_json", "json"),
    ("scorecard not an object", lambda: model_event(2, scorecard_json="[1]"),
     "model.scorecard_json", "json"),
    ("training range backwards", lambda: model_event(2, training_ranges=[
        {"topic": "t", "partition": 0, "first_offset": 9, "last_offset": 3, "count": 1}]),
     "model.training_ranges[0]", "range"),
    ("same version, other artifact", lambda: model_event(1, sha256="cd" * 32), "model.sha256",
     "immutable_version"),
    ("traffic overbooked", lambda: model_event(2, stage="canary", traffic=0.6), "model.traffic",
     "traffic_sum"),
    ("stage change of no version", lambda: stage_event(7), "stage_change.version", "known_version"),
    ("stage change to no stage", lambda: stage_event(to_stage="boss"), "stage_change.to_stage",
     "stage"),
    ("stage change from no stage", lambda: stage_event(from_stage="x"), "stage_change.from_stage",
     "stage"),
    ("stage change traffic", lambda: stage_event(traffic=-1.0), "stage_change.traffic", "range"),
]


def overbook(state: RegistryState) -> None:
    """A challenger with 0.5 of the traffic, so that another 0.6 overbooks it."""
    state.apply(model_event(3, stage="challenger", traffic=0.5, sha256="ef" * 32), 2)


def snapshot(state: RegistryState) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in vars(state).items() if k != "rejected"})


@pytest.mark.parametrize(("event", "field", "rule"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_an_invalid_record_names_field_and_rule_and_changes_nothing(
        event: Callable[[], dict[str, Any]], field: str, rule: str) -> None:
    state = deployed()
    overbook(state)
    before = snapshot(state)
    with pytest.raises(RegistryRecordError) as info:
        state.apply(event(), 9)
    assert (info.value.field, info.value.rule) == (field, rule), str(info.value)
    assert f"(rule: {rule})" in str(info.value)
    assert snapshot(state) == before


def test_keys_must_be_the_ones_loopline_gives() -> None:
    state = deployed()
    with pytest.raises(RegistryRecordError, match="key_match"):
        # v2 under v1's key: compaction would drop the real v1
        state.apply(model_event(2), 2, model_version_key("fraud", "fraud", 1))
    with pytest.raises(RegistryRecordError, match="key_match"):
        state.apply(stage_event(), 2, b"pipeline/fraud/model/fraud/1")
    key, event = spec_event(SPEC)
    with pytest.raises(RegistryRecordError, match="key_match"):
        state.apply(event, 2, key + b"x")
    state.apply(stage_event(), 3, stage_change_key("fraud", "fraud", 1))
    assert state.versions[("fraud", "fraud", 1)]["stage"] == "challenger"


def test_records_loopline_writes_pass_and_fold_with_avro_defaults() -> None:
    state = deployed()
    sparse = model_event(2, stage="shadow", traffic=0.0)
    for k in ("parent", "metrics", "training_ranges", "fill_values", "input_features",
              "scorecard_json"):
        del sparse["model"][k]
    state.apply(sparse, 2, model_version_key("fraud", "fraud", 2))
    assert state.versions[("fraud", "fraud", 2)]["fill_values"] == {}
    state.apply(stage_event(2, from_stage="shadow", to_stage="canary", traffic=0.1), 3)
    assert state.versions[("fraud", "fraud", 2)]["stage"] == "canary"
    assert [h[4] for h in state.stage_history] == ["champion", "shadow", "canary"]
    extra = {"name": "extra", "type": "int", "required": False}
    evolved = parse_spec(dict(SPEC_DOC, features=[*SPEC_DOC["features"], extra]))
    key, event = spec_event(evolved)
    state.apply(event, 4, key)
    assert state.specs["fraud"] == evolved and len(state.features_schemas["fraud"]) == 2
    assert state.offset == 4


def rejected(key: bytes | None = b"k", value: bytes | None = b"\x00\x01",
             offset: int = 5) -> RejectedRecord:
    return RejectedRecord(topic="loopline.models", partition=0, offset=offset, timestamp_ms=123,
                          key=key, value=value, kind=None, pipeline=None, field="value",
                          rule="schema", message="not an Avro single-object message")


def test_rejected_record_ident_is_stable_and_it_dead_letters() -> None:
    a, b = rejected(offset=5), rejected(offset=77)  # the same record re-read on a new broker
    assert a.ident == b.ident and len(a.ident) == 32
    assert rejected(key=None).ident != rejected(key=b"").ident
    assert rejected(value=None).ident != rejected(value=b"").ident
    letter = a.deadletter("monitor", at=9)
    decoded = avro.codec("deadletter").decode(avro.codec("deadletter").encode(letter))
    assert decoded["original"] == b"\x00\x01" and decoded["original_key"] == b"k"
    assert decoded["source"] == {"topic": "loopline.models", "partition": 0, "offset": 5}
    assert (decoded["field"], decoded["rule"], decoded["service"]) == ("value", "schema", "monitor")
    assert "offset 5" in a.summary() and "(rule: schema)" in a.summary()
    assert len(rejected(key=b"k" * 10_000).summary()) <= 303


@pytest.mark.parametrize("name", ["Fraud", "a.b", "a/b", "", "x" * 65, "ok\n", "-a", "1a"])
def test_one_name_pattern_for_pipelines_and_models(name: str) -> None:
    for check in (check_pipeline_name, check_model_name):
        with pytest.raises(SpecError, match=r"rule: pattern") as info:
            check(name)
        assert "\n" not in str(info.value).rstrip()
    assert check_model_name("fraud-v2_b") == "fraud-v2_b"
