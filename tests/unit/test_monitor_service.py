"""MonitorService.handle: routes the held pipelines' topics, decodes batches, names bad messages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from loopline import avro, feedback, topics
from loopline.registry import RegistryState
from loopline.services.monitor import service as monitor_service
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch
from loopline.services.monitor.service import MonitorService
from loopline.services.monitor.settings import MonitorSettings
from loopline.spec import PipelineSpec, parse_spec


class FakePipelineMonitor:
    """Records the batches it is given (the real one is tested on its own)."""

    def __init__(self, spec: PipelineSpec, tuning: Any) -> None:
        self.spec = spec
        self.seen: list[tuple[str, list[int], list[int], list[str]]] = []

    def refresh(self, state: RegistryState) -> None:
        pass

    def _see(self, kind: str, batch: Batch) -> list[Any]:
        # all the monitor reads of a feature event
        ids = [f"x{r['features']['x']:g}" if kind == "features"
               else r.get("feedback_id") or r.get("event_id") or r["rule"] for r in batch.records]
        self.seen.append((kind, batch.partitions, batch.offsets, ids))
        return []

    def on_features(self, batch: Batch, metrics: Any, at: int) -> list[Any]:
        return self._see("features", batch)

    def on_predictions(self, batch: Batch, metrics: Any, at: int, now_s: float = 0.0) -> list[Any]:
        return self._see("predictions", batch)

    def on_feedback(self, batch: Batch, metrics: Any, at: int) -> list[Any]:
        return self._see("feedback", batch)

    def on_dead_letters(self, batch: Batch, metrics: Any, at: int) -> list[Any]:
        return self._see("deadletter", batch)


def spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "features": [{"name": "x", "type": "float"}],
                       "label": {"classes": ["no", "yes"]}})


def state(*names: str) -> RegistryState:
    specs = {n: spec(n) for n in names}
    schemas = {n: [s.features_schema()] for n, s in specs.items()}
    return RegistryState(specs=specs, features_schemas=schemas)


def feature(pipeline: str, i: int) -> bytes:
    return avro.Codec(spec(pipeline).features_schema()).encode({
        "event_id": f"{pipeline}-e{i}", "key": None, "ts": i, "ingested_at": i,
        "source": {"topic": "raw", "partition": 0, "offset": i}, "features": {"x": float(i)}})


def msg(topic: str, partition: int, offset: int, value: bytes | None) -> Message:
    return Message(topic=topic, partition=partition, offset=offset, key=None, value=value,
                   timestamp=(1, 5))


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MonitorService:
    monkeypatch.setattr(monitor_service, "PipelineMonitor", FakePipelineMonitor)
    settings = MonitorSettings(bootstrap_servers="127.0.0.1:1", home=tmp_path)
    svc = MonitorService(settings, MonitorMetrics(CollectorRegistry()))
    svc.sync(state("demo"))
    svc.adopt("demo", None)
    return svc


def seen(svc: MonitorService, pipeline: str) -> list[tuple[str, list[int], list[int], list[str]]]:
    return svc.pipelines[pipeline].seen  # type: ignore[attr-defined, no-any-return]  # set by the code under test


def test_routes_the_held_pipelines_topics_and_names_bad_messages(
        service: MonitorService, caplog: pytest.LogCaptureFixture) -> None:
    demo, other = topics.PipelineTopics("demo"), topics.PipelineTopics("other")
    messages = [msg(demo.features, 0, i, b"not avro" if i == 7 else feature("demo", i))
                for i in range(5, 10)]
    messages += [msg(demo.features, 1, i, feature("demo", 100 + i)) for i in range(3)]
    messages += [msg(other.features, 0, i, feature("other", i)) for i in range(4)]  # not held here
    messages += [msg(topics.MODELS, 0, 3, b"registry event")]  # not a pipeline topic
    messages += [msg(demo.feedback, 0, 20, b'{"event_id": "demo-e5", "label": "yes"}')]
    messages.sort(key=lambda m: (m.offset(), m.topic()))  # interleaved; each partition in order

    with caplog.at_level(logging.WARNING):
        assert service.handle(messages) == []
    fid = feedback.derived_id(demo.feedback, 0, 5, b'{"event_id": "demo-e5", "label": "yes"}')
    assert seen(service, "demo") == [
        ("features", [1, 1, 1, 0, 0, 0, 0], [0, 1, 2, 5, 6, 8, 9],
         ["x100", "x101", "x102", "x5", "x6", "x8", "x9"]),
        ("feedback", [0], [20], [fid]),
    ]
    bad = [r for r in caplog.records if r.getMessage() == "monitor_unreadable_message"]
    where = [(r.__dict__["topic"], r.__dict__["partition"], r.__dict__["offset"]) for r in bad]
    assert where == [(demo.features, 0, 7)]
    unreadable = service.metrics.events.labels("demo", "features_unreadable")._value.get()
    assert unreadable == 1

    # A pipeline taken over later: its topics are routed from then on; a released one is not.
    service.sync(state("demo", "other"))
    service.adopt("other", None)
    service.release("demo")
    service.handle(messages)
    assert seen(service, "other") == [("features", [0, 0, 0, 0], [0, 1, 2, 3],
                                       ["x0", "x1", "x2", "x3"])]


def test_one_pipeline_failing_does_not_stop_the_others(service: MonitorService,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    demo, other = topics.PipelineTopics("demo"), topics.PipelineTopics("other")
    service.sync(state("demo", "other"))
    service.adopt("other", None)

    def broken(batch: Batch, metrics: Any, at: int) -> list[Any]:
        raise RuntimeError("a bug in one pipeline's detectors")

    service.pipelines["demo"].on_features = broken  # type: ignore[method-assign]  # a test double
    with caplog.at_level(logging.ERROR):
        service.handle([msg(demo.features, 0, 0, feature("demo", 0)),
                        msg(other.features, 0, 0, feature("other", 0))])
    assert seen(service, "other") == [("features", [0], [0], ["x0"])]
    assert service.metrics.events.labels("demo", "features_failed")._value.get() == 1
    assert any(r.getMessage() == "monitor_pipeline_failed" for r in caplog.records)


def test_a_large_batch_is_decoded_as_one(service: MonitorService,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    demo = topics.PipelineTopics("demo")
    calls: list[tuple[int, Any]] = []
    original = avro.Codec.decode_each

    def spy(self: avro.Codec, values: list[bytes], fields: Any = None) -> list[Any]:
        calls.append((len(values), fields))
        return original(self, values, fields)

    monkeypatch.setattr(avro.Codec, "decode_each", spy)
    service.handle([msg(demo.features, 0, i, feature("demo", i)) for i in range(500)])
    assert calls == [(500, ("features",))]
    assert seen(service, "demo")[0][2] == list(range(500))
