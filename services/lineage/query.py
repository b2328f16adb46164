"""Questions the lineage store answers: what a model
said, one event's whole chain, forgetting a key."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from loopline.errors import LooplineError
from loopline.model_ref import version_id
from loopline.registry import RegistryState
from loopline.services.lineage import forgotten as forgotten_list
from loopline.services.lineage import rows
from loopline.services.lineage.forgotten import Forgotten
from loopline.services.lineage.store import TABLES, LineageStore

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """Parse ISO-8601, epoch milliseconds, or a duration
    back from now ("90s", "15m", "1h", "2d")."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if m := _RELATIVE.match(text):
        return datetime.fromtimestamp(now.timestamp() - float(m[1]) * _UNITS[m[2]], UTC)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise LooplineError(f"cannot read time {text!r}: use ISO-8601 (2026-11-25T10:00), epoch "
                            "ms, or a duration back from now (30m, 1h, 2d)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# What makes a row unique in each view. The store never holds one offset twice, but a service that
# crashed after producing and before committing re-produces its batch at new offsets: ingest the
# same event (same event_id), inference the same prediction (same deterministic prediction_id).
# Readers see each once; the copy at the lowest offset stays. Feedback is produced by clients, not
# by a retrying service, so its offset identifies it.
# One row per event (an event id re-sent with other content is another event: never hidden), per
# prediction and per feedback message, whatever incarnation of a topic or retry stored it.
_IDENTITY = {"features": "event_id, coalesce(content_hash, '')", "predictions": "prediction_id",
             "feedback": "feedback_id"}


# Which columns of each table name a subject: a row whose value is on the forgotten list is hidden.
_SUBJECT_COLUMNS = {"features": (("key", "keys"), ("event_id", "events")),
                    "predictions": (("key", "keys"), ("event_id", "events"),
                                    ("prediction_id", "predictions")),
                    "feedback": (("event_id", "events"), ("prediction_id", "predictions"))}


def _unforgotten(con: duckdb.DuckDBPyConnection, forgotten: Forgotten, table: str) -> str:
    """A WHERE clause hiding the rows of forgotten subjects (TRUE when nothing is forgotten)."""
    if not forgotten:
        return "TRUE"
    if "_forgotten" not in {r[0] for r in con.execute("SHOW TABLES").fetchall()}:
        pairs = forgotten.digests()
        con.register("_forgotten", pa.table({"kind": [k for k, _ in pairs],
                                             "digest": [d for _, d in pairs]}))
    salt = forgotten.salt.replace("'", "''")
    return " AND ".join(
        f"coalesce(sha256('{salt}' || {column}), '') NOT IN "
        f"(SELECT digest FROM _forgotten WHERE kind = '{kind}')"
        for column, kind in _SUBJECT_COLUMNS[table])


def connect(store: LineageStore, pipeline: str,
            hide_forgotten: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``features``, ``predictions``, ``feedback`` (deduplicated).

    ``<table>_stored`` views hold every stored row, retried copies included (their offsets matter
    when asking which models trained on an event). Neither shows rows of subjects on the
    pipeline's forgotten list, unless ``hide_forgotten`` is False (forget itself looks there).
    """
    con = duckdb.connect()
    forgotten = (forgotten_list.load(forgotten_list.path_of(store.root, pipeline))
                 if hide_forgotten else forgotten_list.EMPTY)
    for table in TABLES:
        files = [str(p) for p in store.files(pipeline, table)]
        if files:
            listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {table}_stored AS "
                        f"SELECT * FROM read_parquet([{listing}], union_by_name=true) "
                        f"WHERE {_unforgotten(con, forgotten, table)}")
        else:
            schema = {"predictions": rows.PREDICTIONS, "feedback": rows.FEEDBACK}.get(table)
            if schema is None:  # no features stored: an empty table with the fixed columns
                schema = pa.schema([f for f in rows.FEEDBACK if f.name.startswith("_")]
                                   + [("event_id", pa.string()), ("key", pa.string()),
                                      ("content_hash", pa.string())])
            con.register(f"_{table}_empty", schema.empty_table())
            con.execute(f"CREATE VIEW {table}_stored AS SELECT * FROM _{table}_empty")
        identity = _IDENTITY[table]
        columns = {r[0] for r in con.execute(f"DESCRIBE {table}_stored").fetchall()}
        # written before ids had a content
        if table == "features" and "content_hash" not in columns:
            identity = "event_id"
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM {table}_stored QUALIFY row_number() "
                    f"OVER (PARTITION BY {identity} ORDER BY _topic, _partition, _offset) = 1")
    return con


@dataclass
class QueryResult:
    """Predictions of a window: summary and rows."""

    summary: dict[str, Any]
    distribution: list[dict[str, Any]]
    rows: list[dict[str, Any]]


def query_predictions(store: LineageStore, pipeline: str, model: str | None = None,
                      version: int | None = None,
                      since: datetime | None = None, until: datetime | None = None,
                      limit: int = 50) -> QueryResult:
    """What the model(s) output in the window, for whom: counts, output distribution, rows."""
    if pipeline not in store.pipelines():
        raise LooplineError(f"the lineage store at {store.root} holds nothing for pipeline "
                            f"{pipeline!r} (it has: "
                            f"{', '.join(store.pipelines()) or 'nothing yet'})")
    con = connect(store, pipeline)
    where, params = ["TRUE"], []
    for clause, value in (("model_name = ?", model), ("model_version = ?", version),
                          ("event_ts >= ?", since), ("event_ts < ?", until)):
        if value is not None:
            where.append(clause)
            params.append(value)
    cond = " AND ".join(where)
    summary = con.execute(
        f"SELECT count(*) AS predictions, count(*) FILTER (WHERE served) AS served, "
        f"count(DISTINCT event_id) AS events, count(DISTINCT key) AS keys, "
        f"min(event_ts) AS first_event, max(event_ts) AS last_event, avg(value) AS mean_value "
        f"FROM predictions WHERE {cond}", params).fetchone()
    names = ["predictions", "served", "events", "keys", "first_event", "last_event", "mean_value"]
    dist = con.execute(
        "SELECT model_name, model_version, variant, coalesce(label, '(none)') AS label, count(*) "
        f"AS n, avg(value) AS mean_value FROM predictions WHERE {cond} GROUP BY ALL ORDER BY "
        "ALL", params)
    dist_rows = [dict(zip([d[0] for d in dist.description], r, strict=True))
                 for r in dist.fetchall()]
    detail = con.execute(
        f"SELECT event_ts, event_id, key, model_name, model_version, variant, served, label, value "
        f"FROM predictions WHERE {cond} ORDER BY event_ts, event_id, variant LIMIT {int(limit)}",
        params)
    detail_rows = [dict(zip([d[0] for d in detail.description], r, strict=True))
                   for r in detail.fetchall()]
    return QueryResult(dict(zip(names, summary, strict=True)),  # type: ignore[arg-type]  # an aggregate: one row
                       dist_rows, detail_rows)


def _records(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = con.execute(sql, params)
    return [dict(zip([d[0] for d in cur.description], r, strict=True)) for r in cur.fetchall()]


def _trained_on(state: RegistryState, pipeline: str, hits: list[tuple[str, int, int]]) -> list[str]:
    """Model versions whose training ranges include any of the (topic, partition, offset) hits."""
    found = []
    for (p, name, version), v in sorted(state.versions.items()):
        if p != pipeline:
            continue
        for r in v.get("training_ranges", []):
            if any(t == r["topic"] and part == r["partition"]
                   and r["first_offset"] <= off <= r["last_offset"]
                   for t, part, off in hits):
                found.append(version_id(name, version))
                break
    return found


def trace(store: LineageStore, state: RegistryState, event_id: str) -> dict[str, Any]:
    """The chain of one event: raw offset, features,
    every variant's prediction, feedback, trained-on."""
    for pipeline in store.pipelines():
        con = connect(store, pipeline)
        features = _records(con, "SELECT * FROM features WHERE event_id = ?", [event_id])
        predictions = _records(con,
                               "SELECT * EXCLUDE (scores), map_entries(scores) AS scores FROM "
                               "predictions WHERE event_id = ? ORDER BY variant", [event_id])
        if not features and not predictions:
            continue
        ids = [p["prediction_id"] for p in predictions]
        feedback = _records(con,
                            "SELECT * FROM feedback WHERE event_id = ? OR list_contains(?, "
                            "prediction_id) ORDER BY ts", [event_id, ids])
        copies = con.execute("SELECT _topic, _partition, _offset FROM features_stored WHERE "
                             "event_id = ?",
                             [event_id]).fetchall()
        hits = [tuple(c) for c in copies] + [(f["_topic"], f["_partition"], f["_offset"])
                                             for f in feedback]
        return {"pipeline": pipeline, "event_id": event_id, "features": features,
                "predictions": predictions,
                "feedback": feedback, "trained_on": _trained_on(state, pipeline, hits)}
    raise LooplineError(f"event {event_id!r} is not in the lineage store at {store.root}")


def served_at(state: RegistryState, pipeline: str, when: datetime) -> list[dict[str, Any]]:
    """The deployment of ``pipeline`` at ``when``: every version with its stage and traffic then."""
    if pipeline not in state.specs:
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry")
    plan = state.deployment_at(pipeline, int(when.timestamp() * 1000))
    order = {"champion": 0, "canary": 1, "challenger": 2, "shadow": 3}
    return sorted(({"model": version_id(n, v), "stage": s, "traffic": t}
                   for (n, v), (s, t) in plan.items()),
                  key=lambda d: (order.get(d["stage"], 9), d["model"]))


def subject_ids(store: LineageStore, pipeline: str, key: str) -> tuple[list[str], list[str]]:
    """The event ids and prediction ids of ``key`` in the store, forgotten rows included."""
    con = connect(store, pipeline, hide_forgotten=False)
    try:
        events = sorted(r[0] for r in con.execute(
            "SELECT DISTINCT event_id FROM features_stored WHERE key = ? "
            "UNION SELECT DISTINCT event_id FROM predictions_stored WHERE key = ?",
            [key, key]).fetchall())
        predictions = sorted(r[0] for r in con.execute(
            "SELECT DISTINCT prediction_id FROM predictions_stored "
            "WHERE key = ? OR list_contains(?, event_id)", [key, events]).fetchall())
    finally:
        con.close()
    return events, predictions


def forget(store: LineageStore, state: RegistryState, pipeline: str, key: str,
           events: Iterable[str] = (), predictions: Iterable[str] = (),
           remove: bool = True) -> dict[str, Any]:
    """Remove every row of ``key`` and of the given ids; list the models trained on them.

    ``events`` counts the subject's events found in the store; ``event_ids`` and
    ``prediction_ids`` are every id removed (the store's and the given ones). ``remove=False``
    counts what would go and removes nothing.
    """
    stored, stored_predictions = subject_ids(store, pipeline, key)
    event_ids = sorted(set(stored) | set(events))
    prediction_ids = sorted(set(stored_predictions) | set(predictions))
    con = connect(store, pipeline, hide_forgotten=False)
    hits = [tuple(r) for r in con.execute(
        "SELECT _topic, _partition, _offset FROM features_stored "
        "WHERE key = ? OR list_contains(?, event_id) "
        "UNION ALL SELECT _topic, _partition, _offset FROM feedback_stored "
        "WHERE list_contains(?, event_id) OR list_contains(?, prediction_id)",
        [key, event_ids, event_ids, prediction_ids]).fetchall()]
    con.close()
    removed = {t: 0 for t in TABLES}
    for table in TABLES:
        for path in store.files(pipeline, table):
            removed[table] += _drop_rows(store, path, table, key, set(event_ids),
                                         set(prediction_ids), remove)
    return {"pipeline": pipeline, "key": key, "events": len(stored), "event_ids": event_ids,
            "prediction_ids": prediction_ids, "removed": removed,
            "trained_on": _trained_on(state, pipeline, hits)}


def _drop_rows(store: LineageStore, path: Path, table: str, key: str, events: set[str],
               predictions: set[str], remove: bool = True) -> int:
    data = pq.read_table(path)
    columns = set(data.column_names)

    def values(name: str) -> list[Any]:
        return data[name].to_pylist() if name in columns else [None] * data.num_rows

    subject = [k == key or e in events or p in predictions for k, e, p in
               zip(values("key"), values("event_id"), values("prediction_id"), strict=True)]
    dropped = subject.count(True)
    if dropped and remove:
        store.rewrite(path, data.filter(pa.array([not s for s in subject])))
    return dropped
