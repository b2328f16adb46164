"""What the report shows, computed from the lineage store, the registry and the alerts.

Counts come from the lineage store's deduplicated views (``services/lineage/query.py``
:func:`connect`), over the same window and with the same conditions as ``loopline lineage query``;
the summary and the output distribution are that command's own result
(:func:`query_predictions`), so the report's numbers are its numbers.

Served performance joins each served prediction with the first feedback on its event (a label, a
value, or an accept/reject verdict on the prediction served), as the monitor does. Per-feature drift
is the PSI of the last window of stored feature values a version scored, at the end of each time
bucket, against the reference profile stored with that version, with the monitor's PSI
(``services/monitor/windowed.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from loopline.errors import LooplineError
from loopline.model_profile import PREFIX, ModelProfile
from loopline.model_ref import version_id
from loopline.models import versions_of
from loopline.profile import bin_fractions
from loopline.registry import RegistryState
from loopline.services.lineage.query import QueryResult, connect, query_predictions
from loopline.services.lineage.store import LineageStore
from loopline.services.monitor.pipeline import drift_tested
from loopline.services.monitor.windowed import MIN_EXPECTED, psi
from loopline.spec import PipelineSpec

#: Bucket widths a time axis may use (ms): the smallest that gives every bucket enough rows.
_NICE_MS = [
    s * 1000
    for s in (
        1,
        2,
        5,
        10,
        15,
        20,
        30,
        60,
        120,
        300,
        600,
        900,
        1800,
        3600,
        7200,
        10800,
        21600,
        43200,
        86400,
        172800,
        604800,
    )
]
#: Buckets on a time axis at most; and served predictions a bucket should hold on average.
MAX_BUCKETS, ROWS_PER_BUCKET = 40, 100
#: Feature values a drift comparison needs: below that, PSI is mostly sampling noise.
MIN_DRIFT_ROWS = 200
#: Labeled predictions a bucket needs before its accuracy (or error) is shown.
MIN_LABELED = 10


def model_id(name: str, version: int) -> str:
    """How the report names a version: ``NAME/VERSION``, as ``lineage query --model`` takes it."""
    return version_id(name, version)


@dataclass
class VersionInfo:
    """One registered version as the report shows it."""

    model: str
    name: str
    version: int
    stage: str
    traffic: float
    created_at: int
    trigger: str | None
    parent: str | None
    sha256: str
    metrics: dict[str, float]
    scorecard: dict[str, Any] | None
    profile: ModelProfile | None
    reference: dict[str, Any] | None = field(repr=False)


@dataclass
class ReportData:
    """Everything one report shows, computed once; the page only lays it out."""

    pipeline: str
    spec: PipelineSpec
    generated_at: datetime
    since: datetime | None
    until: datetime | None
    query: QueryResult  # `loopline lineage query`'s own result for the same window
    bucket_ms: int
    metric: str  # "accuracy" (classification) or "MAE" (regression)
    performance: list[dict[str, Any]]  # bucket, model, labeled, value, sq (sum of squares)
    performance_total: list[dict[str, Any]]  # model, labeled, value
    drift: list[dict[str, Any]]  # model, feature, at (last value's time), bucket, psi, n
    traffic: list[dict[str, Any]]  # bucket, model, served
    latency: list[dict[str, Any]]  # bucket, n, p50, p95, p99 (served predictions)
    latency_by_version: list[dict[str, Any]]  # model, variant, n, p50, p95, p99, max
    latency_total: dict[str, Any]  # n, p50, p95, p99, max of every served prediction
    histograms: list[dict[str, Any]]  # regression: model, edges, counts of the predicted values
    versions: list[VersionInfo]
    stage_changes: list[dict[str, Any]]  # at, model, from_stage, to_stage, traffic, reason, actor
    timeline: list[dict[str, Any]]  # model, stage, start, end (ms)
    alerts: list[dict[str, Any]]  # the pipeline's alert events in the window, oldest first
    range_ms: tuple[int, int] | None  # the time axis every time chart shares

    @property
    def regression(self) -> bool:
        """Whether the pipeline predicts values (error) rather than classes (accuracy)."""
        return self.spec.label.task == "regression"


def pick_bucket_ms(span_ms: int, rows: int) -> int:
    """A round bucket width: at most :data:`MAX_BUCKETS` buckets, of ``ROWS_PER_BUCKET`` rows+."""
    target = max(span_ms / MAX_BUCKETS, span_ms * ROWS_PER_BUCKET / max(rows, 1))
    return next((b for b in _NICE_MS if b >= target), _NICE_MS[-1])


def _window(
    since: datetime | None, until: datetime | None, alias: str = ""
) -> tuple[str, list[Any]]:
    """The window condition `lineage query` applies to predictions (event time, until exclusive)."""
    where, params = ["TRUE"], []
    for clause, value in (("event_ts >= ?", since), ("event_ts < ?", until)):
        if value is not None:
            where.append(alias + clause)
            params.append(value)
    return " AND ".join(where), params


def _rows(con: Any, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, list(params))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _performance(
    con: Any, regression: bool, cond: str, params: list[Any], bucket: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Served accuracy (or absolute error) per bucket and version, and per version overall."""
    score = (
        "CASE WHEN t.value IS NOT NULL THEN abs(s.value - t.value) "
        "WHEN t.verdict = 'accept' THEN 0.0 END"
        if regression
        else "CASE WHEN t.label IS NOT NULL THEN CAST(s.label = t.label AS DOUBLE) "
        "WHEN t.verdict = 'accept' THEN 1.0 WHEN t.verdict = 'reject' THEN 0.0 END"
    )
    # Feedback names an event or a prediction; the first on an event is its truth (the monitor's
    # rule), and it judges the prediction served for that event.
    base = f"""
        WITH fb AS (
            SELECT coalesce(f.event_id, p.event_id) AS eid, f.label, f.value, f.verdict, f.ts,
                   f._topic, f._partition, f._offset
            FROM feedback f LEFT JOIN predictions p ON f.prediction_id = p.prediction_id),
        truth AS (
            SELECT * FROM fb WHERE eid IS NOT NULL
            QUALIFY row_number() OVER (PARTITION BY eid
                                       ORDER BY ts, _topic, _partition, _offset) = 1),
        scored AS (
            SELECT (epoch_ms(s.event_ts) // {bucket}) * {bucket} AS bucket,
                   s.model_name, s.model_version, {score} AS score
            FROM predictions s JOIN truth t ON s.event_id = t.eid
            WHERE s.served AND {cond})
    """
    per_bucket = _rows(
        con,
        base + "SELECT bucket, model_name, model_version, count(score) AS labeled, "
        "avg(score) AS value, sum(score * score) AS sq FROM scored "
        "WHERE score IS NOT NULL GROUP BY ALL ORDER BY ALL",
        params,
    )
    total = _rows(
        con,
        base + "SELECT model_name, model_version, count(score) AS labeled, avg(score) AS value "
        "FROM scored WHERE score IS NOT NULL GROUP BY ALL ORDER BY ALL",
        params,
    )
    for r in per_bucket + total:
        r["model"] = model_id(r.pop("model_name"), r.pop("model_version"))
    return per_bucket, total


