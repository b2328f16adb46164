"""Replay a logged time range through model versions: backtests and reproducibility audits."""

from __future__ import annotations

import functools
import operator
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from loopline.artifacts import ArtifactStore, read_artifact
from loopline.errors import LooplineError
from loopline.model_ref import version_id
from loopline.registry import RegistryState
from loopline.scoring import Scorer, ScoreResult
from loopline.services.lineage.query import connect
from loopline.services.lineage.store import LineageStore

BATCH = 20_000


def load_scorer(state: RegistryState, pipeline: str, name: str, version: int,
                artifacts: ArtifactStore | None = None) -> Scorer:
    """The registered version, read from the artifact store by sha256 (checked), loaded in ONNX
    Runtime.

    Without ``artifacts`` the record's URI is followed (with the store's checks): only for tools
    that have no store configured.
    """
    record = state.versions.get((pipeline, name, version))
    if record is None:
        known = ", ".join(version_id(n, v) for p, n, v in sorted(state.versions)
                          if p == pipeline) or "none"
        raise LooplineError(f"{version_id(name, version)} is not a version of pipeline {pipeline} "
                            f"(known: {known})")
    model = (artifacts.read(record["sha256"]) if artifacts is not None
             else read_artifact(record["uri"], record["sha256"]))
    return Scorer(model, state.specs[pipeline], record.get("fill_values"),
                  label=version_id(name, version),
                  input_features=record.get("input_features") or None)


FLOAT32_ULPS = 4


@dataclass
class Side:
    """One replayed version's outputs and how they compare."""

    model: str
    labels: list[str] | None = None
    values: np.ndarray | None = None
    logged: int = 0  # events this version had served or scored live, in the window
    reproduced: int = 0  # of those, how many it reproduced exactly now
    #: Not exact, but within FLOAT32_ULPS units in the last place of a float32 model's value, the
    #: same label: ONNX Runtime's float32 kernels round differently by batch size and make-up.
    within_rounding: int = 0
    max_abs_diff: float = 0.0
    correct: int = 0  # against feedback
    abs_error: float = 0.0
    distribution: dict[str, int] = field(default_factory=dict)


@dataclass
class ReplayReport:
    """What a replay found."""

    pipeline: str
    rows: int
    labeled: int
    seconds: float
    sides: list[Side]
    agreement: float | None  # between the two versions (labels, or |values| within 1e-9)
    task: str

    @property
    def events_per_s(self) -> float:
        """Replay throughput."""
        return self.rows / self.seconds if self.seconds else 0.0

    def metric(self, side: Side) -> float | None:
        """Accuracy (classification) or MAE (regression) on the events that have feedback."""
        if not self.labeled:
            return None
        if self.task == "classification":
            return side.correct / self.labeled
        return side.abs_error / self.labeled


# $1/$2: the window; $3/$4: the replayed version; $5/$6: the other one (NULL without --against).
# Only the two versions' predictions are aggregated, and features are deduplicated by event before
# the joins (a re-sent event keeps its event_id), which keeps DuckDB's work proportional to the
# window.
_ROWS_SQL = """
WITH truth AS (
    SELECT coalesce(fb.event_id, p.event_id) AS event_id,
           arg_max(fb.label, fb.ts) AS truth_label, arg_max(fb.value, fb.ts) AS truth_value
    FROM feedback fb LEFT JOIN predictions p ON fb.prediction_id = p.prediction_id
    WHERE fb.label IS NOT NULL OR fb.value IS NOT NULL
    GROUP BY ALL
),
logged AS (
    SELECT event_id, model_name, model_version, any_value(label) AS label, any_value(value) AS value
    FROM predictions
    WHERE (model_name = $3 AND model_version = $4)
       OR (model_name = $5::VARCHAR AND model_version = $6::INTEGER)
    GROUP BY ALL
),
f AS (
    SELECT event_id, ts, features FROM features
    WHERE ($1::TIMESTAMPTZ IS NULL OR ts >= $1) AND ($2::TIMESTAMPTZ IS NULL OR ts < $2)
    QUALIFY row_number() OVER (PARTITION BY event_id) = 1
)
SELECT f.event_id, f.features, t.truth_label, t.truth_value,
       a.label AS a_label, a.value AS a_value, b.label AS b_label, b.value AS b_value
FROM f
LEFT JOIN truth t USING (event_id)
LEFT JOIN logged a ON a.event_id = f.event_id AND a.model_name = $3 AND a.model_version = $4
LEFT JOIN logged b
       ON b.event_id = f.event_id AND b.model_name = $5::VARCHAR AND b.model_version = $6::INTEGER
ORDER BY f.ts, f.event_id
"""


