"""Durability on Apache Kafka (issue 17): under `loopline up --engine kafka`, kill -9 the broker
mid-stream; `up` starts it again, the services resume without a person, every valid event is
served exactly once (on the predictions topic itself) and the lineage store is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from services_harness import DeadLetters, RawTraffic, make_spec, served, wait_until
from test_inference import make_model

from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import KafkaConfig
from loopline.models import ModelRegistry
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings

pytestmark = [pytest.mark.integration, pytest.mark.only_kafka]

CLI = [sys.executable, "-m", "loopline.app.cli"]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]  # JSON is Any
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def ready(home: Path) -> bool:
    import urllib.request

    services = read_json(home / "up.json").get("services", {})
    if len(services) != 3:
        return False
    for s in services.values():
        try:
            with urllib.request.urlopen(s["metrics"] + "/readyz", timeout=1) as r:
                if r.status != 200:
                    return False
        except OSError:
            return False
    return True


def predictions_on_topic(kafka: KafkaConfig, topic: str,
                         partitions: int) -> Counter[tuple[str, str]]:
    """Messages per (event id, variant) on the predictions topic, read committed from the start."""
    consumer = kafka.reader(f"test-durability-{time.monotonic_ns()}")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    out: Counter[tuple[str, str]] = Counter()
    quiet = 0
    try:
        while quiet < 6:
            batch = consumer.consume(2000, 0.5)
            quiet = 0 if batch else quiet + 1
            for m in batch:
                if m.error() is None:
                    p = avro.codec("prediction").decode(m.value())
                    out[(p["event_id"], p["variant"])] += 1
    finally:
        consumer.close()
    return out


def test_kill_9_of_the_kafka_broker_mid_stream_under_up(tmp_path: Path, unique: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env.update(LOOPLINE_HOME=str(tmp_path), LOOPLINE_ENGINE="kafka",
               LOOPLINE_SESSION_TIMEOUT_MS="6000",
               LOOPLINE_PIPELINES=unique, LOOPLINE_FLUSH_INTERVAL_S="0.5",
               LOOPLINE_REGISTRY_POLL_S="0.2")
    with (tmp_path / "up.out").open("w") as out:
        up = subprocess.Popen([*CLI, "up", "--services", "ingest,inference,lineage"], env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    traffic: RawTraffic | None = None
    try:
        wait_until(lambda: read_json(tmp_path / "broker.json").get("pid") is not None, 240,
                   "the broker")
        broker = read_json(tmp_path / "broker.json")
        settings = LooplineSettings(bootstrap_servers=str(broker["bootstrap_servers"]),
                                    kafka_profile="kafka", session_timeout_ms=6000, home=tmp_path)
        kafka = KafkaConfig.from_settings(settings)
        spec = make_spec(unique, partitions=2)
        apply_spec(kafka, spec)
        ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test").register(
            spec.name, make_model(1))
        wait_until(lambda: ready(tmp_path), 240, "ingest, inference and lineage ready")
        store = LineageStore(tmp_path / "lineage")
        traffic = RawTraffic(kafka, spec.topics.raw, unique, chunk=10, pause_s=0.1,
                             limit=1500).start()
        wait_until(lambda: len(served(store, unique)) >= 150, 120, "events served before the kill")
        os.kill(int(broker["pid"]), signal.SIGKILL)  # kill -9 of the broker, mid-stream
        wait_until(lambda: read_json(tmp_path / "broker.json").get("pid") not in (None,
                                                                                  broker["pid"]),
                   240, "`up` started the broker again")
        resumed = traffic.sent
        wait_until(lambda: traffic.sent >= resumed + 300, 240,
                   "traffic flowing again after the restart")
        traffic.finish()  # the producer retried through the outage: everything sent is acknowledged
        wait_until(lambda: set(traffic.valid) <= set(served(store, unique)), 300,
                   "every valid event served after the broker came back")
        dead = DeadLetters(kafka, spec.topics.deadletter, spec.partitions)
        wait_until(lambda: traffic.bad <= dead.poll().sources(spec.topics.raw), 120,
                   "every bad event dead-lettered")
        letters = Counter((d["source"]["partition"], d["source"]["offset"]) for d in dead.letters
                          if d["source"]["topic"] == spec.topics.raw)
        dead.close()
        per_prediction = predictions_on_topic(kafka, spec.topics.predictions, spec.partitions)
        wait_until(lambda: ready(tmp_path), 120, "every service ready again")
        assert up.poll() is None, (tmp_path / "up.out").read_text()[-2000:]
    finally:
        if traffic is not None:
            traffic.stop()
        subprocess.run([*CLI, "down"], env=env, capture_output=True, timeout=180)
        try:
            up.wait(timeout=60)
        finally:
            up.kill()
    per_event = served(store, unique)
    assert set(per_event) == set(traffic.valid) and set(per_event.values()) == {1}
    assert {e for e, _ in per_prediction} == set(traffic.valid)
    assert set(per_prediction.values()) == {1}, [k for k, n in per_prediction.items() if n > 1][:5]
    assert set(letters) == traffic.bad and set(letters.values()) == {1}
    said = (tmp_path / "up.out").read_text()
    assert "died" in said and "Nothing is lost" in said
    print(f"\ndurability: sent={traffic.sent} valid={len(traffic.valid)} bad={len(traffic.bad)} "
          f"served={len(per_event)} up said: "
          f"{[line for line in said.splitlines() if 'restart' in line][:5]}")
