"""Failures stay with the version or message that caused them; serving goes on (issue 13).

Real ONNX models (skl2onnx float32 and float64 exports, hand-built graphs that turn NaN on some
inputs) behind the real inference service on the real broker.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from loopline import avro, topics
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.broker import EmbeddedBroker
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion, champion, versions_of
from loopline.registry import model_version_key, now_ms, publish
from loopline.runtime.service import ServiceRuntime
from loopline.services.inference.main import serve
from loopline.services.inference.settings import InferenceSettings
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "key": "customer", "partitions": 2,
                       "features": [{"name": "customer", "type": "string"},
                                    {"name": "x1", "type": "float", "min": 0, "max": 1},
                                    {"name": "x2", "type": "float", "min": 0, "max": 1},
                                    {"name": "flag", "type": "bool"},
                                    {"name": "x3", "type": "float", "required": False}],
                       "label": {"task": "classification", "classes": ["0", "1"], "positive": "1"}})


def sklearn_model(seed: int, dtype: Any) -> bytes:
    """A logistic regression as users export it: skl2onnx,
    float32 (FloatTensorType) or float64 input."""
    rng = np.random.default_rng(seed)
    x = rng.random((300, 4)).astype(dtype)
    y = (x[:, 0] + 0.2 * x[:, 1] > 0.6).astype(int)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def nan_model(threshold: float, dtype: int = TensorProto.FLOAT) -> bytes:
    """A classifier whose probabilities are NaN for
    events with x1 > ``threshold`` (fine otherwise)."""
    np_type = np.float32 if dtype == TensorProto.FLOAT else np.float64
    inits = [numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, -0.5], [0.0, 0.0], [0.0, 0.0]],
                                              np_type), "W"),
             numpy_helper.from_array(np.array([threshold], np_type), "T"),
             numpy_helper.from_array(np.array([np.nan], np_type), "NAN"),
             numpy_helper.from_array(np.array([0.0], np_type), "ZERO"),
             numpy_helper.from_array(np.array([0], np.int64), "S0"),
             numpy_helper.from_array(np.array([1], np.int64), "S1"),
             numpy_helper.from_array(np.array([1], np.int64), "AX")]
    nodes = [helper.make_node("MatMul", ["X", "W"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["p"], axis=1),
             helper.make_node("Slice", ["X", "S0", "S1", "AX"], ["x1"]),
             helper.make_node("Greater", ["x1", "T"], ["bad"]),
             helper.make_node("Where", ["bad", "NAN", "ZERO"], ["poison"]),
             helper.make_node("Add", ["p", "poison"], ["probabilities"]),
             helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(nodes, "nan_model",
                              [helper.make_tensor_value_info("X", dtype, [None, 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probabilities", dtype, [None, 2])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def feature_events(spec: PipelineSpec, n: int, start: int = 0, poison: set[int] | None = None
                   ) -> list[tuple[bytes, bytes]]:
    """Feature events e<start>..; those in ``poison``
    carry x1 = 5 (a value the NaN models fail on)."""
    codec = avro.Codec(spec.features_schema())
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        key = f"c{i % 97}"
        x1 = 5.0 if poison and i in poison else float(rng.random())
        rec = {"event_id": f"e{i}", "key": key, "ts": now_ms(), "ingested_at": now_ms(),
               "source": {"topic": spec.topics.raw, "partition": 0, "offset": i},
               "features": {"customer": key, "x1": x1, "x2": float(rng.random()),
                            "flag": bool(i % 2), "x3": float(rng.random())}}
        out.append((key.encode(), codec.encode(rec)))
    return out


def produce(kafka: KafkaConfig, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AckedProducer(kafka.producer("test-features"))
    for key, value in messages:
        producer.send(topic, value, key=key)
    producer.confirm()


class Reader:
    """Reads a topic from the start and decodes every message."""

    def __init__(self, kafka: KafkaConfig, topic: str, kind: str, partitions: int) -> None:
        self.consumer = kafka.reader(f"test-{kind}-{time.monotonic_ns()}")
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.codec = avro.codec(kind)
        self.records: list[dict[str, Any]] = []

    def until(self, done,
              timeout_s: float = 60.0) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]  # any predicate
        deadline = time.monotonic() + timeout_s
        while not done(self.records):
            assert time.monotonic() < deadline, (
                f"condition not met; have {len(self.records)} records")
            for m in self.consumer.consume(1000, 0.2):
                if m.error() is None:
                    self.records.append(self.codec.decode(m.value()))
        return self.records

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def readers() -> Iterator[list[Reader]]:
    opened: list[Reader] = []
    yield opened
    for r in opened:
        r.close()


class Inference:
    """The inference service on a thread."""

    def __init__(self, settings: LooplineSettings, pipelines: list[str], group: str,
                 artifacts: Path) -> None:
        self.settings = InferenceSettings(
            bootstrap_servers=settings.bootstrap_servers, kafka_profile=settings.kafka_profile,
            session_timeout_ms=6000, home=settings.home, pipelines=pipelines, group_id=group,
            instance_id=group, batch_size=500, registry_poll_s=0.05, artifact_uri=str(artifacts))
        self.rt = ServiceRuntime("inference", self.settings, install_signals=False)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.rt:
                serve(self.rt, self.settings)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            self.errors.append(e)

    def metric(self, name: str, **labels: str) -> float:
        return self.rt.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.rt.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive() and not self.errors, self.errors


@pytest.fixture
def inference(settings: LooplineSettings) -> Iterator[list[Inference]]:
    started: list[Inference] = []
    yield started
    for s in started:
        s.close()


def deploy(kafka: KafkaConfig, name: str, home: Path) -> tuple[PipelineSpec, ModelRegistry]:
    spec = make_spec(name)
    apply_spec(kafka, spec)
    return spec, ModelRegistry(kafka, ArtifactStore(str(home / "artifacts")), actor="test")


def publish_unchecked(kafka: KafkaConfig, registry: ModelRegistry, spec: PipelineSpec, model: bytes,
                      stage: str, traffic: float = 0.0) -> int:
    """A version record written without registration's test run (as any Kafka client could)."""
    state = registry.state()
    version = max((v["version"] for v in versions_of(state, spec.name)), default=0) + 1
    sha, uri = registry.store.put(model)
    record = {"name": spec.name, "version": version, "sha256": sha, "uri": uri, "stage": stage,
              "traffic": traffic, "parent": None, "created_at": now_ms(), "library_versions": {},
              "metrics": {}, "reference_profile_json": None, "training_ranges": [], "trigger": None,
              "scorecard_json": None, "fill_values": {}, "input_features": []}
    publish(AckedProducer(kafka.producer("test-registry")),
            model_version_key(spec.name, spec.name, version),
            {"kind": "model_version", "pipeline": spec.name, "at": now_ms(), "spec": None,
             "model": record, "stage_change": None})
    return version


