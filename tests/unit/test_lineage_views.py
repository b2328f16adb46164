"""The lineage views show a retried (re-produced) event
or prediction once; forget/trace still see every copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopline.registry import RegistryState
from loopline.services.lineage import query as q
from loopline.services.lineage import rows
from loopline.services.lineage.store import LineageStore
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "p", "key": "user", "partitions": 1,
                   "features": [{"name": "user", "type": "string"},
                                {"name": "x", "type": "float"}]})


def prediction(event_id: str, offset: int, features_offset: int) -> dict[str, Any]:
    return {"prediction_id": f"id-{event_id}", "event_id": event_id, "key": "u1", "model_name": "m",
            "model_version": 1, "model_sha256": "0" * 64, "variant": "champion", "served": True,
            "label": "1", "value": 0.9, "scores": [("0", 0.1), ("1", 0.9)],
            "features_topic": "loopline.p.features",
            "features_partition": 0, "features_offset": features_offset, "event_ts": 1000,
            "scored_at": 1005,
            "_topic": "loopline.p.predictions", "_partition": 0, "_offset": offset}


def feature(event_id: str, offset: int) -> dict[str, Any]:
    return {"event_id": event_id, "key": "u1", "ts": 1000, "ingested_at": 1000,
            "raw_topic": "loopline.p.raw", "raw_partition": 0, "raw_offset": int(event_id[1:]),
            "features": {"user": "u1", "x": 1.0},
            "_topic": "loopline.p.features", "_partition": 0, "_offset": offset}


def test_retried_copies_are_read_once_and_still_count_for_trained_on(tmp_path: Path) -> None:
    store = LineageStore(tmp_path)
    # e0, e1 first; then a crashed ingest re-produced e1 (features offset 2) and a crashed inference
    # re-produced both predictions (predictions offsets 2, 3), each copy in its own file.
    store.write("p", "features", "loopline.p.features", "id0", 0,
                [feature("e0", 0), feature("e1", 1)], rows.features_schema(SPEC))
    store.write("p", "features", "loopline.p.features", "id0", 0, [feature("e1", 2)],
                rows.features_schema(SPEC))
    store.write("p", "predictions", "loopline.p.predictions", "id0", 0,
                [prediction("e0", 0, 0), prediction("e1", 1, 1)], rows.PREDICTIONS)
    store.write("p", "predictions", "loopline.p.predictions", "id0", 0,
                [prediction("e0", 2, 0), prediction("e1", 3, 2)], rows.PREDICTIONS)
    con = q.connect(store, "p")
    assert con.execute(
        "SELECT count(*), count(DISTINCT event_id) FROM predictions").fetchone() == (2, 2)
    # first copies
    assert con.execute("SELECT min(_offset), max(_offset) FROM predictions").fetchone() == (0, 1)
    assert con.execute("SELECT count(*) FROM features").fetchone() == (2,)
    assert con.execute("SELECT count(*) FROM features_stored").fetchone() == (3,)
    assert q.query_predictions(store, "p").summary["served"] == 2

    # A model trained on the retried copy of e1 (offset 2) only: trace and forget must still name
    # it.
    state = RegistryState()
    state.versions[("p", "m", 1)] = {"training_ranges": [{"topic": "loopline.p.features",
                                                          "partition": 0,
                                                          "first_offset": 2, "last_offset": 2,
                                                          "count": 1}]}
    chain = q.trace(store, state, "e1")
    assert len(chain["features"]) == 1 and len(chain["predictions"]) == 1
    assert chain["trained_on"] == ["m/1"]
    assert q.forget(store, state, "p", "u1")["trained_on"] == ["m/1"]
