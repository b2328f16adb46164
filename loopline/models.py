"""Model versions in the registry: validate and register, list, promote, roll back, stage history.

A version is accepted only after its artifact loads in ONNX Runtime, fits the pipeline's input
contract (see ``loopline.scoring``) and scores a test batch from the reference
data without error or NaN. Every stage change is its own registry event with a unique key, so
"which version served at time T" is answered by replaying the history (:func:`serving_at`).

Missing optional numeric features are imputed with the reference data's mean (stored with the
version in ``fill_values``), so NaN never reaches a model; without reference data, the middle of
the feature's [min, max] range, else 0.
"""

from __future__ import annotations

import csv
import importlib.metadata
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from loopline import avro, model_profile, topics
from loopline import profile as profiles
from loopline.artifacts import ArtifactStore, sha256_hex
from loopline.errors import LooplineError, RegistrationError
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.registry import (
    SERVING,
    STAGES,
    TRAFFIC_STAGES,
    RegistryReader,
    RegistryState,
    model_version_key,
    now_ms,
    publish,
    stage_change_key,
)
from loopline.registry_rules import traffic_problem
from loopline.spec import PipelineSpec
from loopline.topics import check_model_name, check_pipeline_name

if TYPE_CHECKING:  # onnxruntime loads only when a model is validated, not for `models list`
    from loopline.scoring import Scorer

log = logging.getLogger(__name__)

#: Rows of the test batch every registration scores beside the current deployment (at most).
TRIAL_ROWS = 512


@dataclass(frozen=True)
class Lineage:
    """Where a trained version came from: what triggered
    it, the data it learned, how it was judged."""

    trigger: str | None = None
    training_ranges: Sequence[Mapping[str, Any]] = ()
    scorecard: Mapping[str, Any] | None = None
    parent: str | None = None  # "name:version" (default: the champion at registration)


@dataclass(frozen=True)
class NewVersion:
    """A version to register: its name and stage, reference data, metrics and lineage."""

    name: str | None = None  # default: the pipeline's name
    stage: str = "champion"
    # default: the canary fraction for a canary, 1 for a champion, else 0
    traffic: float | None = None
    reference: Sequence[Mapping[str, Any]] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    expected_sha256: str | None = None
    lineage: Lineage = field(default_factory=Lineage)
    library_versions: Mapping[str, str] = field(default_factory=dict)
    max_slowdown: float | None = None  # refuse a version this many times slower than the champion


@dataclass(frozen=True)
class Validated:
    """What validation learned about a model: outputs on the test batch, profile, fill values."""

    rows: int
    profile: dict[str, Any] | None
    fill_values: dict[str, float]
    library_versions: dict[str, str]
    input_features: list[str]
    scorer: Scorer | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class TrialResult:
    """One version's outcome on the registration test batch, scored beside the deployment."""

    label: str
    stage: str
    rows: int
    error: str | None = None  # None: it scored every row with finite outputs

    @property
    def ok(self) -> bool:
        """Whether the version scored the batch."""
        return self.error is None


