"""`lineage forget` on the real broker: what Kafka holds of a subject, tombstones, no re-import."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Message
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from loopline import avro
from loopline.apply import apply_spec
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.registry import now_ms
from loopline.services.lineage import query as q
from loopline.services.lineage.forget import _read
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration

EVENTS = 28  # keys u0..u6; the subject u1 has events e1, e8, e15, e22
SUBJECT = "u1"
THIRTY_DAYS_MS = 30 * 86_400_000


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "partitions": 2, "key": "user",
                       "features": [{"name": "user", "type": "string"},
                                    {"name": "x", "type": "float"}],
                       "retention": {"predictions": "30d", "feedback": "forever"}})


def compact(kafka: KafkaConfig, *topics: str) -> None:
    admin = kafka.admin()
    resources = [ConfigResource("topic", t, incremental_configs=[
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.SET)])
        for t in topics]
    for future in admin.incremental_alter_configs(resources).values():
        future.result()


def send_traffic(kafka: KafkaConfig, spec: PipelineSpec) -> None:
    """What producers, ingest and inference would write, with the keys they use.

    Raw events are keyed by their key, except two keyed by a device id that two subjects share;
    feedback is keyed by prediction id, or not at all (plain clients); one subject's raw event
    was dead-lettered (as ingest does) and one subject's feedback is invalid (lineage dead-letters
    it). Raw events go to partition i % 2, so their offsets are known to the features' source.
    """
    t = spec.topics
    features, pred = avro.Codec(spec.features_schema()), avro.codec("prediction")
    producer = AckedProducer(kafka.producer("test-forget-traffic"))
    offsets = [0, 0]
    ts0 = now_ms() - 3_600_000

    def raw(doc: dict[str, Any], key: str, partition: int) -> tuple[int, int]:
        producer.send(t.raw, orjson.dumps(doc), key=key.encode(), partition=partition)
        offsets[partition] += 1
        return partition, offsets[partition] - 1

    for i in range(EVENTS):
        event_id, key, ts = f"e{i}", f"u{i % 7}", ts0 + i * 1000
        partition, offset = raw({"event_id": event_id, "features": {"user": key, "x": float(i)}},
                                key, i % 2)
        producer.send(t.features, features.encode({
            "event_id": event_id, "key": key, "ts": ts, "ingested_at": ts,
            "source": {"topic": t.raw, "partition": partition, "offset": offset},
            "features": {"user": key, "x": float(i)}}), key=key.encode())
        for variant in ("champion", "shadow"):
            producer.send(t.predictions, pred.encode({
                "prediction_id": f"{event_id}-{variant}", "event_id": event_id, "key": key,
                "pipeline": spec.name, "model_name": "m", "model_version": 1,
                "model_sha256": "0" * 64, "variant": variant, "served": variant == "champion",
                "label": "1", "value": 0.5, "scores": {"0": 0.5, "1": 0.5},
                "source": {"topic": t.features, "partition": 0, "offset": i},
                "event_ts": ts, "scored_at": ts + 5}), key=key.encode())
        if i % 4 == 0:
            pid = f"{event_id}-champion"
            producer.send(t.feedback, orjson.dumps({"prediction_id": pid, "label": "1"}),
                          key=None if i % 8 == 0 else pid.encode())
    # The subject's bad raw event, keyed by a device id u2 uses too, and its dead letter.
    bad = orjson.dumps({"event_id": "bad1", "key": SUBJECT,
                        "features": {"user": SUBJECT, "x": "oops"}})
    producer.send(t.raw, bad, key=b"device-9", partition=0)
    offsets[0] += 1
    raw({"event_id": "e100", "features": {"user": "u2", "x": 1.0}}, "device-9", 1)
    producer.send(t.deadletter, avro.codec("deadletter").encode({
        "original": bad, "original_key": b"device-9",
        "source": {"topic": t.raw, "partition": 0, "offset": offsets[0] - 1},
        "source_timestamp": None, "field": "features.x", "rule": "type",
        "message": "x must be a number", "service": "ingest",
        "at": now_ms(), "deadletter_id": "d1"}), key=b"device-9")
    # Invalid feedback (a verdict that does not exist) on the subject's prediction.
    producer.send(t.feedback, orjson.dumps({"prediction_id": "e15-champion", "verdict": "nuke"}),
                  key=b"e15-champion")
    producer.confirm()


def env(settings: LooplineSettings, home: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
                LOOPLINE_KAFKA_PROFILE=settings.kafka_profile, LOOPLINE_HOME=str(home),
                LOOPLINE_SESSION_TIMEOUT_MS="6000", **extra)


def run_lineage(settings: LooplineSettings, home: Path, pipeline: str,
                group: str) -> subprocess.Popen[bytes]:
    log = open(home / f"lineage-{group}.log", "ab")  # noqa: SIM115 - the child owns it
    child_env = env(settings, home, LOOPLINE_PIPELINES=pipeline, LOOPLINE_GROUP_ID=group,
                    LOOPLINE_FLUSH_ROWS="40", LOOPLINE_FLUSH_INTERVAL_S="0.3",
                    LOOPLINE_BATCH_SIZE="50")
    try:
        return subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "run", "lineage"],
                                env=child_env, stdout=log, stderr=log)
    finally:
        log.close()


def stored(store: LineageStore, pipeline: str) -> dict[str, list[dict[str, Any]]]:
    """Every row in the store's files (not the views: they hide forgotten subjects anyway)."""
    return {table: [r for path in store.files(pipeline, table)
                    for r in pq.read_table(path).to_pylist()]
            for table in ("features", "predictions", "feedback")}


