"""Replay a logged time range through model versions: backtests and reproducibility audits."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from loopline.artifacts import read_artifact
from loopline.errors import LooplineError
from loopline.registry import RegistryState
from loopline.services.inference.scorer import Scorer
from loopline.services.lineage.query import connect
from loopline.services.lineage.store import LineageStore

BATCH = 20_000


def load_scorer(state: RegistryState, pipeline: str, name: str, version: int) -> Scorer:
    """The registered version, read from the artifact store (sha256 checked) and loaded in ONNX Runtime."""
    record = state.versions.get((pipeline, name, version))
    if record is None:
        known = ", ".join(f"{n}@{v}" for p, n, v in sorted(state.versions) if p == pipeline) or "none"
        raise LooplineError(f"{name}@{version} is not a version of pipeline {pipeline} (known: {known})")
    model = read_artifact(record["uri"], record["sha256"])
    return Scorer(model, state.specs[pipeline], record.get("fill_values"), label=f"{name}@{version}",
                  input_features=record.get("input_features") or None)


@dataclass
class Side:
    """One replayed version's outputs and how they compare."""

    model: str
    labels: list[str] | None = None
    values: np.ndarray | None = None
    logged: int = 0  # events this version had served or scored live, in the window
    reproduced: int = 0  # of those, how many it reproduced exactly now
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
        return side.correct / self.labeled if self.task == "classification" else side.abs_error / self.labeled


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
    FROM predictions GROUP BY ALL
)
SELECT f.event_id, f.features, t.truth_label, t.truth_value,
       a.label AS a_label, a.value AS a_value, b.label AS b_label, b.value AS b_value
FROM (SELECT * FROM features WHERE (?::TIMESTAMPTZ IS NULL OR ts >= ?) AND (?::TIMESTAMPTZ IS NULL OR ts < ?)) f
LEFT JOIN truth t USING (event_id)
LEFT JOIN logged a ON a.event_id = f.event_id AND a.model_name = ? AND a.model_version = ?
LEFT JOIN logged b ON b.event_id = f.event_id AND b.model_name = ?::VARCHAR AND b.model_version = ?::INTEGER
QUALIFY row_number() OVER (PARTITION BY f.event_id) = 1
ORDER BY f.ts, f.event_id
"""


def replay(store: LineageStore, state: RegistryState, pipeline: str, model: tuple[str, int],
           against: tuple[str, int] | None = None, since: datetime | None = None, until: datetime | None = None,
           progress: Callable[[int, int], None] | None = None) -> ReplayReport:
    """Re-score the logged inputs of the window with ``model`` (and ``against``) and compare."""
    if pipeline not in state.specs:
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry")
    if pipeline not in store.pipelines():
        raise LooplineError(f"the lineage store at {store.root} holds nothing for pipeline {pipeline!r}")
    spec = state.specs[pipeline]
    versions = [model] + ([against] if against else [])
    scorers = [load_scorer(state, pipeline, n, v) for n, v in versions]
    other = against or (None, None)
    con = connect(store, pipeline)
    window = [since, since, until, until]
    total = con.execute("SELECT count(*) FROM features WHERE (?::TIMESTAMPTZ IS NULL OR ts >= ?) "
                        "AND (?::TIMESTAMPTZ IS NULL OR ts < ?)", window).fetchall()[0][0]
    started = time.perf_counter()
    reader = con.sql(_ROWS_SQL, params=[*window, model[0], model[1], other[0], other[1]]).to_arrow_reader(BATCH)
    sides = [Side(f"{n}@{v}") for n, v in versions]
    rows = labeled = agree = 0
    classification = spec.label.task == "classification"
    for chunk in reader:
        n = chunk.num_rows
        features = chunk.column("features").to_pylist()
        truth = chunk.column("truth_label" if classification else "truth_value").to_pylist()
        results = [s.score(features) for s in scorers]
        for side, result, prefix in zip(sides, results, ("a", "b"), strict=False):
            _compare(side, result, chunk, prefix, truth, classification)
        if len(results) == 2:
            agree += _agreement(results[0], results[1], classification)
        labeled += sum(t is not None for t in truth)
        rows += n
        if progress:
            progress(rows, total)
    seconds = time.perf_counter() - started
    con.close()
    return ReplayReport(pipeline, rows, labeled, seconds, sides, agree / rows if against and rows else None,
                        spec.label.task)


def _compare(side: Side, result: Any, chunk: Any, prefix: str, truth: list[Any], classification: bool) -> None:
    values = np.asarray(result.values, dtype=np.float64) if result.values is not None else None
    logged_values = chunk.column(f"{prefix}_value").to_numpy(zero_copy_only=False)
    logged_labels = chunk.column(f"{prefix}_label").to_pylist()
    present = ~np.isnan(logged_values.astype(np.float64)) if values is not None else \
        np.array([lab is not None for lab in logged_labels])
    side.logged += int(present.sum())
    if values is not None:
        diff = np.abs(values[present] - logged_values[present].astype(np.float64))
        same = diff == 0.0
        if result.labels is not None:
            same &= np.array([a == b for a, b, p in zip(result.labels, logged_labels, present, strict=True) if p],
                             dtype=bool)
        side.reproduced += int(same.sum())
        if diff.size:
            side.max_abs_diff = max(side.max_abs_diff, float(diff.max()))
    else:
        side.reproduced += sum(a == b for a, b, p in zip(result.labels, logged_labels, present, strict=True) if p)
    if result.labels is not None:
        for label in result.labels:
            side.distribution[label] = side.distribution.get(label, 0) + 1
    for i, t in enumerate(truth):
        if t is None:
            continue
        if classification:
            side.correct += int(result.labels[i] == t)
        else:
            side.abs_error += abs(float(values[i]) - float(t))  # type: ignore[index]


def _agreement(a: Any, b: Any, classification: bool) -> int:
    if classification and a.labels is not None and b.labels is not None:
        return sum(x == y for x, y in zip(a.labels, b.labels, strict=True))
    return int(np.sum(np.abs(np.asarray(a.values) - np.asarray(b.values)) <= 1e-9))