# ---- reference data ---------------------------------------------------------------------------
def _convert(value: Any, ftype: str, name: str, row: int) -> Any:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        if ftype == "float":
            return float(value)
        if ftype == "int":
            return int(float(value))
        if ftype == "bool":
            if isinstance(value, str):
                text = value.strip().lower()
                if text in ("true", "1", "yes", "t", "y"):
                    return True
                if text in ("false", "0", "no", "f", "n"):
                    return False
                raise ValueError(text)
            return bool(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise RegistrationError(f"reference data row {row}, feature {name!r}: {value!r} is not a "
                                f"{ftype} (rule: type)") from e


def load_reference(path: str | Path, spec: PipelineSpec,
                   limit: int = 100_000) -> list[dict[str, Any]]:
    """Read reference feature records from CSV or Parquet, typed by the spec."""
    path = Path(path)
    if not path.exists():
        raise RegistrationError(f"reference data {path}: file not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq  # optional dependency
        except ImportError as e:
            raise RegistrationError(
                "Parquet reference data needs pyarrow: pip install pyarrow") from e
        raw = pq.read_table(path).slice(0, limit).to_pylist()
    else:
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            raw = [r for _, r in zip(range(limit), reader)]
    if not raw:
        raise RegistrationError(f"reference data {path}: no rows")
    records = []
    for i, r in enumerate(raw, start=1):
        rec = {}
        for f in spec.features:
            if f.name not in r:
                raise RegistrationError(f"reference data {path}: no column {f.name!r} (rule: "
                                        "has_feature)")
            v = _convert(r[f.name], f.type, f.name, i)
            if v is None and f.required:
                raise RegistrationError(f"reference data {path} row {i}: required feature "
                                        f"{f.name!r} is empty (rule: required)")
            rec[f.name] = v
        records.append(rec)
    return records


def fill_values(spec: PipelineSpec,
                reference: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """Imputation values for optional numeric/bool
    features: reference mean, else mid-range, else 0."""
    out: dict[str, float] = {}
    for f in spec.features:
        if f.required or f.type == "string":
            continue
        col = np.array([r.get(f.name) for r in reference or []], dtype=float)
        col = col[np.isfinite(col)]
        if col.size:
            out[f.name] = float(col.mean())
        elif f.min is not None and f.max is not None:
            out[f.name] = (f.min + f.max) / 2
        else:
            out[f.name] = float(f.min or f.max or 0.0)
    return out


def library_versions(model: bytes | None = None) -> dict[str, str]:
    """Versions of the libraries that validated (and will score) a model, and its producer."""
    out = {}
    for dist in ("onnxruntime", "onnx", "numpy", "loopline"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if model is not None:
        try:
            import onnx

            proto = onnx.load_model_from_string(model)
            if proto.producer_name:
                out["producer"] = f"{proto.producer_name} {proto.producer_version}".strip()
            out["opset"] = ",".join(f"{o.domain or 'ai.onnx'}:{o.version}"
                                    for o in proto.opset_import)
        except Exception:  # noqa: BLE001,S110 - informational only: no producer, no opset
            pass
    return out


def validate_model(model: bytes, spec: PipelineSpec, reference: Sequence[Mapping[str, Any]] | None,
                   label: str = "model") -> Validated:
    """Load ``model`` in ONNX Runtime, check its contract,
    score a test batch; raise if anything fails."""
    from loopline.scoring import Scorer, synthetic_batch  # see TYPE_CHECKING

    fills = fill_values(spec, reference)
    scorer = Scorer(model, spec, fills, label=label)
    batch = list(reference) if reference else synthetic_batch(spec, 64)
    try:
        result = scorer.score(batch)
    except LooplineError:
        raise
    except Exception as e:  # ORT run errors
        raise RegistrationError(f"{label}: scoring a test batch of {len(batch)} row(s) failed: {e} "
                                "(rule: scores)") from e
    values = result.raw_scores
    if values is not None and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise RegistrationError(f"{label}: {bad} of {len(batch)} test row(s) scored NaN or inf "
                                "(rule: finite_output)")
    if result.scores is not None:
        for row in result.scores:
            if not all(np.isfinite(v) for v in row.values()):
                raise RegistrationError(f"{label}: a class score is NaN or inf (rule: "
                                        "finite_output)")
    classes = spec.label.classes
    if classes and result.labels is not None:
        unknown = sorted(set(result.labels) - set(classes))
        if unknown:
            raise RegistrationError(f"{label}: predicted label(s) {unknown[:5]} are not among the "
                                    f"pipeline's classes {classes} (rule: label_in_classes)")
    prof = None
    if reference:
        columns = {f.name: [r[f.name] for r in reference] for f in spec.features}
        outputs: dict[str, Any] = {}
        if result.labels is not None:
            outputs["label"] = result.labels
        if values is not None:
            outputs["score"] = values
        prof = profiles.build_profile(columns, {f.name: f.type for f in spec.features}, outputs)
    input_columns = scorer.columns if scorer.single else []
    return Validated(len(batch), prof, fills, library_versions(model), input_columns, scorer)


# ---- side by side with the deployment -----------------------------------------------------------
def trial_batch(spec: PipelineSpec, reference: Sequence[Mapping[str, Any]] | None,
                rows: int = TRIAL_ROWS) -> list[dict[str, Any]]:
    """The registration test batch: reference rows (else synthetic ones) and rows missing optionals.

    Inference meets events without their optional features every day; a version must score them.
    """
    from loopline.scoring import synthetic_batch  # see TYPE_CHECKING

    batch = [dict(r) for r in (list(reference)[:rows] if reference else synthetic_batch(spec, 64))]
    optional = [f.name for f in spec.features if not f.required]
    if optional:
        batch += [dict(r, **dict.fromkeys(optional)) for r in batch[:8]]
    return batch


def _output_problem(scorer: Scorer, out: list[Any], n: int) -> str | None:
    result = scorer.parse(out, n)
    got = [len(x) for x in (result.labels, result.values, result.scores) if x is not None]
    if not got or any(k != n for k in got):
        return f"outputs {got} row(s) for a batch of {n}"
    if result.raw_scores is not None and not np.isfinite(result.raw_scores).all():
        return f"{int((~np.isfinite(result.raw_scores)).sum())} of {n} row(s) scored NaN or inf"
    if result.scores is not None and not all(np.isfinite(v) for row in result.scores
                                             for v in row.values()):
        return "a class score is NaN or inf"
    return None


def score_side_by_side(versions: Sequence[tuple[str, str, Scorer]],
                       batch: Sequence[Mapping[str, Any]]) -> list[TrialResult]:
    """Score one batch with every (label, stage, scorer) the way inference does; never raises.

    One ``feeds`` per distinct ``Scorer.input_signature``, then ``run`` and ``parse`` per version:
    the feeding path of ``services/inference`` (``Scorer.feeds/run/parse``), dtype included.
    """
    feeds_by_signature: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
    results = []
    for label, stage, scorer in versions:
        try:
            signature = scorer.input_signature
            feeds = feeds_by_signature.get(signature)
            if feeds is None:
                feeds = feeds_by_signature[signature] = scorer.feeds(batch)
            problem = _output_problem(scorer, scorer.run(feeds), len(batch))
        except Exception as e:  # noqa: BLE001 - ORT and contract errors become the result
            problem = f"{type(e).__name__}: {str(e)[:500]}"
        results.append(TrialResult(label, stage, len(batch), problem))
    return results


# ---- registry state helpers -------------------------------------------------------------------
def versions_of(state: RegistryState, pipeline: str) -> list[dict[str, Any]]:
    """Every version of a pipeline, oldest first."""
    return sorted((v for (p, _, _), v in state.versions.items() if p == pipeline),
                  key=lambda v: (v["created_at"], v["name"], v["version"]))


def stage_order(state: RegistryState, pipeline: str) -> dict[tuple[str, int], tuple[int, int]]:
    """Per version, when its stage was last set (event
    time, then registry order): later wins a tie."""
    order: dict[tuple[str, int], tuple[int, int]] = {}
    for v in versions_of(state, pipeline):
        order[(v["name"], v["version"])] = (v["at"], -1)
    for i, c in enumerate(state.stage_changes):
        if c["pipeline"] == pipeline:
            order[(c["name"], c["version"])] = max(order.get((c["name"], c["version"]), (0, -1)),
                                                   (c["at"], i))
    return order


def champion(state: RegistryState, pipeline: str) -> dict[str, Any] | None:
    """The pipeline's current champion (the most recently promoted, if several claim it)."""
    order = stage_order(state, pipeline)
    best = [v for v in versions_of(state, pipeline) if v["stage"] == "champion"]
    return max(best, key=lambda v: order[(v["name"], v["version"])]) if best else None


def stage_history(state: RegistryState, pipeline: str) -> list[dict[str, Any]]:
    """The pipeline's stage changes, in registry order."""
    return [c for c in state.stage_changes if c["pipeline"] == pipeline]


def serving_at(state: RegistryState, pipeline: str,
               at_ms: int) -> dict[tuple[str, int], tuple[str, float]]:
    """Which versions held a serving stage at ``at_ms``: (name, version) -> (stage, traffic)."""
    return {k: s for k, s in state.deployment_at(pipeline, at_ms).items() if s[0] in SERVING}


def previous_champion(state: RegistryState, pipeline: str,
                      current: tuple[str, int]) -> dict[str, Any] | None:
    """The most recent earlier champion of ``pipeline``
    other than ``current`` that was not rejected."""
    for c in reversed(stage_history(state, pipeline)):
        k = (c["name"], c["version"])
        if c["to_stage"] == "champion" and k != current:
            cand = state.versions.get((pipeline, *k))
            if cand is not None and cand["stage"] != "rejected":
                return cand
    return None


def isolation_events(state: RegistryState, pipeline: str, name: str, version: int, reason: str,
                     actor: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Registry events that take a failing version out
    of service: rejected; a champion is rolled back."""
    v = state.versions.get((pipeline, name, version))
    if v is None or v["stage"] not in SERVING:
        return []
    events = [_stage_event(pipeline, name, version, v["stage"], "rejected", 0.0, reason, actor)]
    if v["stage"] == "champion":
        previous = previous_champion(state, pipeline, (name, version))
        # the replacement's event goes first: readers always see a champion
        if previous is not None:
            events.insert(0, _stage_event(pipeline, previous["name"], previous["version"],
                                          previous["stage"], "champion", 1.0,
                                          f"automatic rollback: {reason}", actor))
    return events


def _check_traffic(state: RegistryState, pipeline: str, name: str, version: int, stage: str,
                   traffic: float) -> None:
    # The same rules every registry reader applies (loopline.registry_rules), checked before
    # publishing, plus "a challenger or canary takes some traffic".
    if not (math.isfinite(traffic) and 0.0 <= traffic <= 1.0) or (
            stage in TRAFFIC_STAGES and traffic == 0.0):
        bounds = "(0, 1]" if stage in TRAFFIC_STAGES else "[0, 1]"
        raise RegistrationError(f"{stage} {name} v{version}: traffic {traffic} must be in {bounds} "
                                "(rule: traffic_range)")
    if stage not in STAGES:
        raise RegistrationError(f"unknown stage {stage!r}; one of {', '.join(STAGES)} "
                                "(rule: stage)")
    problem = traffic_problem(state, pipeline, name, version, stage, traffic)
    if problem is not None:
        raise RegistrationError(f"{stage} {name} v{version}: {problem} (rule: traffic_sum)")


def _stage_event(pipeline: str, name: str, version: int, from_stage: str | None, to_stage: str,
                 traffic: float, reason: str, actor: str) -> tuple[bytes, dict[str, Any]]:
    event = {"kind": "stage_change", "pipeline": pipeline, "at": now_ms(), "spec": None,
             "model": None,
             "stage_change": {"name": name, "version": version, "from_stage": from_stage,
                              "to_stage": to_stage, "traffic": traffic, "reason": reason,
                              "actor": actor}}
    return stage_change_key(pipeline, name, version), event


class ModelRegistry:
    """Registry client for model versions of every pipeline (reads state, publishes events)."""

    def __init__(self, kafka: KafkaConfig, store: ArtifactStore, actor: str = "cli") -> None:
        self.kafka = kafka
        self.store = store
        self.actor = actor
        #: The last registration's test batch: the new version first, then the deployment.
        self.last_trial: list[TrialResult] = []

    def state(self) -> RegistryState:
        """The registry as it is now."""
        reader = RegistryReader(self.kafka, client_id="loopline-models")
        try:
            return reader.catch_up()
        finally:
            reader.close()

    def _spec(self, state: RegistryState, pipeline: str) -> PipelineSpec:
        spec = state.specs.get(pipeline)
        if spec is None:
            raise RegistrationError(f"pipeline {pipeline!r} is not in the registry; run `loopline "
                                    "apply` with its spec first")
        return spec

    def _deployed(self, state: RegistryState, pipeline: str,
                  spec: PipelineSpec) -> tuple[list[tuple[str, str, Scorer]], list[TrialResult]]:
        """The pipeline's serving versions loaded from the store, and those that would not load."""
        from loopline.scoring import Scorer  # see TYPE_CHECKING

        loaded: list[tuple[str, str, Scorer]] = []
        failed: list[TrialResult] = []
        for v in versions_of(state, pipeline):
            if v["stage"] not in SERVING:
                continue
            label = f"{pipeline}/{v['name']} v{v['version']}"
            try:
                scorer = Scorer(self.store.read(v["sha256"]), spec, v.get("fill_values") or {},
                                label=label, input_features=v.get("input_features") or None)
            except Exception as e:  # noqa: BLE001 - the deployment's problem, not the new version's
                failed.append(TrialResult(label, v["stage"], 0, f"not loaded: {str(e)[:300]}"))
                continue
            loaded.append((label, v["stage"], scorer))
        return loaded, failed

    def _trial(self, state: RegistryState, pipeline: str, spec: PipelineSpec, label: str,
               stage: str, checked: Validated,
               reference: Sequence[Mapping[str, Any]] | None) -> list[TrialResult]:
        """Score the new version beside the deployment; raise if the new version cannot serve."""
        assert checked.scorer is not None
        deployed, unloadable = self._deployed(state, pipeline, spec)
        results = score_side_by_side([(label, stage, checked.scorer), *deployed],
                                     trial_batch(spec, reference))
        mine, others = results[0], results[1:] + unloadable
        beside = ", ".join(f"{r.stage} {r.label}" for r in others) or "no deployed version"
        if not mine.ok:
            raise RegistrationError(f"{label}: scoring the test batch beside the deployment "
                                    f"({beside}) failed: {mine.error} "
                                    "(rule: scores_beside_deployment)")
        mine_classes = set(checked.scorer.classes)
        for _, other_stage, other in deployed:
            if not spec.label.classes and mine_classes and other.classes and \
                    mine_classes != set(other.classes):
                raise RegistrationError(
                    f"{label}: predicts classes {sorted(mine_classes)[:10]}, the {other_stage} "
                    f"{other.label} {sorted(other.classes)[:10]}; declare label.classes in the "
                    "spec or export the same classes (rule: classes_match)")
        for r in others:
            if not r.ok:
                log.warning("deployed_version_failed_trial", extra={
                    "pipeline": pipeline, "version": r.label, "stage": r.stage, "error": r.error})
        log.info("registration_trial", extra={"pipeline": pipeline, "version": label,
                                              "beside": [f"{r.stage}:{r.label}" for r in others],
                                              "rows": mine.rows})
        return results + unloadable

    def _publish(self, events: list[tuple[bytes, dict[str, Any]]]) -> None:
        """Send a command's events in order and wait until all are acknowledged."""
        producer = AckedProducer(self.kafka.producer("loopline-models"))
        codec = avro.codec("registry")
        for key, event in events[:-1]:
            producer.send(topics.MODELS, codec.encode(event), key=key)
        publish(producer, *events[-1])  # confirms everything queued so far

    def register(self, pipeline: str, model: bytes,
                 new: NewVersion | None = None) -> dict[str, Any]:
        """Validate ``model`` beside the deployment, store it, publish it; return the record.

        The version is refused (:class:`RegistrationError` naming the rule) unless it loads, fits
        the pipeline's input/output contract and scores a test batch beside every version now
        serving, fed the way inference feeds them; :attr:`last_trial` keeps that batch's results.
        """
        new = new or NewVersion()
        stage, traffic, reference, lineage = new.stage, new.traffic, new.reference, new.lineage
        check_pipeline_name(pipeline)
        name = check_model_name(new.name or pipeline)
        digest = sha256_hex(model)
        if new.expected_sha256 is not None and new.expected_sha256.lower() != digest:
            raise RegistrationError(f"model file has sha256 {digest}, expected "
                                    f"{new.expected_sha256[:80]} (rule: sha256_match)")
        if len(model) > self.store.max_bytes:
            raise RegistrationError(f"model file is {len(model)} bytes, more than the artifact "
                                    f"limit of {self.store.max_bytes} (rule: size_limit)")
        state = self.state()
        spec = self._spec(state, pipeline)
        existing = [v["version"] for v in versions_of(state, pipeline) if v["name"] == name]
        version = max(existing, default=0) + 1
        if traffic is None:
            traffic = (spec.deployment.canary_fraction if stage == "canary"
                       else 1.0 if stage == "champion" else 0.0)
        if stage == "canary" and traffic <= 0:
            raise RegistrationError("a canary needs --traffic or deployment.canary_fraction > 0 "
                                    "(rule: traffic_range)")
        _check_traffic(state, pipeline, name, version, stage, traffic)
        label = f"{pipeline}/{name} v{version}"
        checked = validate_model(model, spec, reference, label=label)
        self.last_trial = self._trial(state, pipeline, spec, label, stage, checked, reference)
        digest, uri = self.store.put(model)
        current = champion(state, pipeline)
        measured = model_profile.at_registration(  # latency and memory beside the champion
            model, spec, reference, checked.fill_values, checked.input_features, current,
            f"{pipeline}/{name} v{version}", new.max_slowdown)
        parent = lineage.parent
        if parent is None and current is not None:
            parent = f"{current['name']}:{current['version']}"
        record = {"name": name, "version": version, "sha256": digest, "uri": uri, "stage": stage,
                  "traffic": traffic, "parent": parent, "created_at": now_ms(),
                  "library_versions": {**checked.library_versions, **new.library_versions},
                  "metrics": {**new.metrics, **measured},
                  "reference_profile_json": orjson.dumps(checked.profile).decode()
                  if checked.profile else None,
                  "training_ranges": [dict(r) for r in lineage.training_ranges],
                  "trigger": lineage.trigger,
                  "scorecard_json": orjson.dumps(lineage.scorecard,
                                                 option=orjson.OPT_SORT_KEYS).decode()
                  if lineage.scorecard else None,
                  "fill_values": checked.fill_values, "input_features": checked.input_features}
        events = [(model_version_key(pipeline, name, version),
                   {"kind": "model_version", "pipeline": pipeline, "at": record["created_at"],
                    "spec": None, "model": record, "stage_change": None})]
        # A trained version's registration says why it was made and how it was judged, so that
        # `models list --history` tells the whole story (the full scorecard is on the version).
        summary = (lineage.scorecard or {}).get("summary")
        reason = f"registered: {summary}"[:1000] if summary else "registered"
        events.append(_stage_event(pipeline, name, version, None, stage, traffic, reason,
                                   self.actor))
        if stage == "champion" and current is not None:
            events.append(_stage_event(pipeline, current["name"], current["version"], "champion",
                                       "retired",
                                       0.0, f"replaced by {name} v{version}", self.actor))
        self._publish(events)
        return record

    def promote(self, pipeline: str, version: int, *, name: str | None = None,
                to_stage: str = "champion",
                traffic: float | None = None, reason: str = "promoted") -> dict[str, Any]:
        """Move a version to ``to_stage`` (a new champion
        retires the old one); return the stage change."""
        check_pipeline_name(pipeline)
        name = check_model_name(name or pipeline)
        state = self.state()
        self._spec(state, pipeline)
        v = state.versions.get((pipeline, name, version))
        if v is None:
            raise RegistrationError(f"pipeline {pipeline}: no model {name!r} version {version}")
        if traffic is None:
            traffic = (1.0 if to_stage == "champion"
                       else v["traffic"] if to_stage in TRAFFIC_STAGES else 0.0)
        _check_traffic(state, pipeline, name, version, to_stage, traffic)
        current = champion(state, pipeline)
        # The target's event goes first: a reader that sees only it still finds one champion,
        # because the most recent stage event wins a tie (see champion()).
        events = [_stage_event(pipeline, name, version, v["stage"], to_stage, traffic, reason,
                               self.actor)]
        if (to_stage == "champion" and current is not None
                and (current["name"], current["version"]) != (name, version)):
            events.append(_stage_event(pipeline, current["name"], current["version"], "champion",
                                       "retired", 0.0, f"replaced by {name} v{version}",
                                       self.actor))
        self._publish(events)
        return events[0][1]["stage_change"]  # type: ignore[no-any-return]  # a decoded record

    def rollback(self, pipeline: str,
                 reason: str = "rolled back") -> tuple[dict[str, Any], dict[str, Any]]:
        """Make the previous champion champion again and
        reject the current one; return (old, new)."""
        check_pipeline_name(pipeline)
        state = self.state()
        self._spec(state, pipeline)
        current = champion(state, pipeline)
        if current is None:
            raise RegistrationError(f"pipeline {pipeline}: no champion to roll back")
        previous = previous_champion(state, pipeline, (current["name"], current["version"]))
        if previous is None:
            raise RegistrationError(f"pipeline {pipeline}: {current['name']} v{current['version']} "
                                    "has no earlier champion to roll back to")
        events = [
            _stage_event(pipeline, previous["name"], previous["version"], previous["stage"],
                         "champion", 1.0, reason, self.actor),
            _stage_event(pipeline, current["name"], current["version"], "champion", "rejected", 0.0,
                         reason, self.actor),
        ]
        self._publish(events)
        return current, previous
