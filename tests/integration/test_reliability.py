"""Crash and failover on the real broker: kill -9 every service mid-stream, and an inference
replica.

Every service runs as its own `loopline run <service>` process. What users read afterwards — the
lineage store's served predictions and the dead-letter topic — must hold every input exactly once.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from services_harness import (
    DeadLetters,
    RawTraffic,
    ServiceProcess,
    make_spec,
    served,
    service_env,
    stored_rows,
    wait_until,
)
from test_inference import feature_events, make_model

from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry
from loopline.registry import now_ms
from loopline.services.lineage import query as q
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec

pytestmark = pytest.mark.integration

KILL_ORDER = ("inference", "ingest", "lineage", "monitor", "trainer")


def deploy(kafka: KafkaConfig, spec: PipelineSpec, home: Path) -> None:
    """Apply the spec and register a champion (sklearn LogisticRegression exported to ONNX)."""
    apply_spec(kafka, spec)
    registry = ModelRegistry(kafka, ArtifactStore(str(home / "artifacts")), actor="test")
    registry.register(spec.name, make_model(1))


def test_kill_9_each_service_mid_stream_loses_and_duplicates_nothing(
        settings: LooplineSettings, kafka: KafkaConfig, tmp_path: Path, unique: str) -> None:
    spec = make_spec(unique, partitions=2)
    deploy(kafka, spec, tmp_path)
    env = service_env(settings, tmp_path, unique)
    procs = {name: ServiceProcess(name, dict(env, LOOPLINE_GROUP_ID=f"{unique}-{name}"),
                                  tmp_path / f"{name}.log")
             for name in KILL_ORDER}
    store = LineageStore(tmp_path / "lineage")
    traffic = RawTraffic(kafka, spec.topics.raw, unique, chunk=8, pause_s=0.2, limit=3000)
    dead = DeadLetters(kafka, spec.topics.deadletter, spec.partitions)
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready(90)
        traffic.start()
        wait_until(lambda: len(served(store, unique)) >= 50, 90, "first served predictions")
        for name in KILL_ORDER:
            # Kill only while events flow end to end, so the victim has work in flight.
            flowing = len(served(store, unique)) + 30
            wait_until(lambda n=flowing: len(served(store, unique)) >= n, 60,
                       f"traffic flowing before killing {name}")
            assert traffic.sent < traffic.limit, "the stream ended before every service was killed"
            procs[name].kill9()
            procs[name].start()
            procs[name].wait_ready(60)
        traffic.finish()
        wait_until(lambda: set(traffic.valid) <= set(served(store, unique)), 120,
                   "every valid event served")
        wait_until(lambda: traffic.bad <= dead.poll().sources(spec.topics.raw), 60,
                   "every bad event dead-lettered")
        monitor = procs["monitor"]  # restarted from its checkpoint, it goes on watching the stream
        wait_until(lambda: monitor.metric("loopline_monitor_events_total", pipeline=unique) > 0, 60,
                   "the restarted monitor consuming")
        for p in procs.values():
            assert p.ready(), f"{p.label} not ready at the end"
    finally:
        traffic.stop()
        for p in procs.values():
            p.stop()
        dead.close()

    per_event = served(store, unique)
    missing, extra = set(traffic.valid) - set(per_event), set(per_event) - set(traffic.valid)
    assert not missing and not extra, (
        f"{len(missing)} valid events never served, {len(extra)} unknown served")
    doubled = {e: n for e, n in per_event.items() if n != 1}
    assert not doubled, (
        f"{len(doubled)} events served more than once, e.g. {list(doubled.items())[:3]}")
    con = q.connect(store, unique)
    features = con.execute("SELECT count(*), count(DISTINCT event_id) FROM features").fetchone()
    con.close()
    assert features == (len(traffic.valid),
                        len(traffic.valid)), "features table lost or duplicated events"
    assert dead.sources(spec.topics.raw) == traffic.bad
    # On the topics themselves, as a read_committed consumer sees them: on Kafka (transactions)
    # exactly one prediction per event and variant and one dead letter per bad input; elsewhere at
    # least one.
    per_prediction = predictions_on_topic(kafka, spec)
    letters = Counter((d["source"]["partition"], d["source"]["offset"]) for d in dead.letters
                      if d["source"]["topic"] == spec.topics.raw)
    assert {e for e, _ in per_prediction} == set(traffic.valid)
    if kafka.exactly_once:
        assert set(per_prediction.values()) == {1}, [k for k, n in per_prediction.items()
                                                     if n > 1][:5]
        assert set(letters.values()) == {1}, [k for k, n in letters.items() if n > 1][:5]
    assert all(p.kills == 1 for p in procs.values())
    # a killed process logs nothing; an error line means a service crashed on its own
    for p in procs.values():
        assert not p.errors(), (p.label, p.errors()[:2])
    print(f"\nreliability: sent={traffic.sent} valid={len(traffic.valid)} bad={len(traffic.bad)} "
          f"served_events={len(per_event)} "
          f"prediction_rows_stored={stored_rows(store, unique, 'predictions')} "
          f"feature_rows_stored={stored_rows(store, unique, 'features')} "
          f"dead_letters={len(dead.letters)} "
          f"kills={sum(p.kills for p in procs.values())}")


def predictions_on_topic(kafka: KafkaConfig, spec: PipelineSpec) -> Counter[tuple[str, str]]:
    """Messages per (event id, variant) on the predictions topic, read committed from the start."""
    consumer = kafka.reader(f"test-predictions-{now_ms()}")
    consumer.assign([TopicPartition(spec.topics.predictions, p, OFFSET_BEGINNING)
                     for p in range(spec.partitions)])
    codec = avro.codec("prediction")
    out: Counter[tuple[str, str]] = Counter()
    quiet = 0
    try:
        while quiet < 4:
            batch = consumer.consume(2000, 0.5)
            quiet = 0 if batch else quiet + 1
            for m in batch:
                if m.error() is None:
                    p = codec.decode(m.value())
                    out[(p["event_id"], p["variant"])] += 1
    finally:
        consumer.close()
    return out


class FeatureTraffic:
    """Feature events e0, e1, ... produced on a thread, ``chunk`` at a time, until stopped."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec, chunk: int = 30,
                 pause_s: float = 0.2) -> None:
        self.kafka, self.spec, self.chunk, self.pause_s = kafka, spec, chunk, pause_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FeatureTraffic:
        """Start producing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop after the current chunk."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def finish(self) -> int:
        """Stop after the current chunk; return how many events were sent (all acknowledged)."""
        self.stop()
        assert not self._thread.is_alive(), "the traffic thread did not finish"
        return self.sent

    def _run(self) -> None:
        producer = AckedProducer(self.kafka.producer("test-features"))
        while not self._stop.is_set():
            for key, value in feature_events(self.spec, self.chunk, start=self.sent):
                producer.send(self.spec.topics.features, value, key=key)
            producer.confirm()
            self.sent += self.chunk
            self._stop.wait(self.pause_s)


def served_since(store: LineageStore, pipeline: str, since_ms: int) -> dict[int, int]:
    """Served predictions per features partition of events created at or after ``since_ms``."""
    if pipeline not in store.pipelines():
        return {}
    con = q.connect(store, pipeline)
    try:
        return dict(con.execute("SELECT features_partition, count(*) FROM predictions WHERE served "
                                "AND epoch_ms(event_ts) >= ? GROUP BY ALL", [since_ms]).fetchall())
    finally:
        con.close()


def test_inference_replica_takes_over_when_the_other_dies(settings: LooplineSettings,
                                                          kafka: KafkaConfig,
                                                          tmp_path: Path, unique: str) -> None:
    spec = make_spec(unique, partitions=3)
    deploy(kafka, spec, tmp_path)
    env = service_env(settings, tmp_path, unique)
    group = dict(env, LOOPLINE_GROUP_ID=f"{unique}-inference")
    a = ServiceProcess("inference", group, tmp_path / "inference-a.log", "inference-a")
    b = ServiceProcess("inference", group, tmp_path / "inference-b.log", "inference-b")
    lineage = ServiceProcess("lineage", dict(env, LOOPLINE_GROUP_ID=f"{unique}-lineage"),
                             tmp_path / "lineage.log")
    store = LineageStore(tmp_path / "lineage")
    traffic = FeatureTraffic(kafka, spec)

    def events(p: ServiceProcess) -> float:
        return p.metric("loopline_inference_events_total", pipeline=unique)

    try:
        for p in (a, b, lineage):
            p.start()
        for p in (a, b, lineage):
            p.wait_ready(90)
        traffic.start()
        wait_until(lambda: events(a) > 0 and events(b) > 0, 90,
                   "both replicas scoring their partitions")
        b_before = events(b)
        a.kill9()
        killed_at = now_ms()  # events created from now on (their ts) can only be scored by b
        # The stream goes on until b serves every partition again (after a's session times out).
        wait_until(lambda: len(served_since(store, unique, killed_at)) == spec.partitions, 90,
                   "the surviving replica serving every partition")
        total = traffic.finish()
        wait_until(lambda: len(served(store, unique)) >= total, 90,
                   "every event served after the failover")
        b_after = events(b)
        assert b.ready() and not b.errors()
    finally:
        traffic.stop()
        for p in (a, b, lineage):
            p.stop()

    per_event = served(store, unique)
    assert set(per_event) == {f"e{i}" for i in range(total)}, "events lost (or unknown ones served)"
    doubled = {e: n for e, n in per_event.items() if n != 1}
    assert not doubled, (
        f"{len(doubled)} events served more than once, e.g. {list(doubled.items())[:3]}")
    after_kill = served_since(store, unique, killed_at)
    assert b_after - b_before >= sum(after_kill.values()), (
        "b scored fewer events than were served after the kill")
    print(f"\nfailover: events={total} served={len(per_event)} "
          f"prediction_rows_stored={stored_rows(store, unique, 'predictions')} "
          f"served_after_kill_by_partition={after_kill} "
          f"b_scored_after_kill={b_after - b_before:.0f}")
