"""What a valid registry record is: every rule a ``loopline.models`` record must pass to be applied.

The registry topic is untrusted input (any Kafka client can write it), so every reader checks
each decoded record against these rules before it changes any state. A rule that fails raises
:class:`RegistryRecordError` naming the field and the rule; the reader skips the record and
reports it (see :class:`loopline.registry.RejectedRecord`). The rules are the ones Loopline's own
writers already follow (``loopline apply``, :class:`loopline.models.ModelRegistry`), so nothing
Loopline writes is ever rejected.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import fastavro
import orjson

from loopline import avro
from loopline.artifacts import SHA256_HEX
from loopline.errors import RegistryRecordError, SpecError
from loopline.spec import PipelineSpec, parse_spec
from loopline.topics import PIPELINE_NAME, valid_name

if TYPE_CHECKING:
    from loopline.registry import RegistryState

#: Stages in which a version takes (or mirrors) traffic.
SERVING = ("champion", "challenger", "canary", "shadow")
STAGES = (*SERVING, "candidate", "rejected", "retired")
TRAFFIC_STAGES = ("challenger", "canary")

#: The payload field each kind must carry.
PAYLOAD = {"pipeline_spec": "spec", "model_version": "model", "stage_change": "stage_change",
           "rebaseline": "rebaseline"}
MAX_TEXT = 4096  # uri, parent, trigger, reason, actor: informational, bounded all the same

# The Avro defaults of schemas/registry.avsc: a decoded record always has these fields, an event
# built in Python (tests, benchmarks) may leave them out, as Avro would let it.
_MODEL_DEFAULTS: dict[str, Any] = {
    "traffic": 0.0, "parent": None, "library_versions": {}, "metrics": {},
    "reference_profile_json": None, "training_ranges": [], "trigger": None, "scorecard_json": None,
    "fill_values": {}, "input_features": []}
_STAGE_CHANGE_DEFAULTS: dict[str, Any] = {"from_stage": None, "traffic": 0.0, "reason": "",
                                          "actor": "cli"}


def _fail(field: str, rule: str, message: str) -> NoReturn:
    raise RegistryRecordError(field, rule, message)


def show(value: object, limit: int = 80) -> str:
    """``repr`` of a value from a record, cut to ``limit`` characters (records are untrusted)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def spec_key(pipeline: str, spec_sha256: str) -> bytes:
    """The key of one pipeline spec version (one per version: compaction keeps them all)."""
    return f"pipeline/{pipeline}/spec/{spec_sha256}".encode()


def model_version_key(pipeline: str, name: str, version: int) -> bytes:
    """The key of one model version record."""
    return f"pipeline/{pipeline}/model/{name}/{version}".encode()


def stage_change_prefix(pipeline: str, name: str, version: int) -> bytes:
    """What every stage change key of a version starts with (a unique suffix follows)."""
    return f"pipeline/{pipeline}/stage/{name}/{version}/".encode()


def traffic_problem(state: RegistryState, pipeline: str, name: str, version: int, stage: str,
                    traffic: float) -> str | None:
    """Why giving this version ``stage``/``traffic`` would overbook the traffic split, or None."""
    others = sum(v["traffic"] for (p, n, ver), v in state.versions.items()
                 if p == pipeline and v["stage"] in TRAFFIC_STAGES and (n, ver) != (name, version))
    mine = traffic if stage in TRAFFIC_STAGES else 0.0
    if others + mine > 1.0 + 1e-9:
        return (f"challengers and canaries would take {others + mine:.3f} of the traffic, "
                "more than 1")
    return None


def _name(field: str, value: object) -> None:
    if not valid_name(value):
        _fail(field, "pattern", f"{show(value)} must match {PIPELINE_NAME.pattern}")


def _min(field: str, value: int, low: int) -> None:
    if value < low:
        _fail(field, "min", f"{value} is less than {low}")


def _stage(field: str, value: object) -> None:
    if value not in STAGES:
        _fail(field, "stage", f"{show(value)} is not a stage; one of {', '.join(STAGES)}")


def _traffic(field: str, value: float) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        _fail(field, "range", f"{value} is not within [0, 1]")


def _text(field: str, value: str | None) -> None:
    if value is not None and len(value) > MAX_TEXT:
        _fail(field, "max_length", f"{len(value)} characters, more than {MAX_TEXT}")


