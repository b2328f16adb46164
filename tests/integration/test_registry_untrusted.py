"""The registry topic and the artifacts it names are untrusted input: services keep serving.

Records are written with a plain confluent_kafka Producer, as any Kafka client could; the
services run as `python -m loopline.app.cli run <service>` processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from services_harness import ServiceProcess, make_spec, raw_event, service_env, wait_until
from test_inference import feature_events, make_model

from loopline import avro, topics
from loopline.app.cli import main as cli
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry
from loopline.registry import RegistryReader, model_version_key, now_ms, publish
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec

pytestmark = pytest.mark.integration

_MODEL_DEFAULTS = {"parent": None, "library_versions": {}, "metrics": {},
                   "reference_profile_json": None, "training_ranges": [], "trigger": None,
                   "scorecard_json": None, "fill_values": {}, "input_features": []}


def deploy(kafka: KafkaConfig, spec: PipelineSpec, store: Path) -> dict[str, Any]:
    """Apply the spec and register a champion into ``store``; return its registry record."""
    apply_spec(kafka, spec)
    registry = ModelRegistry(kafka, ArtifactStore(str(store)), actor="test")
    registry.register(spec.name, make_model(1))
    record = dict(registry.state().versions[(spec.name, spec.name, 1)])
    for k in ("pipeline", "at"):
        record.pop(k)
    return record


def foreign_producer(settings: LooplineSettings) -> Producer:
    """A plain confluent-kafka producer: no Loopline code between it and the topic."""
    return Producer({"bootstrap.servers": settings.bootstrap_servers, "client.id": "foreign"})


def produce_raw(producer: Producer, topic: str, messages: list[tuple[bytes, bytes | None]]) -> None:
    for key, value in messages:
        producer.produce(topic, value, key=key)
    assert producer.flush(30) == 0, "not acknowledged"


class TopicReader:
    """Reads topics from the start (assign, no group), decoding with one codec."""

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int, kind: str) -> None:
        self.consumer: Consumer = kafka.reader(f"test-read-{topic}")
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.codec = avro.codec(kind)
        self.records: list[dict[str, Any]] = []

    def until(self, done: Callable[[list[dict[str, Any]]], bool], what: str,
              timeout_s: float = 90.0) -> list[dict[str, Any]]:
        def poll() -> bool:
            for m in self.consumer.consume(1000, 0.2):
                if m.error() is None:
                    self.records.append(self.codec.decode(m.value()))
            return done(self.records)
        wait_until(poll, timeout_s, what)
        return self.records


@pytest.fixture
def readers() -> Iterator[list[TopicReader]]:
    opened: list[TopicReader] = []
    yield opened
    for r in opened:
        r.consumer.close()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        p.stop()


def rejections(process: ServiceProcess, needle: str) -> dict[str, str]:
    """key -> rule of the registry_record_rejected
    lines a service logged for keys with ``needle``."""
    return {doc["key"]: doc["rule"] for doc in process.log_lines("warning", "error")
            if doc.get("event") == "registry_record_rejected" and needle in str(doc.get("key"))}


def test_garbage_registry_records_are_skipped_by_services_and_cli(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path,
        readers: list[TopicReader], processes: list[ServiceProcess]) -> None:
    spec = make_spec(unique, partitions=1)
    deploy(kafka, spec, tmp_path / "artifacts")
    codec = avro.codec("registry")
    ghost = f"{unique}x"  # a pipeline whose only spec record is garbage
    bad_spec = codec.encode({
        "kind": "pipeline_spec", "pipeline": ghost, "at": now_ms(), "model": None,
        "spec": {"spec_json": "{this is not json", "spec_sha256": "0" * 64,
                 "features_schema_json": "{}"}, "stage_change": None})
    bad_model = codec.encode({
        "kind": "model_version", "pipeline": unique, "at": now_ms(), "spec": None,
        "stage_change": None, "model": dict(
            _MODEL_DEFAULTS, name=unique, version=0, sha256="not-a-sha", uri="/dev/zero",
            stage="boss", traffic=7.0, created_at=now_ms())})
    noise = np.random.default_rng(13).bytes(200)
    expected = {f"pipeline/{ghost}/spec/{'0' * 64}": "json",
                f"pipeline/{unique}/model/{unique}/0": "min",
                f"garbage/{unique}": "schema",
                f"pipeline/{unique}/model/{unique}/99": "tombstone"}
    values = [bad_spec, bad_model, noise, None]
    produce_raw(foreign_producer(settings), topics.MODELS,
                [(k.encode(), v) for k, v in zip(expected, values)])

    reader = RegistryReader(kafka, client_id=f"test-{unique}")
    try:
        state = reader.catch_up()
        mine = {r.key.decode(): r for r in reader.take_rejected()
                if r.key and unique in r.key.decode()}
    finally:
        reader.close()
    assert {k: r.rule for k, r in mine.items()} == expected
    assert mine[f"garbage/{unique}"].value == noise and mine[f"garbage/{unique}"].pipeline is None
    assert mine[f"pipeline/{ghost}/spec/{'0' * 64}"].field == "spec.spec_json"
    assert mine[f"pipeline/{unique}/model/{unique}/0"].pipeline == unique
    assert ghost not in state.specs and [v for (p, _, v) in state.versions if p == unique] == [1]

    env = service_env(settings, tmp_path, f"{unique},{ghost}")
    for name in ("ingest", "inference"):
        processes.append(ServiceProcess(name, dict(env, LOOPLINE_GROUP_ID=f"{unique}-{name}"),
                                        tmp_path / f"{name}.log"))
        processes[-1].start()
    for p in processes:
        p.wait_ready(90)
    rng = np.random.default_rng(3)
    events = [raw_event(i, unique, rng) for i in range(60)]
    produce_raw(foreign_producer(settings), spec.topics.raw, [(k, v) for k, v, _ in events])
    valid = sum(ok for _, _, ok in events)
    readers.append(TopicReader(kafka, spec.topics.predictions, spec.partitions, "prediction"))
    preds = readers[-1].until(lambda r: len(r) >= valid, "predictions of the valid events")
    assert len({p["event_id"] for p in preds}) == valid and all(p["served"] for p in preds)
    for p in processes:
        assert p.alive() and p.ready(), p.log_tail()
        assert rejections(p, unique) == expected, p.log_tail()

    env = {"LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "", "COLUMNS": "250",
           "LOOPLINE_KAFKA_PROFILE": settings.kafka_profile, "LOOPLINE_HOME": str(tmp_path)}
    runner = CliRunner(env=env)
    for args in (["status", unique], ["status"], ["models", "list"], ["models", "list", unique]):
        r = runner.invoke(cli, args)
        assert r.exit_code == 0, (args, r.output)
        assert "invalid record(s) on loopline.models skipped (not applied)" in r.output, r.output
        assert "Traceback" not in r.output
    assert f"{unique}/1" in runner.invoke(cli, ["status", unique]).output


def test_fifo_and_oversized_artifacts_are_refused_while_serving_continues(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path,
        readers: list[TopicReader], processes: list[ServiceProcess]) -> None:
    store = tmp_path / "artifacts"
    a, b = make_spec(f"{unique}a", partitions=1), make_spec(f"{unique}b", partitions=1)
    v1 = deploy(kafka, a, store)
    deploy(kafka, b, store)
    alerts = TopicReader(kafka, topics.ALERTS, 1, "alert")
    readers.append(alerts)
    inference = ServiceProcess("inference", dict(
        service_env(settings, tmp_path, f"{a.name},{b.name}", LOOPLINE_ARTIFACT_MAX_BYTES="100000"),
        LOOPLINE_GROUP_ID=f"{unique}-inference"), tmp_path / "inference.log")
    processes.append(inference)
    inference.start()
    inference.wait_ready(90)

    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)  # no writer: opening it for reading would block forever
    big = np.random.default_rng(1).bytes(200_000)  # over the 100 kB limit
    big_sha = ArtifactStore(str(store)).put(big)[0]
    (tmp_path / "big.onnx").write_bytes(big)
    fifo_sha = "ee" * 32
    os.mkfifo(store / f"{fifo_sha}.onnx")  # a store file replaced by a FIFO
    # One version per role, so that inference wants every one of them (an older champion is not).
    crafted = {2: dict(sha256="cd" * 32, uri=fifo.as_uri(), stage="shadow", traffic=0.0),
               3: dict(sha256=big_sha, uri=(tmp_path / "big.onnx").as_uri(), stage="challenger",
                       traffic=0.2),
               4: dict(sha256=fifo_sha, uri=(store / f"{fifo_sha}.onnx").as_uri(),
                       stage="champion", traffic=1.0),
               5: dict(sha256=v1["sha256"], uri=fifo.as_uri(), stage="shadow", traffic=0.0)}
    producer = AckedProducer(kafka.producer("test-crafted"))
    for version, fields in crafted.items():
        record = {**v1, "version": version, "created_at": now_ms(), **fields}
        publish(producer, model_version_key(a.name, a.name, version),
                {"kind": "model_version", "pipeline": a.name, "at": now_ms(), "spec": None,
                 "model": record, "stage_change": None})

    def refused(records: list[dict[str, Any]]) -> dict[int, str]:
        return {r["model_version"]: r["message"] for r in records
                if r["pipeline"] == a.name and r["signal"] == "model_load"}

    messages = refused(alerts.until(lambda r: len(refused(r)) >= 3, "three refusals alerted"))
    assert sorted(messages) == [2, 3, 4], messages
    assert "rule: in_store" in messages[2] and "is informational and is not read" in messages[2]
    assert "rule: size_limit" in messages[3] and "rule: regular_file" in messages[4]
    wait_until(lambda: inference.metric("loopline_inference_model_info", pipeline=a.name,
                                        variant="shadow", model_version="5") == 1,
               60, "v5 (the record's uri is a FIFO, its sha256 is in the store) loaded as a shadow")

    n = 300
    for spec in (a, b):
        produce_raw(foreign_producer(settings), spec.topics.features, feature_events(spec, n))
    for spec, expected in ((a, {(1, "champion", True), (5, "shadow", False)}),
                           (b, {(1, "champion", True)})):
        reader = TopicReader(kafka, spec.topics.predictions, spec.partitions, "prediction")
        readers.append(reader)
        want = len(expected) * n
        preds = reader.until(lambda r, want=want: len(r) >= want, f"{spec.name} predictions")
        assert {(p["model_version"], p["variant"], p["served"]) for p in preds} == expected
        served = [p["event_id"] for p in preds if p["served"]]
        assert len(served) == len(set(served)) == n, f"{spec.name}: an event served twice or never"
    assert inference.alive() and inference.ready(), inference.log_tail()
    assert inference.metric("loopline_inference_model_loads_total", pipeline=a.name,
                            outcome="refused") == 3
    alerted = [r["model_version"] for r in alerts.until(lambda r: True, "alerts")
               if r["pipeline"] == a.name and r["signal"] == "model_load"]
    assert sorted(alerted) == [2, 3, 4], "a refusal was alerted more than once"


def test_the_monitor_dead_letters_and_alerts_an_invalid_registry_record_once(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path,
        readers: list[TopicReader], processes: list[ServiceProcess]) -> None:
    spec = make_spec(unique, partitions=1)
    apply_spec(kafka, spec)
    garbage = f"not a registry record {unique}".encode()
    produce_raw(foreign_producer(settings), topics.MODELS,
                [(f"garbage/{unique}".encode(), garbage),
                 (f"pipeline/{unique}/model/{unique}/7".encode(),
                  b"\xc3\x01broken " + unique.encode())])
    env = service_env(settings, tmp_path, unique)

    def monitor(label: str) -> ServiceProcess:
        p = ServiceProcess("monitor", dict(env, LOOPLINE_GROUP_ID=f"{unique}-monitor",
                                           LOOPLINE_INSTANCE_ID=label), tmp_path / f"{label}.log",
                           label)
        processes.append(p)
        p.start()
        return p

    first = monitor("monitor-a")
    first.wait_ready(90)
    letters = TopicReader(kafka, topics.DEADLETTER, 1, "deadletter")
    alerts = TopicReader(kafka, topics.ALERTS, 1, "alert")
    readers.extend([letters, alerts])

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if unique.encode() in (r.get("original") or b"")
                or unique in str(r.get("message", ""))]

    letters.until(lambda r: len(mine(r)) >= 1,
                  "the random bytes dead-lettered on loopline.deadletter")
    pipeline_letters = TopicReader(kafka, spec.topics.deadletter, 1, "deadletter")
    readers.append(pipeline_letters)
    pipeline_letters.until(lambda r: len(r) >= 1,
                           "the broken model record dead-lettered on its pipeline")
    alerts.until(lambda r: len([a for a in r if a["signal"] == "registry_record"
                                and (a["pipeline"] == unique or unique in a["message"])]) >= 2,
                 "one alert per invalid record")
    first.stop()  # a restart (and a second replica) replays the registry: nothing is reported twice
    second = monitor("monitor-b")
    second.wait_ready(90)
    third = monitor("monitor-c")
    third.wait_ready(90)
    time.sleep(8)  # the registry unit's new owner has restored its judged records and re-read all
    letters.until(lambda r: True, "read to now", 5)
    pipeline_letters.until(lambda r: True, "read to now", 5)
    alerts.until(lambda r: True, "read to now", 5)
    assert len(mine(letters.records)) == 1 and len(pipeline_letters.records) == 1
    reported = [a for a in alerts.records if a["signal"] == "registry_record"
                and (a["pipeline"] == unique or unique in a["message"])]
    assert len(reported) == 2 and len({a["alert_id"] for a in reported}) == 2
    assert pipeline_letters.records[0]["original"].startswith(b"\xc3\x01broken")
    assert all(not p.errors() for p in (second, third)), [p.errors()[:2] for p in (second, third)]