def replay(store: LineageStore, state: RegistryState, pipeline: str, model: tuple[str, int],
           against: tuple[str, int] | None = None, since: datetime | None = None,
           until: datetime | None = None, progress: Callable[[int, int], None] | None = None,
           artifacts: ArtifactStore | None = None) -> ReplayReport:
    """Re-score the logged inputs of the window with ``model`` (and ``against``) and compare."""
    if pipeline not in state.specs:
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry")
    if pipeline not in store.pipelines():
        raise LooplineError(f"the lineage store at {store.root} holds nothing for pipeline "
                            f"{pipeline!r}")
    spec = state.specs[pipeline]
    versions = [model] + ([against] if against else [])
    scorers = [load_scorer(state, pipeline, n, v, artifacts) for n, v in versions]
    other = against or (None, None)
    con = connect(store, pipeline)
    window = [since, since, until, until]
    total = con.execute("SELECT count(DISTINCT event_id) FROM features WHERE (?::TIMESTAMPTZ IS "
                        "NULL OR ts >= ?) AND (?::TIMESTAMPTZ IS NULL OR ts < "
                        "?)", window).fetchall()[0][0]
    started = time.perf_counter()
    params = [since, until, model[0], model[1], other[0], other[1]]
    reader = con.sql(_ROWS_SQL, params=params).to_arrow_reader(BATCH)
    sides = [Side(version_id(n, v)) for n, v in versions]
    rows = labeled = agree = 0
    classification = spec.label.task == "classification"
    for chunk in reader:
        n = chunk.num_rows
        truth_column = chunk.column("truth_label" if classification else "truth_value")
        known = pc.is_valid(truth_column).to_numpy(zero_copy_only=False)
        truth = truth_column.to_numpy(zero_copy_only=False)
        columns = _feature_columns(chunk.column("features"), scorers)
        results = [_score(s, chunk.column("features"), columns, n) for s in scorers]
        for side, result, prefix in zip(sides, results, ("a", "b"), strict=False):
            _compare(side, result, chunk, prefix, truth, known, classification)
        if len(results) == 2:
            agree += _agreement(results[0], results[1], classification)
        labeled += int(known.sum())
        rows += n
        if progress:
            progress(rows, total)
    seconds = time.perf_counter() - started
    con.close()
    return ReplayReport(pipeline, rows, labeled, seconds, sides,
                        agree / rows if against and rows else None, spec.label.task)


def _feature_columns(features: pa.StructArray,
                     scorers: list[Scorer]) -> dict[str, np.ndarray] | None:
    """The batch's numeric/bool features as float64 numpy columns (null -> NaN), straight from
    Arrow.

    Going through float64 is what ``Scorer.feeds`` does with Python values too, so the tensors are
    bit-identical to the ones the inference service built live; ints use an unchecked cast, like
    numpy.
    """
    wanted = {c for s in scorers if s.single for c in s.columns}
    if not wanted:
        return None
    index = {features.type.field(i).name: i for i in range(features.type.num_fields)}
    children = features.flatten()  # accounts for the batch's offset and the struct's own validity
    out = {}
    for name in wanted & index.keys():
        child = children[index[name]]
        if not pa.types.is_floating(child.type):
            child = child.cast(pa.float64(), safe=False)
        out[name] = child.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return out


def _score(scorer: Scorer, features: pa.StructArray, columns: dict[str, np.ndarray] | None,
           n: int) -> ScoreResult:
    if scorer.single and columns is not None:
        return scorer.parse(scorer.run(scorer.feeds_columns(columns, n)), n, with_scores=False)
    # Several inputs (string tensors, per-feature shapes): the record path the service uses.
    return scorer.parse(scorer.run(scorer.feeds(features.to_pylist())), n, with_scores=False)


def _labels(result: ScoreResult) -> np.ndarray:
    return np.asarray(result.labels, dtype=object)


def _compare(side: Side, result: ScoreResult, chunk: pa.RecordBatch, prefix: str, truth: np.ndarray,
             known: np.ndarray, classification: bool) -> None:
    values = result.raw_scores if result.values is not None else None
    value_column = chunk.column(f"{prefix}_value")
    label_column = chunk.column(f"{prefix}_label")
    logged_labels = label_column.to_numpy(zero_copy_only=False)
    if values is not None:
        logged_values = value_column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        present = ~np.isnan(logged_values)
    else:
        present = pc.is_valid(label_column).to_numpy(zero_copy_only=False)
    side.logged += int(present.sum())
    labels = _labels(result) if result.labels is not None else None
    if values is not None:
        diff = np.abs(values[present] - logged_values[present])
        same = diff == 0.0
        close = np.zeros_like(same)
        if result.float32:
            ulp = np.spacing(np.abs(logged_values[present]).astype(np.float32)).astype(np.float64)
            close = ~same & (diff <= FLOAT32_ULPS * ulp)
        if labels is not None:
            label_same = labels[present] == logged_labels[present]
            same &= label_same
            close &= label_same
        side.reproduced += int(same.sum())
        side.within_rounding += int(close.sum())
        if diff.size:
            side.max_abs_diff = max(side.max_abs_diff, float(diff.max()))
    else:
        assert labels is not None
        side.reproduced += int((labels[present] == logged_labels[present]).sum())
    if result.labels is not None:
        # first-seen order, like the per-event loop
        for label, count in Counter(result.labels).items():
            side.distribution[label] = side.distribution.get(label, 0) + count
    if not known.any():
        return
    if classification:
        assert labels is not None
        side.correct += int((labels[known] == truth[known]).sum())
    else:
        assert values is not None
        errors = np.abs(values[known] - truth[known].astype(np.float64)).tolist()
        # Left to right, one event at a time, so the MAE is the same float whatever the batch size.
        side.abs_error = functools.reduce(operator.add, errors, side.abs_error)


def _agreement(a: ScoreResult, b: ScoreResult, classification: bool) -> int:
    if classification and a.labels is not None and b.labels is not None:
        return int((_labels(a) == _labels(b)).sum())
    return int(np.sum(np.abs(np.asarray(a.values) - np.asarray(b.values)) <= 1e-9))