def _psi_numeric(reference: Mapping[str, Any], values: np.ndarray) -> float | None:
    edges = reference.get("edges") or []
    if not edges:
        return None
    ref = np.asarray(reference.get("fractions") or [], dtype=float)
    return psi(ref, np.asarray(bin_fractions(values, edges)))


def _psi_categorical(reference: Mapping[str, Any], values: Sequence[str]) -> float | None:
    shares = dict(reference.get("fractions") or {})
    # The monitor's pooling: a category expected fewer than MIN_EXPECTED times in this many values
    # joins the unseen ones, or ID-like columns would drift on sampling noise alone.
    kept = sorted(c for c, s in shares.items() if s * len(values) >= MIN_EXPECTED)
    if not kept:
        return None
    index = {c: i for i, c in enumerate(kept)}
    counts = np.bincount([index.get(v, len(kept)) for v in values], minlength=len(kept) + 1)
    ref = [shares[c] for c in kept] + [sum(s for c, s in shares.items() if c not in index)]
    return psi(np.asarray(ref, dtype=float), counts / max(1, len(values)))


def drift_features(spec: PipelineSpec, reference: Mapping[str, Any]) -> list[str]:
    """The features the report charts drift for: those with a reference, but no key or id.

    The monitor's own rule (keys and id-like strings identify entities, they have no
    distribution to drift), so the report never shows a drift the alerts would not.
    """
    return [f.name for f in spec.features
            if f.name in reference and drift_tested(spec, f.name, reference[f.name])]


