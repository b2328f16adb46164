"""The inference service on the real broker with real
ONNX models: routing, shadows, hot swap, refusals."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from loopline import avro, topics
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion
from loopline.registry import model_version_key, now_ms, publish
from loopline.runtime.service import ServiceRuntime
from loopline.services.inference.main import serve
from loopline.services.inference.plan import key_bucket
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


def make_model(seed: int, zipmap: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.random((300, 4)).astype(np.float32)
    y = (x[:, 0] + seed * 0.1 * x[:, 1] > 0.6).astype(int)
    options = None if zipmap else {"zipmap": False}
    return to_onnx(LogisticRegression().fit(x, y), x[:1], options=options).SerializeToString()


def feature_events(spec: PipelineSpec, n: int, start: int = 0,
                   keys: int = 500) -> list[tuple[bytes, bytes]]:
    codec = avro.Codec(spec.features_schema())
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        key = f"c{i % keys}"
        rec = {"event_id": f"e{i}", "key": key, "ts": now_ms(), "ingested_at": now_ms(),
               "source": {"topic": spec.topics.raw, "partition": 0, "offset": i},
               "features": {"customer": key, "x1": float(rng.random()), "x2": float(rng.random()),
                            "flag": bool(i % 2), "x3": None if i % 3 == 0 else float(rng.random())}}
        out.append((key.encode(), codec.encode(rec)))
    return out


def produce(kafka: KafkaConfig, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = AckedProducer(kafka.producer("test-features"))
    for key, value in messages:
        producer.send(topic, value, key=key)
    producer.confirm()


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_readers() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Reader:
    """Reads a topic from the start (assign, no group) and decodes every message."""

    def __init__(self, kafka: KafkaConfig, topic: str, kind: str, partitions: int) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        self.consumer = kafka.reader(f"test-{kind}")
        _OPEN.append(self.consumer)
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


@pytest.fixture
def deployed(kafka: KafkaConfig, settings: LooplineSettings, unique: str,
             tmp_path: Path):  # type: ignore[no-untyped-def]  # pytest fixtures
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    registry = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test")
    registry.register(unique, make_model(1))
    return spec, registry


@pytest.fixture
def service(settings: LooplineSettings, unique: str, tmp_path: Path) -> Iterator[ServiceRuntime]:
    s = InferenceSettings(bootstrap_servers=settings.bootstrap_servers,
                          kafka_profile=settings.kafka_profile,
                          session_timeout_ms=6000, home=settings.home, pipelines=[unique],
                          group_id=f"inference-{unique}", batch_size=500, registry_poll_s=0.05,
                          artifact_uri=str(tmp_path / "artifacts"))  # where `deployed` registers
    rt = ServiceRuntime("inference", s, install_signals=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with rt:
                serve(rt, s)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield rt
    rt.stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert not errors, errors


def by_event(preds: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in preds:
        out[p["event_id"]].append(p)
    return out


def metric(rt: ServiceRuntime, name: str, **labels: str) -> float:
    return rt.registry.get_sample_value(name, labels) or 0.0


def test_champion_challenger_shadow_split(kafka: KafkaConfig, deployed, service,
                                          unique: str) -> None:  # type: ignore[no-untyped-def]  # pytest fixtures
    spec, registry = deployed
    registry.register(unique, make_model(2), NewVersion(stage="challenger", traffic=0.2))
    registry.register(unique, make_model(3, zipmap=True), NewVersion(stage="shadow"))
    n = 3000
    produce(kafka, spec.topics.features, feature_events(spec, n, keys=1000))
    reader = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    preds = reader.until(lambda r: len(r) >= 2 * n)
    events = by_event(preds)
    assert len(events) == n
    variant_of_key: dict[str, set[str]] = defaultdict(set)
    for event_id, ps in events.items():
        served = [p for p in ps if p["served"]]
        assert len(served) == 1, (event_id, ps)
        shadows = [p for p in ps if p["variant"] == "shadow"]
        assert len(shadows) == 1 and not shadows[0]["served"]
        variant_of_key[served[0]["key"]].add(served[0]["variant"])
        assert len({p["prediction_id"] for p in ps}) == len(ps)
        for p in ps:
            assert p["label"] in ("0", "1") and set(p["scores"]) == {"0", "1"}
            assert p["value"] == pytest.approx(p["scores"]["1"])
    assert all(len(v) == 1 for v in variant_of_key.values()), "a key met two variants"
    challenger_keys = {k for k, v in variant_of_key.items() if v == {"challenger"}}
    assert challenger_keys == {k for k in variant_of_key if key_bucket(k) < 0.2}
    share = len(challenger_keys) / len(variant_of_key)
    assert 0.15 < share < 0.25
    assert metric(service, "loopline_inference_events_total", pipeline=unique) == n
    assert metric(service, "loopline_inference_predictions_total", pipeline=unique,
                  variant="shadow", served="false") == n


def test_hot_swap_while_traffic_flows(kafka: KafkaConfig, deployed, service,
                                      unique: str) -> None:  # type: ignore[no-untyped-def]  # pytest fixtures
    spec, registry = deployed
    reader = Reader(kafka, spec.topics.predictions, "prediction", spec.partitions)
    stop = threading.Event()
    sent = [0]

    def traffic() -> None:
        while not stop.is_set() and sent[0] < 20_000:
            produce(kafka, spec.topics.features, feature_events(spec, 200, start=sent[0]))
            sent[0] += 200
            time.sleep(0.02)

    producer_thread = threading.Thread(target=traffic, daemon=True)
    producer_thread.start()
    reader.until(lambda r: len(r) >= 1000)
    registry.register(unique, make_model(4))  # v2 becomes champion while events flow
    reader.until(lambda r: any(p["model_version"] == 2 for p in r))
    reader.until(lambda r: sum(p["model_version"] == 2 for p in r) >= 1000)
    stop.set()
    producer_thread.join(30)
    preds = reader.until(lambda r: len(by_event(r)) >= sent[0])
    events = by_event(preds)
    assert len(events) == sent[0], "lost events"
    assert all(sum(p["served"] for p in ps) == 1
               for ps in events.values()), "an event served twice or never"
    versions = Counter(p["model_version"] for p in preds)
    assert versions[1] > 0 and versions[2] > 0
    # Per partition, once v2 served, v1 never serves again (the swap happens between batches).
    last_v1 = defaultdict(int)
    first_v2: dict[int, int] = {}
    for p in preds:
        part, off = p["source"]["partition"], p["source"]["offset"]
        if p["model_version"] == 1:
            last_v1[part] = max(last_v1[part], off)
        else:
            first_v2[part] = min(first_v2.get(part, off), off)
    assert all(last_v1[p] < first_v2[p] for p in first_v2)


def test_corrupt_artifact_refused_while_serving_continues(kafka: KafkaConfig, deployed,
                                                          service,  # type: ignore[no-untyped-def]  # pytest fixtures
                                                          unique: str, tmp_path: Path) -> None:
    spec, registry = deployed
    alerts = Reader(kafka, topics.ALERTS, "alert", 1)
    # A version whose artifact in the store does not match its sha256 (tampered after it was
    # stored).
    claimed = "ab" * 32
    (tmp_path / "artifacts" / f"{claimed}.onnx").write_bytes(b"not an onnx model")
    record = dict(registry.state().versions[(unique, unique, 1)])
    for k in ("pipeline", "at"):
        record.pop(k)
    record.update(version=2, sha256=claimed,
                  uri=(tmp_path / "artifacts" / f"{claimed}.onnx").as_uri(),
                  stage="champion", created_at=now_ms())
    producer = AckedProducer(kafka.producer("test-registry"))
    publish(producer, model_version_key(unique, unique, 2),
            {"kind": "model_version", "pipeline": unique, "at": now_ms(), "spec": None,
             "model": record, "stage_change": None})
    alert = alerts.until(lambda r: any(a["pipeline"] == unique for a in r))
    alert = next(a for a in alert if a["pipeline"] == unique)
    assert alert["signal"] == "model_load" and alert["model_version"] == 2
    assert "sha256" in alert["message"]
    assert metric(service, "loopline_inference_model_loads_total", pipeline=unique,
                  outcome="refused") == 1
    produce(kafka, spec.topics.features, feature_events(spec, 500))
    preds = Reader(kafka, spec.topics.predictions, "prediction",
                   spec.partitions).until(lambda r: len(r) >= 500)
    assert len(preds) == 500 and {p["model_version"] for p in preds} == {1}
    assert all(p["served"] for p in preds)