def served_once(preds: list[dict[str, Any]], n: int) -> Counter[str]:
    """Served predictions per event, asserting every event e0..e<n-1> was served exactly once."""
    served = Counter(p["event_id"] for p in preds if p["served"])
    assert set(served) == {f"e{i}" for i in range(n)}, f"{n - len(served)} event(s) never served"
    assert all(c == 1 for c in served.values()), [e for e, c in served.items() if c > 1][:5]
    return served


def test_float32_champion_and_float64_shadow_both_score(kafka: KafkaConfig,
                                                        settings: LooplineSettings,
                                                        unique: str, tmp_path: Path,
                                                        inference: list[Inference],
                                                        readers: list[Reader]) -> None:
    spec, registry = deploy(kafka, unique, tmp_path)
    # the usual skl2onnx export: tensor(float)
    registry.register(unique, sklearn_model(1, np.float32))
    # tensor(double)
    registry.register(unique, sklearn_model(2, np.float64), NewVersion(stage="shadow"))
    inference.append(Inference(settings, [unique], f"{unique}-inference", tmp_path / "artifacts"))
    n = 600
    produce(kafka, spec.topics.features, feature_events(spec, n))
    preds = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    readers.append(preds)
    got = preds.until(lambda r: len(r) >= 2 * n)
    served_once(got, n)
    assert Counter(p["model_version"] for p in got) == {1: n, 2: n}
    assert all(not p["served"] for p in got if p["model_version"] == 2)
    assert inference[0].metric("loopline_inference_isolated_versions_total", pipeline=unique,
                               variant="shadow") == 0


