"""Pipeline specs: the declarative YAML that defines a pipeline, validated with clear errors."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loopline import avro
from loopline.errors import SpecError
from loopline.topics import PIPELINE_NAME, PipelineTopics

FeatureType = Literal["float", "int", "string", "bool"]
StreamDetector = Literal["adwin", "page_hinkley", "kswin"]
ErrorDetector = Literal["ddm", "eddm", "hddm_a", "hddm_w", "adwin"]
_AVRO_TYPES = {"float": "double", "int": "long", "string": "string", "bool": "boolean"}
_FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"  # Avro field names; also safe as column names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Feature(_Strict):
    """One input feature of the model."""

    name: str = Field(pattern=_FIELD_NAME, description="Field name in events' 'features' object.")
    type: FeatureType = Field(description="float, int, string or bool.")
    required: bool = Field(True,
                           description="Whether events must carry it (else it may be null/absent).")
    min: float | None = Field(None, description="Smallest accepted value (numbers only).")
    max: float | None = Field(None, description="Largest accepted value (numbers only).")
    values: list[str] | None = Field(None, min_length=1,
                                     description="Accepted values (strings only).")
    description: str = ""

    @model_validator(mode="after")
    def _rules_fit_type(self) -> Feature:
        numeric = self.type in ("float", "int")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"min/max apply to float or int features, not {self.type}")
        if self.values is not None and self.type != "string":
            raise ValueError(f"values apply to string features, not {self.type}")
        for bound in (self.min, self.max):
            if bound is not None and not math.isfinite(bound):
                raise ValueError("min/max must be finite numbers")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self

    def avro_field(self) -> dict[str, Any]:
        """This feature as a field of the generated Avro ``Features`` record."""
        t = _AVRO_TYPES[self.type]
        if self.required:
            return {"name": self.name, "type": t}
        return {"name": self.name, "type": ["null", t], "default": None}


class Label(_Strict):
    """What feedback labels look like."""

    name: str = Field("label", pattern=_FIELD_NAME)
    task: Literal["classification", "regression"] = "classification"
    classes: list[str] | None = Field(None, min_length=2,
                                      description="Class names (classification).")
    positive: str | None = Field(None, description="The positive class, for binary metrics.")

    @model_validator(mode="after")
    def _classes_fit_task(self) -> Label:
        if self.task == "regression" and (self.classes or self.positive):
            raise ValueError("classes/positive apply to classification only")
        if self.classes and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        if self.positive is not None and self.classes and self.positive not in self.classes:
            raise ValueError(f"positive class {self.positive!r} is not one of classes "
                             f"{self.classes}")
        return self


class Deployment(_Strict):
    """How inference serves the pipeline's model versions."""

    canary_fraction: float = Field(0.0, ge=0.0, le=1.0,
                                   description="Share of keys a canary serves.")
    promotion: Literal["auto", "manual"] = "manual"
    batch_size: int = Field(1000, ge=1, le=100_000)


