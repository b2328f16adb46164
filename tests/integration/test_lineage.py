"""Lineage service on the real broker: every row
stored once across kill -9, queries, trace, forget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from loopline import avro
from loopline.apply import apply_spec
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.registry import RegistryReader, model_version_key, now_ms, publish, stage_change_key
from loopline.services.lineage import query as q
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "partitions": 2, "key": "user",
                       "features": [{"name": "user", "type": "string"},
                                    {"name": "x", "type": "float"}]})


def send_traffic(kafka: KafkaConfig, spec: PipelineSpec, start: int, count: int, t0: int) -> None:
    """Features, two variants' predictions per event, and feedback for every 4th event."""
    features = avro.Codec(spec.features_schema())
    pred, fb = avro.codec("prediction"), avro.codec("feedback")
    producer = AckedProducer(kafka.producer("test-traffic"))
    for i in range(start, start + count):
        event_id, key = f"e{i}", f"u{i % 7}"
        ts = t0 + i * 1000
        producer.send(spec.topics.features, features.encode({
            "event_id": event_id, "key": key, "ts": ts, "ingested_at": ts,
            "source": {"topic": spec.topics.raw, "partition": 0, "offset": i},
            "features": {"user": key, "x": float(i)}}), key=key.encode())
        for variant, version in (("champion", 1), ("shadow", 2)):
            producer.send(spec.topics.predictions, pred.encode({
                "prediction_id": f"{event_id}-{variant}", "event_id": event_id, "key": key,
                "pipeline": spec.name, "model_name": "m", "model_version": version,
                "model_sha256": "0" * 64,
                "variant": variant, "served": variant == "champion", "label": "1" if i % 2 else "0",
                "value": (i % 10) / 10, "scores": {"0": 0.5, "1": 0.5},
                "source": {"topic": spec.topics.features, "partition": 0, "offset": i},
                "event_ts": ts, "scored_at": ts + 5}), key=key.encode())
        if i % 4 == 0:
            producer.send(spec.topics.feedback, fb.encode({
                "feedback_id": f"f{i}", "prediction_id": f"{event_id}-champion", "event_id": None,
                "label": "1", "value": None, "verdict": "accept", "ts": ts + 60_000}),
                          key=key.encode())
    producer.confirm()


def run_lineage(settings: LooplineSettings, home: Path, pipeline: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
               LOOPLINE_KAFKA_PROFILE=settings.kafka_profile, LOOPLINE_HOME=str(home),
               LOOPLINE_PIPELINES=pipeline, LOOPLINE_GROUP_ID=f"{pipeline}-lineage",
               LOOPLINE_SESSION_TIMEOUT_MS="6000",
               LOOPLINE_FLUSH_ROWS="40", LOOPLINE_FLUSH_INTERVAL_S="0.3", LOOPLINE_BATCH_SIZE="50")
    log = open(home / "lineage.log", "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "run", "lineage"],
                                env=env, stdout=log, stderr=log)
    finally:
        log.close()


def count_rows(store: LineageStore, pipeline: str) -> dict[str, tuple[int, int]]:
    """Per table: (rows in files, distinct offsets) — equal when nothing is duplicated."""
    import pyarrow.parquet as pq

    out = {}
    for table in ("features", "predictions", "feedback"):
        total, keys = 0, set()
        for path in store.files(pipeline, table):
            t = pq.read_table(path, columns=["_partition", "_offset"])
            total += t.num_rows
            keys.update(zip(t["_partition"].to_pylist(), t["_offset"].to_pylist(), strict=True))
        out[table] = (total, len(keys))
    return out


EXPECTED_ROWS = {"features": (500, 500), "predictions": (1000, 1000), "feedback": (125, 125)}