def _drift(
    con: Any,
    spec: PipelineSpec,
    versions: Sequence[VersionInfo],
    cond: str,
    params: list[Any],
    bucket: int,
) -> list[dict[str, Any]]:
    """Each feature's PSI against each version's reference, at the end of every time bucket.

    Like the monitor, a comparison covers the last ``spec.monitor.window`` values the version
    scored (fewer at the start, never under :data:`MIN_DRIFT_ROWS`): a bucket alone holds too few
    values for PSI, whose chance level is about (bins - 1) / values.
    """
    columns = {r[0] for r in con.execute("DESCRIBE features").fetchall()}
    if "features" not in columns:
        return []
    window = spec.monitor.window
    out: list[dict[str, Any]] = []
    for v in versions:
        ref = (v.reference or {}).get("features") or {}
        names = drift_features(spec, ref)
        if not names:
            continue
        select = ", ".join(f'f.features."{n}" AS "{n}"' for n in names)
        data = con.execute(
            f"SELECT epoch_ms(p.event_ts) AS t, {select} FROM (SELECT DISTINCT event_id, event_ts "
            f"FROM predictions WHERE model_name = ? AND model_version = ? AND {cond}) p "
            "JOIN features f USING (event_id) ORDER BY t, event_id",
            [v.name, v.version, *params],
        ).fetchnumpy()
        times = np.asarray(data["t"], dtype=np.int64)
        if not times.size:
            continue
        buckets = (times // bucket) * bucket
        ends = np.r_[np.flatnonzero(buckets[1:] != buckets[:-1]) + 1, times.size]
        for n in names:
            numeric = ref[n].get("kind") == "numeric"
            column = data[n]
            if numeric:
                values: Any = np.ma.filled(np.ma.asarray(column, dtype=float), np.nan)
            else:
                values = [
                    None if m else str(x)
                    for x, m in zip(column, np.ma.getmaskarray(column), strict=True)
                ]
            for end in ends:
                recent = values[max(0, end - window) : end]
                if numeric:
                    present = recent[np.isfinite(recent)]
                    count = int(present.size)
                    value = _psi_numeric(ref[n], present) if count >= MIN_DRIFT_ROWS else None
                else:
                    texts = [x for x in recent if x is not None]
                    count = len(texts)
                    value = _psi_categorical(ref[n], texts) if count >= MIN_DRIFT_ROWS else None
                if value is not None:
                    out.append(
                        {
                            "model": v.model,
                            "feature": n,
                            "at": int(times[end - 1]),
                            "bucket": int(buckets[end - 1]),
                            "psi": value,
                            "n": count,
                        }
                    )
    return out


def _latency(
    con: Any, cond: str, params: list[Any], bucket: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Event time to scoring time (ms) of served predictions per bucket and in all; per version."""
    ms = "epoch_ms(scored_at) - epoch_ms(event_ts)"
    q = f"quantile_cont({ms}, [0.5, 0.95, 0.99])"
    per_bucket = _rows(
        con,
        f"SELECT (epoch_ms(event_ts) // {bucket}) * {bucket} AS bucket, count(*) AS n, "
        f"{q} AS q FROM predictions WHERE served AND {cond} GROUP BY ALL ORDER BY ALL",
        params,
    )
    per_version = _rows(
        con,
        f"SELECT model_name, model_version, variant, count(*) AS n, {q} AS q, "
        f"max({ms}) AS max FROM predictions WHERE {cond} GROUP BY ALL ORDER BY ALL",
        params,
    )
    [total] = _rows(
        con,
        f"SELECT count(*) AS n, {q} AS q, max({ms}) AS max FROM predictions "
        f"WHERE served AND {cond}",
        params,
    )
    total["q"] = total["q"] or [None, None, None]
    for r in [*per_bucket, *per_version, total]:
        r["p50"], r["p95"], r["p99"] = r.pop("q")
        if "model_name" in r:
            r["model"] = model_id(r.pop("model_name"), r.pop("model_version"))
    return per_bucket, per_version, total


def _histograms(con: Any, cond: str, params: list[Any]) -> list[dict[str, Any]]:
    """Predicted values of every version on common bins (regression)."""
    data = con.execute(
        f"SELECT model_name, model_version, value FROM predictions WHERE {cond} "
        "AND value IS NOT NULL AND isfinite(value)",
        params,
    ).fetchnumpy()
    values = np.asarray(data["value"], dtype=float)
    if not values.size:
        return []
    edges = np.histogram_bin_edges(values, bins=30)
    out = []
    names = np.asarray(data["model_name"], dtype=object)
    numbers = np.asarray(data["model_version"])
    for name, number in sorted({(str(a), int(b)) for a, b in zip(names, numbers, strict=True)}):
        mine = values[(names == name) & (numbers == number)]
        counts, _ = np.histogram(mine, bins=edges)
        out.append(
            {"model": model_id(name, number), "edges": edges.tolist(), "counts": counts.tolist()}
        )
    return out


def version_infos(state: RegistryState, pipeline: str) -> list[VersionInfo]:
    """Every version of the pipeline, oldest first, with scorecard, profile and reference parsed."""
    out = []
    for v in versions_of(state, pipeline):
        card = orjson.loads(v["scorecard_json"]) if v.get("scorecard_json") else None
        ref = orjson.loads(v["reference_profile_json"]) if v.get("reference_profile_json") else None
        metrics = dict(v.get("metrics") or {})
        out.append(
            VersionInfo(
                model_id(v["name"], v["version"]),
                v["name"],
                v["version"],
                v["stage"],
                v["traffic"],
                v["created_at"],
                v.get("trigger"),
                v.get("parent"),
                v["sha256"],
                {k: x for k, x in metrics.items() if not k.startswith(PREFIX)},
                card if isinstance(card, dict) else None,
                ModelProfile.from_metrics(metrics),
                ref if isinstance(ref, dict) else None,
            )
        )
    return out


def _timeline(state: RegistryState, pipeline: str, end_ms: int) -> list[dict[str, Any]]:
    """Each version's stages as intervals [start, end) in registry order."""
    spans: list[dict[str, Any]] = []
    open_: dict[str, dict[str, Any]] = {}
    for at, p, name, version, stage, traffic in state.stage_history:
        if p != pipeline:
            continue
        model = model_id(name, version)
        current = open_.get(model)
        if current is not None and (current["stage"] == stage or current["start"] >= at):
            # The registration record and its "registered" stage change say the same thing; a
            # change at the very moment of the last one replaces it.
            current.update(stage=stage, traffic=traffic)
            continue
        if current is not None:
            current["end"] = at
        open_[model] = {
            "model": model,
            "stage": stage,
            "traffic": traffic,
            "start": at,
            "end": None,
        }
        spans.append(open_[model])
    for s in spans:
        if s["end"] is None:
            s["end"] = max(end_ms, s["start"])
    return spans


def _axis(
    query: QueryResult, since: datetime | None, until: datetime | None, moments: Sequence[int]
) -> tuple[int, int] | None:
    """The shared time axis: the window's events, widened to nearby alerts and stage changes."""
    first, last = query.summary.get("first_event"), query.summary.get("last_event")
    if first is None or last is None:
        return None
    lo, hi = int(first.timestamp() * 1000), int(last.timestamp() * 1000)
    span = max(hi - lo, 1000)
    near = [m for m in moments if lo - span // 4 <= m <= hi + span // 4]
    lo, hi = min([lo, *near]), max([hi, *near])
    if since is not None:
        lo = max(lo, int(since.timestamp() * 1000))
    if until is not None:
        hi = min(hi, int(until.timestamp() * 1000))
    pad = max((hi - lo) // 50, 500)
    return lo - pad, hi + pad


def collect(
    store: LineageStore,
    state: RegistryState,
    alerts: Sequence[Mapping[str, Any]],
    pipeline: str,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Compute everything the report of ``pipeline`` shows for the window [since, until)."""
    spec = state.specs.get(pipeline)
    if spec is None:
        known = ", ".join(sorted(state.specs)) or "none"
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry (known: {known})")
    now = now or datetime.now(UTC)
    query = query_predictions(store, pipeline, since=since, until=until, limit=0)
    cond, params = _window(since, until)
    versions = version_infos(state, pipeline)
    since_ms = int(since.timestamp() * 1000) if since else None
    until_ms = int(until.timestamp() * 1000) if until else None

    def inside(at: int) -> bool:
        return (since_ms is None or at >= since_ms) and (until_ms is None or at < until_ms)

    changes = [
        {
            "at": c["at"],
            "model": model_id(c["name"], c["version"]),
            "from_stage": c["from_stage"],
            "to_stage": c["to_stage"],
            "traffic": c["traffic"],
            "reason": c["reason"],
            "actor": c["actor"],
        }
        for c in state.stage_changes
        if c["pipeline"] == pipeline
    ]
    changes = [c for c in changes if inside(c["at"])]
    mine = sorted(
        (dict(a) for a in alerts if a.get("pipeline") == pipeline and inside(a["at"])),
        key=lambda a: a["at"],
    )
    axis = _axis(query, since, until, [c["at"] for c in changes] + [a["at"] for a in mine])
    served = int(query.summary.get("served") or 0)
    bucket = pick_bucket_ms(axis[1] - axis[0], served) if axis else _NICE_MS[0]
    con = connect(store, pipeline)
    try:
        regression = spec.label.task == "regression"
        performance, totals = _performance(con, regression, cond, params, bucket)
        drift = _drift(con, spec, versions, cond, params, bucket)
        traffic = _rows(
            con,
            f"SELECT (epoch_ms(event_ts) // {bucket}) * {bucket} AS bucket, model_name, "
            f"model_version, count(*) AS served FROM predictions WHERE served AND {cond} "
            "GROUP BY ALL ORDER BY ALL",
            params,
        )
        for r in traffic:
            r["model"] = model_id(r.pop("model_name"), r.pop("model_version"))
        latency, latency_by_version, latency_total = _latency(con, cond, params, bucket)
        histograms = _histograms(con, cond, params) if regression else []
    finally:
        con.close()
    end_ms = until_ms if until_ms is not None else int(now.timestamp() * 1000)
    return ReportData(
        pipeline=pipeline,
        spec=spec,
        generated_at=now,
        since=since,
        until=until,
        query=query,
        bucket_ms=bucket,
        metric="MAE" if regression else "accuracy",
        performance=performance,
        performance_total=totals,
        drift=drift,
        traffic=traffic,
        latency=latency,
        latency_by_version=latency_by_version,
        latency_total=latency_total,
        histograms=histograms,
        versions=versions,
        stage_changes=changes,
        timeline=_timeline(state, pipeline, end_ms),
        alerts=mine,
        range_ms=axis,
    )