class Monitor(_Strict):
    """Drift, data quality and performance monitoring.

    A drift alert needs effect (the PSI of the changed segment against the reference, beyond what
    chance gives), evidence (a p-value with the segment counted in effective events: seasonal and
    autocorrelated streams count for less) and persistence (the most recent half of the segment
    still moved). ``detectors`` only raise early warnings that make the monitor test sooner.
    Defaults come from bench/monitor_detection.py (bench/README.md).
    """

    detectors: list[StreamDetector] = Field(
        default_factory=lambda: list[StreamDetector](["adwin"]),
        description="Early-warning detectors on every column (values, spread, category shares): "
        "a signal triggers a test against the reference, never an alert by itself.")
    error_detectors: list[ErrorDetector] = Field(
        default_factory=lambda: list[ErrorDetector](["adwin", "ddm"]),
        description="Early-warning detectors on each model's error stream (ddm, eddm, hddm_*: "
        "classification only).")
    window: int = Field(1000, ge=50, description="Events in the windowed comparison with the "
                        "reference (also the longest segment an early warning tests).")
    psi_warning: float = Field(0.1, gt=0, description="Effect size (PSI beyond chance) of a "
                               "warning.")
    psi_alert: float = Field(0.25, gt=0, description="Effect size (PSI beyond chance) of an alert.")
    p_value: float = Field(1e-4, gt=0, lt=1, description="Evidence: the dependence-corrected "
                           "p-value a drift or a performance drop must get below.")
    ks_alert_pvalue: float | None = Field(
        None, gt=0, lt=1, description="Deprecated and ignored (the KS test assumed independent "
        "events); kept so older specs still load.")
    performance_window: int = Field(500, ge=10, description="Labeled predictions in rolling "
                                    "metrics; the first window of a version is its baseline.")
    min_performance_drop: float = Field(
        0.02, gt=0, description="Effect size of a performance alert: accuracy this many points "
        "below the version's baseline (regression: MAE this much higher, relatively).")
    zombie_after_s: float = Field(3600.0, gt=0, description="No traffic/readers this long: zombie.")
    stalled_after_s: float = Field(
        60.0, gt=0,
        description="Feature events keep arriving but no prediction came for this long: "
        "serving has stalled (an alert until predictions flow again).")
    readers: list[str] = Field(default_factory=list,
                               description="Consumer groups whose committed offsets on the "
                               "predictions topic count as reading them (default: any group except "
                               "Loopline's own, loopline-*).")
    seed: int = 42

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> Monitor:
        if self.psi_warning > self.psi_alert:
            raise ValueError(f"psi_warning ({self.psi_warning}) must not exceed psi_alert "
                             f"({self.psi_alert})")
        return self


class Retrain(_Strict):
    """When the trainer builds a new candidate."""

    on_drift: bool = True
    every_n_labels: int | None = Field(None, ge=1)
    min_accepts: int | None = Field(None, ge=0,
                                    description="Business rule: at least this many accepts ...")
    min_rejects: int | None = Field(None, ge=0,
                                    description="... and this many rejects since the last version.")
    schedule_s: float | None = Field(None, gt=0)
    warm_start: bool = False
    drift_settle_labels: int | None = Field(
        None, ge=0,
        description="Labels to wait for after a drift alert before the candidate is built, so it "
        "learned and is validated on post-drift data (default: three times trainer.min_holdout; "
        "each retry waits for twice as many).")
    drift_retries: int = Field(
        2, ge=0, le=10,
        description="How often a rejected drift candidate is tried again, each time with twice the "
        "labels since the alert: an early try on few labels is cheap, giving up is not.")


TransformKind = Literal["standardize", "polynomial", "one_hot", "bucketize", "log"]
#: Transforms that name the features they apply to (the others default to every numeric feature).
_NAMED_TRANSFORMS = ("one_hot", "bucketize", "log")


class Transform(_Strict):
    """One feature transform of the batch learners, identical in training and in the exported graph.

    Whatever their order in the list, transforms apply as: log, bucketize, one_hot, standardize,
    polynomial (see ``services/trainer/transforms.py``).
    """

    kind: TransformKind = Field(
        description="standardize (z-score), polynomial (products of numeric features), one_hot "
        "(string categories), bucketize (numeric ranges as indicators), log (log(1 + max(x, 0))).")
    features: list[str] | None = Field(
        None, min_length=1,
        description="Features it applies to (required for one_hot, bucketize and log; default: "
        "every numeric feature).")
    degree: int = Field(
        2, ge=2, le=3, description="polynomial: highest degree of the product terms.")
    interaction_only: bool = Field(
        False, description="polynomial: only products of distinct features.")
    bounds: list[float] | None = Field(
        None, min_length=1,
        description="bucketize: ascending bucket edges (default: the window's quantiles).")
    buckets: int = Field(
        4, ge=2, le=32, description="bucketize without bounds: number of quantile buckets.")

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Transform:
        if self.kind in _NAMED_TRANSFORMS and not self.features:
            raise ValueError(f"a {self.kind} transform needs `features`")
        if self.bounds is not None:
            if self.kind != "bucketize":
                raise ValueError("bounds apply to bucketize only")
            ascending = sorted(set(self.bounds)) == self.bounds
            if not all(math.isfinite(b) for b in self.bounds) or not ascending:
                raise ValueError("bounds must be finite and strictly ascending")
        return self