def wait_until(condition: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def test_kill_9_and_restart_loses_and_duplicates_nothing(settings: LooplineSettings,
                                                         kafka: KafkaConfig,
                                                         tmp_path: Path, unique: str) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    store = LineageStore(tmp_path / "lineage")
    t0 = now_ms() - 3_600_000
    proc = run_lineage(settings, tmp_path, unique)
    try:
        send_traffic(kafka, spec, 0, 300, t0)
        wait_until(lambda: count_rows(store, unique)["predictions"][0] >= 100)
        proc.send_signal(signal.SIGKILL)  # mid-stream: some batches written, some not
        proc.wait(10)
        send_traffic(kafka, spec, 300, 200, t0)
        proc = run_lineage(settings, tmp_path, unique)
        # Each table is its own topic, consumed at its own pace: wait for all three.
        wait_until(lambda: all(count_rows(store, unique)[table][1] >= distinct
                               for table, (_, distinct) in EXPECTED_ROWS.items()), timeout_s=120.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    counts = count_rows(store, unique)
    assert counts == EXPECTED_ROWS

    result = q.query_predictions(store, unique, "m", 1)
    assert result.summary["predictions"] == 500 and result.summary["served"] == 500
    assert result.summary["keys"] == 7
    labels = {(d["label"], d["n"]) for d in result.distribution}
    assert labels == {("0", 250), ("1", 250)}
    window = q.query_predictions(store, unique,
                                 since=datetime.fromtimestamp((t0 + 100_000) / 1000, UTC),
                                 until=datetime.fromtimestamp((t0 + 200_000) / 1000, UTC))
    assert window.summary["events"] == 100 and window.summary["predictions"] == 200


def test_trace_served_at_and_forget(settings: LooplineSettings, kafka: KafkaConfig, tmp_path: Path,
                                    unique: str) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    producer = AckedProducer(kafka.producer("test-registry"))
    registered = now_ms()
    model = {"name": "m", "version": 1, "sha256": "0" * 64, "uri": "file:///m.onnx",
             "stage": "champion",
             "traffic": 1.0, "parent": None, "created_at": registered, "library_versions": {},
             "metrics": {}, "reference_profile_json": None, "trigger": None, "scorecard_json": None,
             "training_ranges": [{"topic": spec.topics.features, "partition": 0, "first_offset": 0,
                                  "last_offset": 10_000, "count": 10_001}]}
    publish(producer, model_version_key(unique, "m", 1),
            {"kind": "model_version", "pipeline": unique, "at": registered, "spec": None,
             "model": model, "stage_change": None})
    time.sleep(0.01)
    publish(producer, stage_change_key(unique, "m", 1),
            {"kind": "stage_change", "pipeline": unique, "at": now_ms(), "spec": None,
             "model": None,
             "stage_change": {"name": "m", "version": 1, "from_stage": "champion",
                              "to_stage": "retired",
                              "traffic": 0.0, "reason": "test", "actor": "test"}})
    t0 = now_ms()
    proc = run_lineage(settings, tmp_path, unique)
    store = LineageStore(tmp_path / "lineage")
    try:
        send_traffic(kafka, spec, 0, 40, t0)
        wait_until(lambda: count_rows(store, unique)["predictions"][0] >= 80
                   and count_rows(store, unique)["feedback"][0] >= 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    reader = RegistryReader(kafka)
    state = reader.catch_up()
    reader.close()

    chain = q.trace(store, state, "e8")
    assert chain["features"][0]["raw_offset"] == 8
    assert [(p["variant"], p["served"]) for p in chain["predictions"]] == [("champion", True),
                                                                           ("shadow", False)]
    assert [f["feedback_id"] for f in chain["feedback"]] == ["f8"]
    assert chain["trained_on"] == (["m/1"] if chain["features"][0]["_partition"] == 0 else [])

    at_registration = datetime.fromtimestamp(registered / 1000 + 0.001, UTC)
    assert q.served_at(state, unique,
                       at_registration) == [{"model": "m/1", "stage": "champion", "traffic": 1.0}]
    assert q.served_at(state, unique, datetime.now(UTC))[0]["stage"] == "retired"

    result = q.forget(store, state, unique, "u1")
    assert result["events"] == 6  # e1, e8, e15, e22, e29, e36
    assert result["removed"]["predictions"] == 12 and result["removed"]["features"] == 6
    assert result["removed"]["feedback"] == 2  # feedback for e8 and e36
    assert q.query_predictions(store, unique).summary["keys"] == 6