def wait_until(condition: Any, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def messages(kafka: KafkaConfig, topic: str) -> list[Message]:
    out: list[Message] = []
    _read(kafka, topic, out.extend)
    return out


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_forget_reports_kafka_copies_tombstones_them_and_a_rebuild_skips_them(
        settings: LooplineSettings, kafka: KafkaConfig, tmp_path: Path, unique: str) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    t = spec.topics
    compact(kafka, t.raw, t.features)
    send_traffic(kafka, spec)
    store = LineageStore(tmp_path / "lineage")
    proc = run_lineage(settings, tmp_path, unique, f"{unique}-first")
    try:
        # ...and lineage dead-lettered the invalid feedback
        everyone = [EVENTS, 2 * EVENTS, 7]
        wait_until(lambda: [len(v) for v in stored(store, unique).values()] == everyone
                   and len(messages(kafka, t.deadletter)) == 2)
    finally:
        stop(proc)

    result = subprocess.run([sys.executable, "-m", "loopline.app.cli", "lineage", "forget", unique,
                             "--key", SUBJECT, "--format", "json"], env=env(settings, tmp_path),
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    held = {h["kind"]: h for h in report["topics"]}
    # raw: 4 events + the bad one; feedback: e8's (no Kafka key) and the invalid one on e15;
    # deadletter: ingest's for the bad raw event (keyed by the shared device) and lineage's.
    assert [(h["kind"], h["messages"]) for h in report["topics"]] == [
        ("raw", 5), ("features", 4), ("predictions", 8), ("feedback", 2), ("deadletter", 2)]
    assert report["store"]["removed"] == {"features": 4, "predictions": 8, "feedback": 1}
    assert report["store"]["event_ids"] == ["bad1", "e1", "e15", "e22", "e8"]
    # Compacted: one tombstone per subject key and partition; the shared device key gets none.
    assert held["raw"]["tombstones"] == 2 and held["raw"]["shared_keys"] == 1
    assert held["features"]["tombstones"] == 1 and held["features"]["shared_keys"] == 0
    assert held["raw"]["kept_until"].startswith("tombstoned, except 1 key(s)")
    assert held["features"]["kept_until"].startswith("tombstoned: removed ")
    assert held["predictions"]["tombstones"] == 0
    newest = held["predictions"]["newest"][:16]
    assert held["predictions"]["retention_ms"] == str(THIRTY_DAYS_MS)
    assert held["predictions"]["kept_until"].startswith("kept until about ")
    assert held["predictions"]["kept_until"] != f"kept until about {newest}"  # 30 days later
    assert held["feedback"]["kept_until"] == "kept indefinitely (retention -1)"

    tombstones = [(m.topic(), m.key(), m.partition()) for topic in (t.raw, t.features)
                  for m in messages(kafka, topic) if m.value() is None]
    feature_partitions = {m.partition() for m in messages(kafka, t.features)
                          if m.key() == SUBJECT.encode() and m.value() is not None}
    assert sorted(tombstones) == sorted([(t.raw, b"u1", 0), (t.raw, b"u1", 1)]
                                        + [(t.features, b"u1", p) for p in feature_partitions])

    listing = (tmp_path / "lineage" / unique / "forgotten.json").read_text()
    doc = json.loads(listing)
    assert (len(doc["keys"]), len(doc["events"]), len(doc["predictions"])) == (1, 5, 8)
    for clear in (SUBJECT, "e8", "e8-champion", "device-9"):
        assert f'"{clear}"' not in listing

    # The store loses its files and lineage rebuilds from offset 0 in a new consumer group.
    for table in ("features", "predictions", "feedback"):
        for path in store.files(unique, table):
            path.unlink()
    proc = run_lineage(settings, tmp_path, unique, f"{unique}-rebuild")
    try:
        others = [EVENTS - 4, 2 * EVENTS - 8, 6]  # everyone's rows but the subject's
        wait_until(lambda: all(len(v) >= n for v, n in zip(stored(store, unique).values(), others,
                                                              strict=True)))
    finally:
        stop(proc)
    rows = stored(store, unique)
    assert [len(v) for v in rows.values()] == others
    assert not [r for r in rows["features"] + rows["predictions"] if r["key"] == SUBJECT]
    assert "e8-champion" not in {r["prediction_id"] for r in rows["feedback"]}
    assert len(messages(kafka, t.deadletter)) == 2  # nothing of the subject dead-lettered again
    assert q.query_predictions(store, unique).summary["keys"] == 6