class BatchLearner(_Strict):
    """A scikit-learn learner of the tournament, trained on the newest labeled window."""

    kind: Literal["linear", "hist_gradient_boosting"] = Field(
        description="linear: LogisticRegression (classification) or Ridge (regression); "
        "hist_gradient_boosting: HistGradientBoostingClassifier / Regressor.")
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.+-]{1,64}$",
        description="Its name in the scorecard (default: kind and transforms).")
    transforms: list[Transform] = Field(
        default_factory=list, description="Applied with trainer.transforms.")
    l2: float = Field(
        1.0, gt=0, description="linear: L2 penalty (LogisticRegression C = 1 / l2, Ridge alpha).")
    max_iter: int = Field(
        100, ge=1, le=5000, description="hist_gradient_boosting: boosting rounds.")
    max_leaf_nodes: int = Field(
        15, ge=2, le=255, description="hist_gradient_boosting: leaves per tree.")
    min_samples_leaf: int = Field(
        10, ge=1, description="hist_gradient_boosting: fewest examples in a leaf.")
    learning_rate: float = Field(
        0.1, gt=0, le=1, description="hist_gradient_boosting: shrinkage.")

    def label(self) -> str:
        """The learner's name in scorecards: its ``name``, else kind plus its own transforms."""
        if self.name:
            return self.name
        extra = [(f"inter{t.degree}" if t.interaction_only else f"poly{t.degree}")
                 if t.kind == "polynomial" else t.kind for t in self.transforms]
        return "+".join([f"sklearn.{self.kind}", *extra])


def _default_learners() -> list[BatchLearner]:
    # A linear model, the same on degree-2 terms (smooth curved boundaries from a few hundred
    # labels) and boosted trees (thresholds, rules): between them they cover what a short stream
    # can teach.
    return [BatchLearner(kind="linear"),
            BatchLearner(kind="linear", transforms=[Transform(kind="polynomial", degree=2)]),
            BatchLearner(kind="hist_gradient_boosting")]


class Trainer(_Strict):
    """Retraining (an incremental learner and a tournament of batch learners), promotion."""

    learner: Literal["logistic_regression", "linear_regression", "hoeffding_adaptive_tree"] = Field(
        "logistic_regression", description="The incremental river learner, learning every label.")
    learners: list[BatchLearner] = Field(
        default_factory=_default_learners,
        description="Batch learners that compete with the incremental one (and the champion's own "
        "family, when known) at every trigger; the best on the holdout is registered.")
    transforms: list[Transform] = Field(
        default_factory=lambda: [Transform(kind="standardize")],
        description="Feature transforms of every batch learner (one_hot makes the model take one "
        "input per feature, strings included).")
    window: int = Field(
        2000, ge=50, le=100_000,
        description="Most recent labeled examples the batch learners train on; after a change in "
        "the champion's error rate, only those after it.")
    retrain: Retrain = Field(default_factory=Retrain)
    holdout: int = Field(
        500, ge=10,
        description="Most labeled examples held out for validation (the newest; the incremental "
        "learner learns them only after they leave the holdout).")
    min_holdout: int = Field(
        50, ge=10, description="Fewest labels a tournament validates on (at most holdout).")
    holdout_fraction: float = Field(
        0.3, gt=0, lt=1,
        description="Share of the usable window held out, between min_holdout and holdout: short "
        "streams get a candidate too.")
    margin: float = Field(0.01, ge=0, description="How much better a candidate must be.")
    min_live_samples: int = Field(
        200, ge=1,
        description="Most live labels a trial or probation waits for; it decides earlier once a "
        "paired test is conclusive at live_p.")
    live_p: float = Field(
        0.01, gt=0, lt=0.5,
        description="Significance at which a live trial or probation decides before "
        "min_live_samples labels (sign test on the events the two disagree on), after at least 30.")
    direct_promotion_p: float | None = Field(
        0.001, gt=0, lt=0.5,
        description="Auto promotion: a winner whose holdout gain over the champion is at least "
        "margin and significant at this level (sign test, Bonferroni over the contenders) becomes "
        "champion at once, on probation; null: always a live trial first.")
    label_ttl_s: float = Field(86_400.0, gt=0,
                               description="How long predictions wait for feedback.")
    seed: int = 42
    learning_rate: float = Field(0.01, gt=0,
                                 description="SGD step of the linear learners (weights and "
                                             "intercept).")


