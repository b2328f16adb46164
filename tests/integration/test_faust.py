"""examples/faust_app.py run as a user runs it: a Faust worker on a real broker and pipeline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from confluent_kafka import KafkaError, TopicPartition

from loopline import avro, feedback
from loopline.apply import apply_spec
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "faust_app.py"
MIN_SCORE = 0.8
CLASSES = ["no", "yes"]


def _spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "features": [{"name": "x", "type": "float"}],
                       "label": {"classes": CLASSES, "positive": "yes"}, "partitions": 2})


def _prediction(spec: PipelineSpec, i: int, key: str, label: str, score: float,
                served: bool = True) -> dict[str, Any]:
    variant = "champion" if served else "shadow"
    return {"prediction_id": f"{spec.name}-p{i}-{variant}", "event_id": f"e{i}", "key": key,
            "pipeline": spec.name, "model_name": spec.name, "model_version": 1,
            "model_sha256": "0" * 64,
            "variant": variant, "served": served, "label": label, "value": score,
            "scores": {label: score, next(c for c in CLASSES if c != label): 1 - score},
            "source": {"topic": spec.topics.features, "partition": 0, "offset": i},
            "event_ts": 1_700_000_000_000 + i, "scored_at": 1_700_000_000_100 + i}


class Traffic:
    """Predictions sent so far, and what the app should make of them."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec, self.count = spec, 0
        self.stats: dict[str, dict[str, Any]] = {}
        self.accepted: set[str] = set()

    def send(self, kafka: KafkaConfig, keys: list[str], per_key: int) -> None:
        producer = AckedProducer(kafka.producer("test-faust"))
        codec = avro.codec("prediction")
        for n in range(per_key):
            for key in keys:
                self.count += 1
                label, score = CLASSES[self.count % 2], (0.55, 0.95, 0.85)[self.count // 3 % 3]
                served = _prediction(self.spec, self.count, key, label, score)
                shadow = _prediction(self.spec, self.count, key, CLASSES[0], 0.99, served=False)
                for record in (served, shadow):
                    producer.send(self.spec.topics.predictions, codec.encode(record), key=key)
                if n == 1:  # foreign bytes on the topic: the app must skip them and go on
                    junk = b'{"prediction_id": "json?"}'
                    producer.send(self.spec.topics.predictions, junk, key=key)
                s = self.stats.setdefault(key, {"served": 0, "accepted": 0, "labels": {}})
                s["served"] += 1
                s["labels"][label] = s["labels"].get(label, 0) + 1
                if score >= MIN_SCORE:
                    s["accepted"] += 1
                    self.accepted.add(served["prediction_id"])
        producer.confirm()


@dataclass
class Worker:
    """A running worker process and its log."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """The worker's output so far."""
        return self.log_path.read_text(errors="replace")


@contextmanager
def worker(settings: LooplineSettings, home: Path, app_id: str, pipeline: str) -> Iterator[Worker]:
    """``python examples/faust_app.py worker`` with LOOPLINE_* settings, stopped by SIGTERM."""
    env = {**os.environ, "LOOPLINE_BOOTSTRAP_SERVERS": str(settings.bootstrap_servers),
           "LOOPLINE_KAFKA_PROFILE": settings.kafka_profile,
           "LOOPLINE_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
           "LOOPLINE_HOME": str(home),
           "LOOPLINE_FAUST_PIPELINE": pipeline, "LOOPLINE_FAUST_APP_ID": app_id,
           "LOOPLINE_FAUST_MIN_SCORE": str(MIN_SCORE), "LOOPLINE_SECURITY_PROTOCOL":
           settings.security_protocol}
    for name in ("sasl_mechanism", "sasl_username", "ssl_ca_location"):  # a secured test cluster
        if getattr(settings, name):
            env[f"LOOPLINE_{name.upper()}"] = str(getattr(settings, name))
    if settings.sasl_password is not None:
        env["LOOPLINE_SASL_PASSWORD"] = settings.sasl_password.get_secret_value()
    log_path = home / f"worker-{time.monotonic_ns()}.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(EXAMPLE), "worker", "-l", "info"], env=env,
                                cwd=home, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Worker(proc, log_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def read_all(kafka: KafkaConfig, topic: str, partitions: int) -> list[Any]:
    """Every message of ``topic`` now (the reader stops at each partition's end)."""
    if topic not in kafka.admin().list_topics(timeout=10).topics:
        return []  # not created yet (assigning it could make the broker auto-create it)
    consumer = kafka.reader("test-faust-read", **{"enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out, ended = [], set[int]()
    deadline = time.monotonic() + 30
    try:
        while len(ended) < partitions and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                err = m.error()
                if err is None:
                    out.append(m)
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.add(cast(int, m.partition()))
                elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise AssertionError(f"reading {topic}: {err.str()}")
    finally:
        consumer.close()
    return out


def wait_for(what: str, probe: Any, expected: Any, w: Worker, timeout_s: float = 120) -> None:
    """Poll ``probe()`` until it returns ``expected``; else fail with what it got and the log."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got == expected:
            return
        if w.proc.poll() is not None or time.monotonic() > deadline:
            state = "running" if w.proc.returncode is None else f"exit code {w.proc.returncode}"
            raise AssertionError(f"{what}: expected {expected}, got {got} (worker {state})\n"
                                 f"--- worker log ---\n{w.log()[-6000:]}")
        time.sleep(1)


def test_faust_example_counts_predictions_and_sends_feedback(
        kafka: KafkaConfig, settings: LooplineSettings, unique: str, tmp_path: Path) -> None:
    spec = _spec(unique)
    apply_spec(kafka, spec)
    app_id = f"faust-{unique}"
    changelog = f"{app_id}-served-per-key-changelog"
    traffic = Traffic(spec)

    def table() -> dict[str, dict[str, Any]]:
        last: dict[str, Any] = {}
        for m in read_all(kafka, changelog, spec.partitions):
            last[orjson.loads(m.key())] = orjson.loads(m.value())
        return {k: {"served": v["served"], "accepted": v["accepted"], "labels": v["labels"]}
                for k, v in last.items()}

    def sent_feedback() -> dict[str, dict[str, Any]]:
        out = {}
        for m in read_all(kafka, spec.topics.feedback, spec.partitions):
            # Exactly as the monitor and trainer read it: valid, with a label of the spec's classes.
            record = feedback.decode(m.value(), m.topic(), m.partition(), m.offset(),
                                     classes=spec.label.classes)
            assert m.value()[:2] == avro.MAGIC
            out[record["feedback_id"]] = record
        return out

    def accepted() -> set[str]:
        return {r["prediction_id"] for r in sent_feedback().values()}

    # Enough traffic that Faust's producer batches changelog writes unless told not to.
    traffic.send(kafka, ["k0", "k1", "k2"], per_key=30)
    with worker(settings, tmp_path, app_id, spec.name) as w:
        wait_for("table after the first run", table, traffic.stats, w)
        wait_for("accepted predictions", accepted, traffic.accepted, w)
    assert w.log().count("faust_bad_message") >= 3, "skipped messages are logged"
    # LOOPLINE_FAUST_WEB_ENABLED is false by default: no web server (Faust's `worker` starts one
    # on port 6066 unless told not to, so a second worker on the host could not start).
    assert ":6066" not in w.log(), w.log()[-3000:]

    # A second run restores the table from its changelog and counts only what is new.
    traffic.send(kafka, ["k0", "k1", "k2", "k3"], per_key=3)
    with worker(settings, tmp_path, app_id, spec.name) as w:
        wait_for("table after the restart", table, traffic.stats, w)
        wait_for("accepted predictions after the restart", accepted, traffic.accepted, w)

    records = sent_feedback()
    assert len(records) == len(traffic.accepted)  # a resend keeps its feedback_id
    for record in records.values():
        assert record["verdict"] == "accept" and record["event_id"] is None
        assert feedback.check(record, spec.label.classes) is record