def test_a_challenger_that_fails_every_event_is_taken_out(kafka: KafkaConfig,
                                                          settings: LooplineSettings,
                                                         unique: str, tmp_path: Path,
                                                         inference: list[Inference],
                                                         readers: list[Reader]) -> None:
    spec, registry = deploy(kafka, unique, tmp_path)
    registry.register(unique, sklearn_model(1, np.float32))
    bad = publish_unchecked(kafka, registry, spec, nan_model(2.0), "challenger", 0.5)
    alerts = Reader(kafka, topics.ALERTS, "alert", 1)
    readers.append(alerts)
    inference.append(Inference(settings, [unique], f"{unique}-inference", tmp_path / "artifacts"))
    n = 400
    produce(kafka, spec.topics.features, feature_events(spec, n, poison=set(range(n))))
    preds = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    readers.append(preds)
    got = preds.until(lambda r: sum(p["served"] for p in r) >= n)
    served_once(got, n)
    # the challenger's keys went back to the champion
    assert {p["model_version"] for p in got} == {1}
    alert = alerts.until(lambda r: any(a["pipeline"] == unique and a["signal"] == "model_failure"
                                       for a in r))
    alert = next(a for a in alert if a["pipeline"] == unique and a["signal"] == "model_failure")
    assert alert["model_version"] == bad
    assert "NaN" in alert["message"] and "offset" in alert["message"]
    deadline = time.monotonic() + 30
    while registry.state().versions[(unique, unique, bad)]["stage"] != "rejected":
        assert time.monotonic() < deadline, "the registry does not show the version taken out"
        time.sleep(0.2)
    assert inference[0].metric("loopline_inference_isolated_versions_total", pipeline=unique,
                               variant="challenger") == 1


def test_a_failing_champion_rolls_back_and_poison_events_are_dead_lettered(
        kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path,
        inference: list[Inference], readers: list[Reader]) -> None:
    spec, registry = deploy(kafka, unique, tmp_path)
    registry.register(unique, sklearn_model(1, np.float32))
    inference.append(Inference(settings, [unique], f"{unique}-inference", tmp_path / "artifacts"))
    preds = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    readers.append(preds)
    produce(kafka, spec.topics.features, feature_events(spec, 100))
    preds.until(lambda r: len(r) >= 100)  # v1 serves and is warm
    bad = publish_unchecked(kafka, registry, spec, nan_model(2.0, TensorProto.DOUBLE), "champion")
    deadline = time.monotonic() + 30
    while inference[0].metric("loopline_inference_plan_changes_total", pipeline=unique) < 2:
        assert time.monotonic() < deadline, "v2 never took over"
        time.sleep(0.1)
    # Every event of the next stretch makes v2 fail: it is rolled back to v1, which serves them all.
    produce(kafka, spec.topics.features,
            feature_events(spec, 300, start=100, poison=set(range(100, 400))))
    got = preds.until(lambda r: sum(p["served"] for p in r) >= 400)
    served_once(got, 400)
    assert {p["model_version"] for p in got
            if p["event_id"] in {f"e{i}" for i in range(100, 400)}} == {1}
    deadline = time.monotonic() + 30
    while True:
        state = registry.state()
        current = champion(state, unique)
        if current is not None and current["version"] == 1 and \
                state.versions[(unique, unique, bad)]["stage"] == "rejected":
            break
        assert time.monotonic() < deadline, "the registry does not show the rollback"
        time.sleep(0.2)