class Retention(_Strict):
    """How long each of the pipeline's topics keeps messages (Kafka's ``retention.ms``).

    A value is milliseconds (``604800000``), a number with a unit (``500ms``, ``90s``, ``15m``,
    ``12h``, ``7d``, ``2w``) or ``forever`` (-1: never deleted by age). Stored as milliseconds;
    an unset topic keeps the broker's default. ``loopline apply`` sets them on the topics.
    """

    raw: int | None = Field(None,
                            description="Producer events (often the most personal: keep short).")
    features: int | None = Field(None, description="Validated events.")
    predictions: int | None = Field(None, description="Model outputs.")
    feedback: int | None = Field(None, description="Labels and verdicts.")
    deadletter: int | None = Field(None, description="Rejected input, with its original bytes.")

    # A minute at least: a shorter retention deletes events before the services have read them.
    _MIN_MS: ClassVar[int] = 60_000
    _UNIT_MS: ClassVar[dict[str, int]] = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000,
                                          "d": 86_400_000, "w": 604_800_000}
    _DURATION: ClassVar[re.Pattern[str]] = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
    _HOW: ClassVar[str] = ("use milliseconds (604800000), a number with a unit (500ms, 90s, 15m, "
                           "12h, 7d, 2w) or 'forever'")

    @field_validator("raw", "features", "predictions", "feedback", "deadletter", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        """Read a duration into milliseconds (-1: forever)."""
        if value is None:
            return None
        if isinstance(value, bool):
            # pydantic reports a ValueError as this field's error; a TypeError would escape it
            raise ValueError(f"expected a duration, got {value!r}; {cls._HOW}")
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("forever", "infinite", "-1"):
                return -1
            m = cls._DURATION.match(text)
            if text.isdigit():
                value = int(text)
            elif m:
                value = round(float(m[1]) * cls._UNIT_MS[m[2]])
            else:
                raise ValueError(f"{value!r} is not a duration; {cls._HOW}")
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise ValueError(f"{value!r} is not a whole number of milliseconds; {cls._HOW}")
            value = int(value)
        if not isinstance(value, int):
            kind = type(value).__name__
            raise ValueError(f"expected a duration, got {kind}; {cls._HOW}")
        if value == -1:
            return -1
        if value < cls._MIN_MS:
            raise ValueError(f"{value} ms is shorter than 1 minute (or negative): events would be "
                             "deleted before the services read them; use -1 or 'forever' for no "
                             "limit")
        if value >= 2**63:
            raise ValueError(f"{value} ms does not fit Kafka's retention.ms (a 64-bit number)")
        return value

    def ms(self) -> dict[str, int]:
        """The kinds (raw, features, ...) whose retention is set, in milliseconds (-1: forever)."""
        return {kind: v for kind, v in self.model_dump().items() if v is not None}


class PipelineSpec(_Strict):
    """A pipeline: its input features, label, and how each service treats it."""

    name: str = Field(pattern=PIPELINE_NAME.pattern)
    description: str = ""
    features: list[Feature] = Field(min_length=1)
    key: str | None = Field(None, pattern=_FIELD_NAME,
                            description="Feature used as the event key when none is sent.")
    label: Label = Field(default_factory=Label)
    unknown_fields: Literal["reject", "drop"] = "reject"
    max_message_bytes: int = Field(1_000_000, ge=64, le=100_000_000)
    partitions: int = Field(3, ge=1, le=1000)
    deployment: Deployment = Field(default_factory=Deployment)
    monitor: Monitor = Field(default_factory=Monitor)
    trainer: Trainer = Field(default_factory=Trainer)
    retention: Retention = Field(default_factory=Retention,
                                 description="Per-topic retention, applied "
                                 "to the topics by `loopline apply`; unset: the broker's default.")

    @field_validator("features")
    @classmethod
    def _distinct_names(cls, features: list[Feature]) -> list[Feature]:
        seen: set[str] = set()
        for f in features:
            if f.name in seen:
                raise ValueError(f"feature {f.name!r} is declared twice")
            seen.add(f.name)
        return features

    @model_validator(mode="after")
    def _key_is_a_feature(self) -> PipelineSpec:
        if self.key is not None and self.key not in {f.name for f in self.features}:
            raise ValueError(f"key {self.key!r} is not one of the features")
        return self

    @model_validator(mode="after")
    def _transforms_fit_features(self) -> PipelineSpec:
        types = {f.name: f.type for f in self.features}
        groups = [("trainer.transforms", self.trainer.transforms)]
        groups += [(f"trainer.learners[{i}].transforms", b.transforms)
                   for i, b in enumerate(self.trainer.learners)]
        for where, transforms in groups:
            for t in transforms:
                for name in t.features or []:
                    ftype = types.get(name)
                    if ftype is None:
                        raise ValueError(
                            f"{where}: {t.kind} names {name!r}, which is not a feature")
                    if (t.kind == "one_hot") != (ftype == "string"):
                        need = "string" if t.kind == "one_hot" else "numeric or bool"
                        raise ValueError(
                            f"{where}: {t.kind} needs {need} features; {name!r} is {ftype}")
        return self

    @property
    def topics(self) -> PipelineTopics:
        """This pipeline's topics."""
        return PipelineTopics(self.name)

    def feature_fields(self) -> list[dict[str, Any]]:
        """The generated Avro fields of the ``Features`` record."""
        return [f.avro_field() for f in self.features]

    def features_schema(self) -> dict[str, Any]:
        """Avro schema of this pipeline's features topic."""
        return avro.with_features("features", self.feature_fields())

    def raw_schema(self) -> dict[str, Any]:
        """Avro schema producers may use on this pipeline's raw topic."""
        return avro.with_features("raw", self.feature_fields())

    def canonical_json(self) -> bytes:
        """The spec as canonical JSON (sorted keys): what the registry stores."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def sha256(self) -> str:
        """Content hash of the canonical JSON."""
        return hashlib.sha256(self.canonical_json()).hexdigest()


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """Path of an error such as ``features[amount].max``:
    list items by their name where they have one."""
    path = ""
    node = data
    for item in loc:
        child = None
        if isinstance(item, int):
            child = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            name = child.get("name") if isinstance(child, dict) else None
            path += f"[{name if isinstance(name, str) else item}]"
        else:
            child = node.get(item) if isinstance(node, dict) else None
            path += f".{item}" if path else str(item)
        node = child
    return path or "(top level)"


def parse_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    """Validate a spec document; raise :class:`SpecError`
    listing every problem with field and rule."""
    if not isinstance(data, dict):
        raise SpecError(source,
                        [("(top level)", "type", f"expected a mapping, got {type(data).__name__}")])
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            msg = err["msg"].removeprefix("Value error, ")
            problems.append((_location(err["loc"], data), err["type"], msg))
        raise SpecError(source, problems) from None


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a YAML spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(str(path), [("(file)", "exists", "file not found")]) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise SpecError(str(path), [("(file)", "readable", str(e))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(str(path), [(where, "yaml", f"not valid YAML: {problem}")]) from None
    return parse_spec(data, str(path))


def spec_from_json(data: bytes | str) -> PipelineSpec:
    """Rebuild a spec from the registry's canonical JSON."""
    return parse_spec(orjson.loads(data), "registry")