def _json_object(field: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        _fail(field, "json", f"not JSON: {e}")
    if not isinstance(value, dict):
        _fail(field, "json", f"expected a JSON object, got {type(value).__name__}")
    return value


def check_common(event: Mapping[str, Any]) -> str:
    """Rules every record follows (pipeline name, time, payload present); return its kind."""
    _name("pipeline", event["pipeline"])
    _min("at", event["at"], 0)
    kind: str = event["kind"]
    payload = PAYLOAD.get(kind)
    if payload is not None and event.get(payload) is None:
        _fail(payload, "required", f"a {kind} record needs its {payload!r} payload")
    return kind


def check_spec(state: RegistryState, event: Mapping[str, Any],
               key: bytes | None) -> tuple[PipelineSpec, dict[str, Any]]:
    """Rules of a ``pipeline_spec`` record; return the spec and its features schema."""
    pipeline, rec = event["pipeline"], event["spec"]
    text = rec["spec_json"]
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        _fail("spec.spec_json", "json", f"not JSON: {e}")
    try:
        spec = parse_spec(data, "registry")
    except SpecError as e:
        where, rule, message = e.problems[0]
        more = f" (and {len(e.problems) - 1} more problem(s))" if len(e.problems) > 1 else ""
        _fail(f"spec.spec_json.{where}", rule, message + more)
    if spec.name != pipeline:
        _fail("spec.spec_json.name", "name_match", f"the spec names {show(spec.name)}, the record "
              f"{show(pipeline)}")
    digest = rec["spec_sha256"]
    if hashlib.sha256(text.encode()).hexdigest() != digest:
        _fail("spec.spec_sha256", "sha256_match", f"{show(digest)} is not the sha256 of spec_json")
    schema = _json_object("spec.features_schema_json", rec["features_schema_json"])
    try:
        fastavro.parse_schema(schema, named_schemas=avro.named_types())
    except Exception as e:  # noqa: BLE001 - fastavro raises many kinds on a bad schema
        _fail("spec.features_schema_json", "avro_schema", f"not a valid Avro schema: {e}")
    if _feature_fields(schema) != _canonical(spec.feature_fields()):
        _fail("spec.features_schema_json", "features_match",
              "its 'features' record does not declare the spec's features")
    previous = state.specs.get(pipeline)
    if previous is not None and previous.sha256() != spec.sha256():
        try:
            reason = avro.is_backward_compatible(spec.features_schema(), previous.features_schema())
        except Exception as e:  # noqa: BLE001 - the reason is the answer
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            _fail("spec.spec_json.features", "backward_compatible",
                  f"cannot read events written under the previous spec: {reason}")
    if key is not None and key != spec_key(pipeline, digest):
        _fail("key", "key_match", f"{show(key)} is not {show(spec_key(pipeline, digest))}")
    return spec, schema


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _feature_fields(schema: Mapping[str, Any]) -> bytes | None:
    """The fields of the ``features`` record of a features schema (canonical JSON), or None."""
    for f in schema.get("fields") or []:
        if isinstance(f, dict) and f.get("name") == "features" and isinstance(f.get("type"), dict):
            return _canonical(f["type"].get("fields"))
    return None


def check_model(state: RegistryState, event: Mapping[str, Any],
                key: bytes | None) -> dict[str, Any]:
    """Rules of a ``model_version`` record; return its model payload with Avro defaults filled."""
    pipeline, m = event["pipeline"], {**_MODEL_DEFAULTS, **event["model"]}
    spec = state.specs.get(pipeline)
    if spec is None:
        _fail("pipeline", "known_pipeline", f"no valid pipeline_spec of {show(pipeline)} precedes "
              "this record")
    _name("model.name", m["name"])
    _min("model.version", m["version"], 1)
    if not SHA256_HEX.fullmatch(m["sha256"]):
        _fail("model.sha256", "sha256_format", f"{show(m['sha256'])} is not 64 lowercase hex "
              "digits")
    _stage("model.stage", m["stage"])
    _traffic("model.traffic", m["traffic"])
    _min("model.created_at", m["created_at"], 0)
    for name in ("uri", "parent", "trigger"):
        _text(f"model.{name}", m[name])
    features = {f.name: f.type for f in spec.features}
    for feature, value in m["fill_values"].items():
        if feature not in features:
            _fail("model.fill_values", "known_feature", f"{show(feature)} is not a feature of the "
                  "spec")
        if not math.isfinite(value):
            _fail(f"model.fill_values.{feature}", "finite", f"{value} is not a finite number")
    seen: set[str] = set()
    for feature in m["input_features"]:
        if features.get(feature) in (None, "string") or feature in seen:
            _fail("model.input_features", "input_features", f"{show(feature)} is not a numeric or "
                  "bool feature of the spec, or is listed twice")
        seen.add(feature)
    _json_object("model.reference_profile_json", m["reference_profile_json"])
    _json_object("model.scorecard_json", m["scorecard_json"])
    for i, r in enumerate(m["training_ranges"]):
        if r["partition"] < 0 or r["first_offset"] < 0 or r["count"] < 0 \
                or r["last_offset"] < r["first_offset"]:
            _fail(f"model.training_ranges[{i}]", "range", "partition, offsets and count must be "
                  ">= 0 and first_offset <= last_offset")
    existing = state.versions.get((pipeline, m["name"], m["version"]))
    if existing is not None and existing["sha256"] != m["sha256"]:
        _fail("model.sha256", "immutable_version", f"{m['name']} v{m['version']} is already "
              f"registered with sha256 {existing['sha256'][:16]}...")
    problem = traffic_problem(state, pipeline, m["name"], m["version"], m["stage"], m["traffic"])
    if problem is not None:
        _fail("model.traffic", "traffic_sum", problem)
    expected = model_version_key(pipeline, m["name"], m["version"])
    if key is not None and key != expected:
        _fail("key", "key_match", f"{show(key)} is not {show(expected)}")
    return m


def check_stage_change(state: RegistryState, event: Mapping[str, Any],
                       key: bytes | None) -> dict[str, Any]:
    """Rules of a ``stage_change`` record (a known version to a known stage); return its payload."""
    pipeline, c = event["pipeline"], {**_STAGE_CHANGE_DEFAULTS, **event["stage_change"]}
    _name("stage_change.name", c["name"])
    _min("stage_change.version", c["version"], 1)
    if c["from_stage"] is not None:
        _stage("stage_change.from_stage", c["from_stage"])
    _stage("stage_change.to_stage", c["to_stage"])
    _traffic("stage_change.traffic", c["traffic"])
    _text("stage_change.reason", c["reason"])
    _text("stage_change.actor", c["actor"])
    if (pipeline, c["name"], c["version"]) not in state.versions:
        _fail("stage_change.version", "known_version", f"{show(pipeline)} has no model "
              f"{show(c['name'])} version {c['version']}")
    problem = traffic_problem(state, pipeline, c["name"], c["version"], c["to_stage"], c["traffic"])
    if problem is not None:
        _fail("stage_change.traffic", "traffic_sum", problem)
    prefix = stage_change_prefix(pipeline, c["name"], c["version"])
    if key is not None and not key.startswith(prefix):
        _fail("key", "key_match", f"{show(key)} does not start with {show(prefix)}")
    return c


def rebaseline_key(pipeline: str, rid: str) -> bytes:
    """The key of one rebaseline command (a key of its own: compaction keeps every one)."""
    return f"pipeline/{pipeline}/rebaseline/{rid}".encode()


def check_rebaseline(state: RegistryState, event: Mapping[str, Any],
                     key: bytes | None) -> dict[str, Any]:
    """Rules of a ``rebaseline`` record (a monitor
    command for a known pipeline); return its payload."""
    pipeline, r = event["pipeline"], event["rebaseline"]
    if pipeline not in state.specs:
        _fail("pipeline", "known_pipeline", f"{show(pipeline)} is not a pipeline in the registry")
    rid = r.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= 64:
        _fail("rebaseline.id", "required", "a rebaseline needs an id of 1 to 64 characters")
    _text("rebaseline.reason", r.get("reason"))
    _text("rebaseline.actor", r.get("actor"))
    if key is not None and key != rebaseline_key(pipeline, rid):
        _fail("key", "key_match", f"{show(key)} is not {show(rebaseline_key(pipeline, rid))}")
    return dict(r)
