"""The monitor on the real broker: a champion with a reference profile, a stream that shifts at a
known point, late feedback, a deployed version without traffic; alerts once per episode, metrics,
restart."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from loopline import avro, topics
from loopline.alerts import alert_event
from loopline.apply import apply_spec
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.profile import build_profile
from loopline.registry import model_version_key, now_ms, publish
from loopline.runtime.service import ServiceRuntime
from loopline.sdk import PredictionReader
from loopline.services.monitor.main import create, serve
from loopline.services.monitor.service import MonitorService
from loopline.services.monitor.settings import MonitorSettings
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration

SHIFT, TOTAL = 2000, 4000


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({
        "name": name, "partitions": 1,
        "features": [{"name": "amount", "type": "float", "min": 0},
                     {"name": "channel", "type": "string", "required": False}],
        "label": {"classes": ["no", "yes"], "positive": "yes"},
        "monitor": {"detectors": ["adwin", "page_hinkley"], "error_detectors": ["ddm", "hddm_a"],
                    "window": 500, "zombie_after_s": 2.0}})


def register(producer: AckedProducer, spec: PipelineSpec, version: int, stage: str,
             profile: dict[str, Any] | None) -> None:
    publish(producer, model_version_key(spec.name, "fraud-lr", version), {
        "kind": "model_version", "pipeline": spec.name, "at": now_ms(), "spec": None,
        "stage_change": None,
        "model": {"name": "fraud-lr", "version": version, "sha256": "0" * 64,
                  "uri": "file:///nowhere",
                  "stage": stage, "traffic": 1.0 if stage == "champion" else 0.1,
                  "created_at": now_ms(),
                  "reference_profile_json": orjson.dumps(profile).decode() if profile else None}})


def events(spec: PipelineSpec, start: int, n: int,
           seed: int) -> tuple[list[bytes], list[bytes], list[str]]:
    """Features and champion predictions for events start..start+n; the amount shifts at SHIFT."""
    rng = np.random.default_rng(seed + start)
    fcodec, pcodec = avro.Codec(spec.features_schema()), avro.codec("prediction")
    features, predictions, truth = [], [], []
    t = spec.topics
    for i in range(start, start + n):
        amount = float(rng.normal(65 if i >= SHIFT else 50, 10))
        eid = f"e{i}"
        features.append(fcodec.encode({
            "event_id": eid, "key": None, "ts": 1_000_000 + i, "ingested_at": 1_000_000 + i,
            "source": {"topic": t.raw, "partition": 0, "offset": i},
            "features": {"amount": amount, "channel": "web" if i % 3 else None}}))
        predicted = "yes" if amount > 60 else "no"
        predictions.append(pcodec.encode({
            "prediction_id": f"p{i}", "event_id": eid, "key": None, "pipeline": spec.name,
            "model_name": "fraud-lr", "model_version": 1, "model_sha256": "0" * 64,
            "variant": "champion",
            "served": True, "label": predicted, "value": min(1.0, amount / 100), "scores": {},
            "source": {"topic": t.features, "partition": 0, "offset": i}, "event_ts": 1_000_000 + i,
            "scored_at": 2_000_000 + i}))
        # The model is right 95% of the time before the shift and 55% after it (concept drift too).
        wrong = rng.random() < (0.45 if i >= SHIFT else 0.05)
        truth.append(("no" if predicted == "yes" else "yes") if wrong else predicted)
    return features, predictions, truth


def dead_letters(spec: PipelineSpec, n: int) -> list[bytes]:
    """Rejections as ingest writes them: 'amount' had the wrong type."""
    codec = avro.codec("deadletter")
    return [codec.encode({"original": b'{"features": {"amount": "12"}}', "original_key": None,
                          "source": {"topic": spec.topics.raw, "partition": 0, "offset": i},
                          "source_timestamp": None, "field": "amount", "rule": "type",
                          "message": "amount: expected a number, got a string", "service": "ingest",
                          "at": now_ms()})
            for i in range(n)]


def send(producer: AckedProducer, topic: str, values: list[bytes]) -> None:
    for v in values:
        producer.send(topic, v)
    producer.confirm()


def feedback(start: int, truth: list[str]) -> list[bytes]:
    codec = avro.codec("feedback")
    return [codec.encode({"feedback_id": f"f{start + j}", "prediction_id": f"p{start + j}",
                          "event_id": None, "label": label, "value": None, "verdict": None,
                          "ts": 9_000_000 + start + j})
            for j, label in enumerate(truth)]


class Alerts:
    """Reads loopline.alerts from the beginning, keeping one pipeline's events."""

    def __init__(self, kafka: KafkaConfig, pipeline: str) -> None:
        self.pipeline = pipeline
        self.events: list[dict[str, Any]] = []
        self._consumer = kafka.reader(f"alerts-{pipeline}")
        self._consumer.assign([TopicPartition(topics.ALERTS, 0, OFFSET_BEGINNING)])
        self._codec = avro.codec("alert")

    def poll(self) -> list[dict[str, Any]]:
        for m in self._consumer.consume(1000, 0.2):
            if m.error() is None:
                event = self._codec.decode(m.value())
                if event["pipeline"] == self.pipeline:
                    self.events.append(event)
        return self.events

    def wait(self, condition: Callable[[list[dict[str, Any]]], bool],
             timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition(self.poll()):
            assert time.monotonic() < deadline, (
                f"alerts so far: {[e['message'] for e in self.events]}")

    def close(self) -> None:
        self._consumer.close()


class Running:
    """The monitor service in a thread, exactly as `loopline run monitor` builds it."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.rt = ServiceRuntime("monitor", settings, install_signals=False).__enter__()
        self.service: MonitorService = create(self.rt, settings)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            serve(self.rt, self.settings, self.service)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            self.errors.append(e)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.rt.metrics.address}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self) -> None:
        self.rt.stop.set()
        self.thread.join(30)
        self.rt.__exit__(None, None, None)
        assert not self.thread.is_alive() and not self.errors, self.errors


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def gauge(text: str, series: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_shift_late_feedback_zombie_and_restart(kafka: KafkaConfig, settings: LooplineSettings,
                                                unique: str, tmp_path: Path) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    producer = AckedProducer(kafka.producer("test-monitor"))
    rng = np.random.default_rng(5)
    # optional: missing a third of the time
    channel = [None if i % 3 == 0 else "web" for i in range(5000)]
    profile = build_profile({"amount": rng.normal(50, 10, 5000), "channel": channel},
                            {"amount": "float", "channel": "string"},
                            {"value": np.clip(rng.normal(50, 10, 5000) / 100, 0, 1)})
    register(producer, spec, 1, "champion", profile)
    register(producer, spec, 2, "challenger", profile)  # deployed, never scores: a zombie

    msettings = MonitorSettings(bootstrap_servers=settings.bootstrap_servers,
                                kafka_profile=settings.kafka_profile,
                                session_timeout_ms=6000, home=tmp_path, pipelines=[spec.name],
                                group_id=f"{unique}-monitor", checkpoint_interval_s=0.5,
                                zombie_check_s=0.3, log_level="WARNING")
    alerts = Alerts(kafka, spec.name)
    monitor = Running(msettings)
    try:
        f, p, truth = events(spec, 0, TOTAL, seed=1)
        send(producer, spec.topics.features, f)
        send(producer, spec.topics.predictions, p)
        send(producer, spec.topics.deadletter, dead_letters(spec, 300))

        def raised(signal: str, detector: str | None = None) -> list[dict[str, Any]]:
            return [e for e in alerts.events if e["signal"] == signal and e["state"] == "raised"
                    and (detector is None or e["detector"] == detector)]

        wait_for(lambda: gauge(monitor.metrics(), "loopline_monitor_events_total",
                               kind="deadletter") == 300,
                 "every dead letter consumed")
        alerts.wait(lambda _: bool(raised("drift", "psi"))
                    and bool(raised("zombie")) and bool(raised("quality")))
        wait_for(lambda: gauge(monitor.metrics(), "loopline_monitor_events_total",
                               kind="predictions") == TOTAL,
                 "every prediction consumed")
        assert not raised("performance"), "no feedback yet, so no performance alert"

        # Feedback arrives late: after every prediction was consumed.
        send(producer, spec.topics.feedback, feedback(0, truth))
        alerts.wait(lambda _: bool(raised("performance")))
        wait_for(lambda: gauge(monitor.metrics(), "loopline_monitor_labeled",
                               variant="champion") == TOTAL,
                 "every feedback joined")
        text = monitor.metrics()
        monitor.stop()  # writes the final checkpoint

        # Alerts come after the shift (their change point: at most a little before it), with
        # reasons a person can read; river's detectors are early warnings, never alerts.
        for e in raised("drift") + raised("performance"):
            assert e["first_offset"] >= SHIFT - 100 and e["last_offset"] >= SHIFT, e["message"]
        feature_drift = [e for e in raised("drift") if e["feature"] == "amount"]
        assert {e["detector"] for e in feature_drift} == {"psi"}
        psi = next(e for e in feature_drift if e["severity"] == "alert")
        assert psi["last_offset"] - SHIFT < 300 and "Feature 'amount' drifted" in psi["message"]
        assert psi["statistic"] >= 0.25 and psi["threshold"] == 0.25 and psi["p_value"] < 1e-4
        assert psi["reference_value"] < 51 < 60 < psi["current_value"] and psi["action"]
        assert psi["model_name"] == "fraud-lr" and psi["model_version"] == 1
        assert "PSI" in psi["message"]
        assert any(e["feature"] == "value" and e["model_version"] == 1 for e in raised("drift")), \
            "the champion's output drifts with its input"
        perf = raised("performance")[0]
        assert perf["model_name"] == "fraud-lr" and "degraded" in perf["message"]
        zombie = raised("zombie")
        # v2 never scored; v1 may be reported too, once its traffic stopped for 2 s while feedback
        # was awaited.
        challenger = next(e for e in zombie if e["model_version"] == 2)
        assert challenger["severity"] == "warning"
        assert "fraud-lr v2 (challenger) has served no predictions" in challenger["message"]
        # Once per episode: one raise per (signal, subject, detector, severity), not per event.
        keys = [(e["signal"], e["feature"], e["detector"], e["model_version"], e["severity"])
                for e in alerts.events if e["state"] == "raised"]
        assert len(keys) == len(set(keys)), keys
        assert len(alerts.events) < 30

        quality = raised("quality")
        assert [(e["feature"], e["detector"]) for e in quality] == [("amount", "type_error")], \
            ("ingest's type errors are reported; "
             "'channel' is missing no more often than in the reference")
        assert "Data quality of feature 'amount'" in quality[0]["message"]

        # The metrics show it.
        assert gauge(text, "loopline_monitor_alert_active", signal="drift", name="amount",
                     detector="psi") == 2.0
        assert gauge(text, "loopline_monitor_psi", subject="feature",
                     name="amount") >= 0.25  # type: ignore[operator]  # the gauge exists
        assert gauge(text, "loopline_monitor_zombie", version="2") == 1.0
        accuracy = gauge(text, "loopline_monitor_model_metric", variant="champion",
                         metric="accuracy")
        assert accuracy is not None and 0.45 < accuracy < 0.65  # the last window is all post-shift

        # Restart: detectors and open episodes come back from the checkpoint.
        alerts_before = len(alerts.events)
        monitor = Running(msettings)
        wait_for(lambda: spec.name in monitor.service.pipelines, "the pipeline taken over again")
        pm = monitor.service.pipelines[spec.name]
        # The pipeline (and the registry's judged records, the monitor's other unit) come back.
        assert gauge(monitor.metrics(), "loopline_unit_restores_total", outcome="restored") == 2
        assert pm.features["amount"].detectors[0].seen == TOTAL
        f, p, _ = events(spec, TOTAL, 1000, seed=2)
        send(producer, spec.topics.features, f)
        wait_for(lambda: pm.features["amount"].detectors[0].seen == TOTAL + 1000,
                 "post-restart events")
        time.sleep(1.0)  # lets any (wrong) duplicate alert arrive before counting
        new = alerts.poll()[alerts_before:]
        assert not [e for e in new if e["state"] == "raised" and e["detector"] == "psi"], \
            "the open PSI episode survived the restart, so it is not raised again"
        assert gauge(monitor.metrics(), "loopline_monitor_events_total", kind="features") == 1000, \
            "events before the checkpoint are not learned twice"
    finally:
        if monitor.thread.is_alive():
            monitor.stop()
        alerts.close()


def test_predictions_nobody_reads_are_reported_until_a_reader_consumes_them(
        kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    producer = AckedProducer(kafka.producer("test-monitor"))
    register(producer, spec, 1, "champion", None)
    msettings = MonitorSettings(bootstrap_servers=settings.bootstrap_servers,
                                kafka_profile=settings.kafka_profile,
                                session_timeout_ms=6000, home=tmp_path, pipelines=[spec.name],
                                group_id=f"{unique}-monitor", zombie_check_s=0.3,
                                readers_check_s=0.3, log_level="WARNING")
    alerts = Alerts(kafka, spec.name)

    def unread(state: str) -> list[dict[str, Any]]:
        return [e for e in alerts.events if e["signal"] == "zombie" and e["detector"] == "unread"
                and e["state"] == state]

    def read_all(group: str, n: int) -> None:
        reader = PredictionReader(spec.name, group, settings=settings, poll_timeout_s=0.2)
        try:
            got: list[dict[str, Any]] = []
            deadline = time.monotonic() + 60
            while len(got) < n:
                assert time.monotonic() < deadline, f"{group} read {len(got)} of {n}"
                got += reader.poll()
        finally:
            reader.close()  # commits

    _, p, _ = events(spec, 0, 200, seed=4)
    send(producer, spec.topics.predictions, p)
    # Loopline's own services (lineage, trainer: loopline-*) read predictions too; they are not
    # readers. This one has committed past every prediction before the monitor even starts.
    read_all(f"loopline-lineage-{unique}", 200)
    monitor = Running(msettings)
    try:
        alerts.wait(lambda _: bool(unread("raised")))
        event = unread("raised")[0]
        assert event["model_version"] == 1 and event["severity"] == "warning"
        assert f"nobody has read its predictions on {spec.topics.predictions}" in event["message"]
        assert event["statistic"] >= 2.0 and event["threshold"] == 2.0
        assert gauge(monitor.metrics(), "loopline_monitor_zombie", version="1") == 1.0
        unread_s = gauge(monitor.metrics(), "loopline_monitor_model_unread_seconds", version="1")
        assert unread_s is not None and unread_s >= 2.0

        read_all(f"billing-{unique}", 200)  # a downstream consumer, through the SDK
        alerts.wait(lambda _: bool(unread("resolved")))
        assert "being read again" in unread("resolved")[0]["message"]
        assert gauge(monitor.metrics(), "loopline_monitor_model_unread_seconds", version="1") == 0.0
        assert len(unread("raised")) == 1, "once per episode"
    finally:
        monitor.stop()
        alerts.close()


def test_a_pipeline_applied_after_start_is_monitored(kafka: KafkaConfig, settings: LooplineSettings,
                                                     unique: str, tmp_path: Path) -> None:
    spec = make_spec(unique)
    msettings = MonitorSettings(bootstrap_servers=settings.bootstrap_servers,
                                kafka_profile=settings.kafka_profile,
                                session_timeout_ms=6000, home=tmp_path, pipelines=[spec.name],
                                group_id=f"{unique}-monitor", registry_poll_s=0.2,
                                log_level="WARNING")
    monitor = Running(msettings)
    try:
        wait_for(lambda: monitor.rt.health.ready()[0], "monitor ready")
        assert monitor.service.pipelines == {}
        apply_spec(kafka, spec)
        f, _, _ = events(spec, 0, 300, seed=3)
        send(AckedProducer(kafka.producer("test-monitor")), spec.topics.features, f)
        wait_for(lambda: gauge(monitor.metrics(), "loopline_monitor_events_total",
                               kind="features") == 300,
                 "the new pipeline's events consumed")
    finally:
        monitor.stop()


def test_alert_schema_accepts_monitor_fields() -> None:
    event = alert_event("p", "drift", "m", feature="x", detector="adwin", statistic=1.0, window=5)
    assert avro.codec("alert").decode(avro.codec("alert").encode(event))["detector"] == "adwin"