def test_a_pipeline_without_a_working_version_waits_and_loses_nothing(
        kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path,
        inference: list[Inference], readers: list[Reader]) -> None:
    spec, registry = deploy(kafka, unique, tmp_path)
    other, other_registry = deploy(kafka, f"{unique}b", tmp_path)
    # fails on every live event
    publish_unchecked(kafka, registry, spec, nan_model(2.0), "champion")
    other_registry.register(other.name, sklearn_model(3, np.float32))
    service = Inference(settings, [unique, other.name], f"{unique}-inference",
                        tmp_path / "artifacts")
    inference.append(service)
    n = 200
    produce(kafka, spec.topics.features, feature_events(spec, n, poison=set(range(n))))
    produce(kafka, other.topics.features, feature_events(other, n))
    other_preds = Reader(kafka, other.topics.predictions, "prediction", other.partitions)
    readers.append(other_preds)
    # the other pipeline is served all along
    served_once(other_preds.until(lambda r: len(r) >= n), n)
    deadline = time.monotonic() + 30
    while service.rt.health.ready()[0]:
        assert time.monotonic() < deadline, "readiness stayed true without a working version"
        time.sleep(0.1)
    assert unique in service.rt.health.ready()[1]
    # a working version: what waited is served
    registry.register(unique, sklearn_model(4, np.float32))
    preds = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    readers.append(preds)
    served_once(preds.until(lambda r: len(r) >= n), n)
    deadline = time.monotonic() + 30
    while not service.rt.health.ready()[0]:
        assert time.monotonic() < deadline, f"not ready again: {service.rt.health.ready()[1]}"
        time.sleep(0.1)


def test_events_a_champion_cannot_score_are_dead_lettered_the_rest_served(
        kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path,
        inference: list[Inference], readers: list[Reader]) -> None:
    spec, registry = deploy(kafka, unique, tmp_path)
    publish_unchecked(kafka, registry, spec, nan_model(2.0), "champion")
    inference.append(Inference(settings, [unique], f"{unique}-inference", tmp_path / "artifacts"))
    n, poison = 300, {7, 150, 299}
    produce(kafka, spec.topics.features, feature_events(spec, n, poison=poison))
    preds = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    dead = Reader(kafka, spec.topics.deadletter, "deadletter", spec.partitions)
    readers.extend([preds, dead])
    got = preds.until(lambda r: len(r) >= n - len(poison))
    letters = dead.until(lambda r: len(r) >= len(poison))
    assert {p["event_id"] for p in got} == {f"e{i}" for i in range(n)} - {f"e{i}" for i in poison}
    assert len(got) == n - len(poison)
    assert all(d["rule"] == "scoring" and "NaN" in d["message"] for d in letters)
    assert len({d["deadletter_id"] for d in letters}) == len(poison)


def test_readiness_says_when_the_broker_is_gone(tmp_path: Path, unique: str) -> None:
    """A service whose broker died is alive but not
    ready, and says why (it cannot make progress)."""
    broker = EmbeddedBroker(home=tmp_path / "broker")
    broker.start()
    try:
        settings = LooplineSettings(bootstrap_servers=broker.bootstrap_servers,
                                    kafka_profile="embedded",
                                    session_timeout_ms=6000, home=tmp_path)
        kafka = KafkaConfig.from_settings(settings)
        _spec, registry = deploy(kafka, unique, tmp_path)
        registry.register(unique, sklearn_model(1, np.float32))
        service = Inference(settings, [unique], f"{unique}-inference", tmp_path / "artifacts")
        try:
            deadline = time.monotonic() + 60
            while not service.rt.health.ready()[0]:
                assert time.monotonic() < deadline, service.rt.health.ready()
                time.sleep(0.1)
            broker.stop()
            deadline = time.monotonic() + 60
            while service.rt.health.ready()[0]:
                assert time.monotonic() < deadline, "still ready with the broker gone"
                time.sleep(0.2)
            _ready, reason = service.rt.health.ready()
            assert "broker unreachable" in reason, reason
            assert service.rt.health.live()[0], (
                "alive: the loop still runs, it just cannot make progress")
        finally:
            service.rt.stop.set()
            service.thread.join(30)
    finally:
        broker.stop()
