"""The forgotten list (salted digests, atomic adds, reloads, hiding views); forget's matching."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from loopline import avro
from loopline.errors import LooplineError
from loopline.registry import RegistryState
from loopline.services.lineage import forgotten as fl
from loopline.services.lineage import query as q
from loopline.services.lineage import rows
from loopline.services.lineage.forget import Holding, Scanner, Subject
from loopline.services.lineage.store import LineageStore
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "p", "key": "user", "partitions": 1,
                   "features": [{"name": "user", "type": "string"},
                                {"name": "x", "type": "float"}]})


def test_digest_is_what_duckdb_computes() -> None:
    salt = "0123456789abcdef0123456789abcdef"
    expected = duckdb.connect().execute(f"SELECT sha256('{salt}' || 'customer-42')").fetchone()
    assert expected is not None and fl.digest(salt, "customer-42") == expected[0]


def test_add_keeps_no_value_in_clear_and_one_salt(tmp_path: Path) -> None:
    path = tmp_path / "p" / fl.FILE_NAME
    first, added = fl.add(path, ["customer-42"], ["e1", "e2"], ["e1-champion"], at_ms=1)
    assert added == {"keys": 1, "events": 2, "predictions": 1}
    second, added = fl.add(path, ["customer-42", "c7"], ["e2", "e3"], [], at_ms=2)
    assert added == {"keys": 1, "events": 1, "predictions": 0}  # only what is new
    text = path.read_text()
    assert "customer-42" not in text and "e1-champion" not in text
    for clear in ("c7", "e1", "e2", "e3"):  # short ones may occur inside a digest, not as values
        assert f'"{clear}"' not in text
    doc = json.loads(text)
    assert doc["salt"] == first.salt == second.salt and len(doc["salt"]) == 32
    assert doc["log"] == [{"at": 1, "keys": 1, "events": 2, "predictions": 1},
                          {"at": 2, "keys": 1, "events": 1, "predictions": 0}]
    loaded = fl.load(path)
    assert loaded == second
    assert loaded.key("customer-42") and loaded.key("c7") and not loaded.key("customer-43")
    assert loaded.event("e3") and not loaded.event("e4") and loaded.prediction("e1-champion")
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_another_store_salts_differently(tmp_path: Path) -> None:
    a, _ = fl.add(tmp_path / "a" / fl.FILE_NAME, ["customer-42"], [], [], at_ms=1)
    b, _ = fl.add(tmp_path / "b" / fl.FILE_NAME, ["customer-42"], [], [], at_ms=1)
    assert a.keys != b.keys


def test_rows_and_message_keys_that_match(tmp_path: Path) -> None:
    f, _ = fl.add(tmp_path / fl.FILE_NAME, ["u1"], ["e1"], ["e1-champion"], at_ms=1)
    assert f.holds("features", {"key": "u1", "event_id": "e9"})
    assert f.holds("predictions", {"key": "u2", "event_id": "e1", "prediction_id": "x"})
    assert f.holds("feedback", {"event_id": None, "prediction_id": "e1-champion"})
    assert not f.holds("feedback", {"event_id": None, "prediction_id": "e2-champion"})
    assert not f.holds("predictions", {"key": None, "event_id": "e2", "prediction_id": "e2-x"})
    # Kafka keys: the event key, an event id (features without a key), a prediction id (feedback)
    assert f.message_key(b"u1") and f.message_key(b"e1") and f.message_key(b"e1-champion")
    assert not f.message_key(b"u2") and not f.message_key(None)
    assert not fl.EMPTY and not fl.EMPTY.message_key(b"u1")


def test_unreadable_list_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / fl.FILE_NAME
    assert fl.load(path) is fl.EMPTY
    path.write_text('{"format": 1, "salt": "short"}')
    with pytest.raises(LooplineError, match=r"forgotten.json is unreadable.*salt"):
        fl.load(path)
    with pytest.raises(LooplineError, match="unreadable"):  # never overwritten and lost
        fl.add(path, ["u1"], [], [], at_ms=1)


def test_watch_reloads_changes_and_keeps_the_last_good_list(tmp_path: Path) -> None:
    watch = fl.ForgottenWatch(tmp_path, interval_s=3600)
    assert not watch.get("p")
    path = fl.path_of(tmp_path, "p")
    fl.add(path, ["u1"], [], [], at_ms=1)
    assert not watch.get("p")  # not looked at again within the interval...
    assert watch.get("p", fresh=True).key("u1")  # ...but a fresh look sees the new file
    same = watch.get("p", fresh=True)
    assert watch.get("p", fresh=True) is same  # unchanged file: the same object, not re-read
    fl.add(path, ["u2"], [], [], at_ms=2)
    assert watch.get("p", fresh=True).key("u2")
    path.write_text("not json")
    assert watch.get("p", fresh=True).key("u2")  # the last good list stays in force
    with pytest.raises(LooplineError, match="unreadable"):
        fl.ForgottenWatch(tmp_path).get("p")  # nothing good read yet: refuse


def prediction(event_id: str, key: str, offset: int) -> dict[str, Any]:
    return {"prediction_id": f"{event_id}-champion", "event_id": event_id, "key": key,
            "model_name": "m", "model_version": 1, "model_sha256": "0" * 64, "variant": "champion",
            "served": True, "label": "1", "value": 0.9, "scores": [("1", 0.9)],
            "features_topic": "loopline.p.features",
            "features_partition": 0, "features_offset": offset, "event_ts": 1000, "scored_at": 1005,
            "_topic": "loopline.p.predictions", "_partition": 0, "_offset": offset}


def test_views_hide_forgotten_rows_that_came_back(tmp_path: Path) -> None:
    store = LineageStore(tmp_path)
    store.write("p", "predictions", "loopline.p.predictions", "id0", 0,
                [prediction("e1", "u1", 0), prediction("e2", "u2", 1), prediction("e3", "u3", 2)],
                rows.PREDICTIONS)
    store.write("p", "feedback", "loopline.p.feedback", "id0", 0, [
        {"feedback_id": "f1", "prediction_id": "e1-champion", "event_id": None, "label": "1",
         "value": None, "verdict": None, "ts": 1, "_topic": "loopline.p.feedback", "_partition": 0,
         "_offset": 0},
        {"feedback_id": "f2", "prediction_id": None, "event_id": "e2", "label": "1", "value": None,
         "verdict": None, "ts": 1, "_topic": "loopline.p.feedback", "_partition": 0, "_offset": 1}],
                rows.FEEDBACK)
    fl.add(fl.path_of(tmp_path, "p"), ["u1"], ["e1"], ["e1-champion"], at_ms=1)
    con = q.connect(store, "p")
    keys = con.execute("SELECT key FROM predictions ORDER BY key").fetchall()
    assert [r[0] for r in keys] == ["u2", "u3"]
    assert con.execute("SELECT feedback_id FROM feedback_stored").fetchall() == [("f2",)]
    every = q.connect(store, "p", hide_forgotten=False)
    assert every.execute("SELECT count(*) FROM predictions").fetchone() == (3,)
    # forget itself still finds and removes them
    removed = q.forget(store, RegistryState(), "p", "u1")
    assert removed["removed"] == {"features": 0, "predictions": 1, "feedback": 1}


def scanner(events: set[str] | None = None) -> Scanner:
    subject = Subject("u1", "user", set(events or ()))
    return Scanner(SPEC, avro.Codec(SPEC.features_schema()), subject)


def test_raw_events_match_by_key_field_key_feature_or_known_id() -> None:
    s = scanner({"e7"})
    ids = s.subject.ids()
    at = ("loopline.p.raw", 0, 0)
    def raw(kafka_key: bytes | None, doc: Any) -> bool:
        return s.matches("raw", kafka_key, orjson.dumps(doc), at, ids)

    assert raw(b"device-9", {"key": "u1", "features": {"user": "x"}})  # the event's key field
    assert raw(None, {"event_id": "e5", "features": {"user": "u1"}})  # the spec's key feature
    assert "e5" in s.subject.events  # learnt: its features, predictions and feedback follow
    assert raw(None, {"event_id": "e7", "features": {"user": "u2"}})  # an id known to be theirs
    assert s.matches("raw", b"u1", b"not json at all", at, ids)  # the Kafka key
    assert not raw(b"u2", {"event_id": ["e7"], "features": {"user": "u2"}})  # hostile: no match
    avro_raw = avro.Codec(SPEC.raw_schema())
    encoded = avro_raw.encode({"event_id": "e9", "key": None, "ts": None,
                               "features": {"user": "u1", "x": 1.0}})
    assert s.matches("raw", None, encoded, at, ids) and "e9" in s.subject.events


def test_dead_letters_match_by_where_their_original_came_from_or_its_content() -> None:
    s = scanner()
    s.subject.positions.add(("loopline.p.raw", 0, 5))
    dl = avro.codec("deadletter")

    def dead(original: bytes, offset: int) -> bytes:
        return dl.encode({"original": original, "original_key": b"device-9",
                          "source": {"topic": "loopline.p.raw", "partition": 0, "offset": offset},
                          "source_timestamp": None, "field": None, "rule": "type", "message": "bad",
                          "service": "ingest", "at": 1, "deadletter_id": None})

    ids = s.subject.ids()
    at = ("loopline.p.deadletter", 0, 0)
    assert s.matches("deadletter", b"device-9", dead(b"{}", 5), at, ids)
    assert s.matches("deadletter", b"device-9", dead(orjson.dumps({"features": {"user": "u1"}}), 6),
                     at, ids)
    other = dead(orjson.dumps({"features": {"user": "u2"}}), 7)
    assert not s.matches("deadletter", b"device-9", other, at, ids)


def test_kept_until_says_what_the_topic_config_means() -> None:
    h = Holding("predictions", "t", messages=3, newest_ms=0,
                config={"cleanup.policy": "delete", "retention.ms": str(86_400_000)})
    assert h.kept_until() == "kept until about 1970-01-02T00:00+00:00 (retention.ms 86400000)"
    h.config = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "1000"}
    assert h.kept_until() == ("kept indefinitely (retention -1); "
                              "or until a partition passes 1000 bytes")
    h.config = {}
    assert h.kept_until().startswith("retention not reported by the broker")
    h.config = {"cleanup.policy": "compact"}
    assert h.kept_until() == "compacted, no tombstones written: kept indefinitely"
    h.keys, h.tombstones = {b"u1": {0}}, 1
    assert h.kept_until() == ("tombstoned: removed once the log cleaner compacts them "
                              "(no max.compaction.lag.ms set)")
    h.config = {"cleanup.policy": "compact", "max.compaction.lag.ms": "3600000"}
    assert h.kept_until().startswith("tombstoned: removed by about ")
    assert h.kept_until().endswith(" (max.compaction.lag.ms 3600000)")
    h.keys, h.shared = {b"u1": {0}, b"device-9": {0}}, {b"device-9"}
    assert h.kept_until() == ("tombstoned, except 1 key(s) other subjects use too: those messages "
                              "stay indefinitely")
    h.config = {"cleanup.policy": "compact,delete", "retention.ms": "-1"}
    assert h.kept_until().endswith("; kept indefinitely (retention -1)")
    assert Holding("raw", "t").kept_until() == "-"


def test_no_temp_files_left_and_file_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / fl.FILE_NAME
    fl.add(path, ["u1"], [], [], at_ms=1)
    inode = os.stat(path).st_ino
    fl.add(path, ["u2"], [], [], at_ms=2)
    assert os.stat(path).st_ino != inode  # renamed into place, never written in place
