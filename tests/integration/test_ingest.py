"""The ingest service on the real broker: mixed input,
counting, dead letters, restarts, new pipelines."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from services_harness import failing_delivery

from loopline import avro
from loopline.apply import apply_spec
from loopline.broker import free_port
from loopline.errors import DeliveryError
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.runtime.delivery import Delivery
from loopline.runtime.service import ServiceRuntime
from loopline.services.ingest import IngestService, IngestSettings, derived_event_id
from loopline.spec import PipelineSpec, load_spec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_INSTANCES = itertools.count()
GOOD = {"customer_id": "c1", "amount": 12.5, "merchant_risk": 0.2, "hour": 3, "country": "DE",
        "card_present": True}


def make_spec(name: str, **changes: Any) -> PipelineSpec:
    spec = load_spec(REPO / "examples" / "fraud.yaml")
    return spec.model_copy(update={"name": name, **changes})


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s:.0f}s"
        time.sleep(0.1)


class Running:
    """An IngestService on a thread, with its own runtime (metrics registry, health, stop flag)."""

    def __init__(self, kafka: KafkaConfig, pipelines: list[str], group: str,
                 delivery: Callable[[ServiceRuntime], Delivery] | None = None,
                 **settings: Any) -> None:
        self.settings = IngestSettings(
            bootstrap_servers=kafka.settings.bootstrap_servers,
            kafka_profile=kafka.settings.kafka_profile,
            session_timeout_ms=6000, home=kafka.settings.home, pipelines=pipelines, batch_size=200,
            registry_poll_s=0.2, group_id=group, instance_id=f"{group}-{next(_INSTANCES)}",
            **settings)
        self.rt = ServiceRuntime("ingest", self.settings, install_signals=False)
        self.registry, self.health, self.stop = self.rt.registry, self.rt.health, self.rt.stop
        self.service = IngestService(self.rt, self.settings,
                                     delivery(self.rt) if delivery else None)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.rt:
                self.service.run()
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            self.error = e

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def running(kafka: KafkaConfig) -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.stop.set()
    for r in started:
        r.thread.join(30)


def produce(kafka: KafkaConfig, topic: str,
            messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AckedProducer(kafka.producer("test-producer", **{"message.max.bytes": 16_000_000}))
    for value, key in messages:
        producer.send(topic, value, key=key)
    producer.confirm()


def read_all(kafka: KafkaConfig, topic: str, partitions: int, expect: int, timeout_s: float = 60.0,
             settle_s: float = 0.5) -> list[Any]:
    """Read a topic from the beginning until ``expect``
    messages arrived (and nothing more shows up)."""
    consumer = kafka.reader(f"test-read-{time.monotonic_ns()}", **{"message.max.bytes": 16_000_000})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expect and time.monotonic() < deadline:
            got += [m for m in consumer.consume(1000, 0.2) if m.error() is None]
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:  # anything beyond the expected count would be a bug
            got += [m for m in consumer.consume(1000, 0.1) if m.error() is None]
    finally:
        consumer.close()
    return got


def mixed_input(spec: PipelineSpec) -> tuple[list[tuple[bytes | None, bytes | None]],
                                             dict[bytes, tuple[str | None, str]], int]:
    """Valid and broken messages; returns them, the
    expected (field, rule) per broken original, #valid."""
    rng = random.Random(7)
    good = [orjson.dumps({"event_id": f"ev-{i}", "features": {**GOOD, "amount": float(i)}})
            for i in range(40)]
    good += [orjson.dumps({"features": {**GOOD, "customer_id": f"cust-{i}"},
                           "ts": "2024-05-01T12:00:00Z"})
             for i in range(10)]
    raw_codec = avro.Codec(spec.raw_schema())
    good.append(raw_codec.encode({"event_id": "avro-1", "key": "k", "ts": 5,
                                  "features": {**GOOD, "device_age_days": 3}}))
    bad: dict[bytes, tuple[str | None, str]] = {
        b'{"features": {"customer_id": "c1", "amount": 1': (None, "json"),
        orjson.dumps({"features": {**GOOD, "amount": "12.5"}}): ("features.amount", "type"),
        orjson.dumps({"features": {k: v for k, v in GOOD.items()
                                   if k != "hour"}}): ("features.hour", "required"),
        orjson.dumps({"features": {**GOOD, "amount": 1.0}}).replace(b"1.0",
                                                                    b"NaN"): ("features.amount",
                                                                              "finite"),
        orjson.dumps({"features": {**GOOD, "amount": 1e9}}): ("features.amount", "range"),
        orjson.dumps({"features": {**GOOD, "country": "XX"}}): ("features.country", "values"),
        orjson.dumps({"features": {**GOOD, "colour": "red"}}): ("features.colour", "unknown_field"),
        orjson.dumps({"features": GOOD, "ts": "noon"}): ("ts", "timestamp"),
        orjson.dumps({"features": GOOD, "event_id": 42}): ("event_id", "type"),
        orjson.dumps([1, 2, 3]): (None, "type"),
        bytes(rng.getrandbits(8) for _ in range(300)).replace(b"\xc3\x01", b"xx"): (None, "json"),
        b'{"features": {"amount": "' + b"x" * 5_000_000 + b'"}}': (None, "size"),
        avro.codec("feedback").encode({"feedback_id": "f", "ts": 1}): (None, "schema"),
        raw_codec.encode({"event_id": "a", "features": {**GOOD, "hour": 99}}): ("features.hour",
                                                                                "range"),
    }
    messages: list[tuple[bytes | None, bytes | None]] = [(v, f"k{i}".encode())
                                                         for i, v in enumerate(good)]
    messages += [(v, b"bad") for v in bad]
    messages.append((None, b"tombstone"))
    rng.shuffle(messages)
    return messages, bad, len(good)


def test_mixed_input_counts_and_every_dead_letter(kafka: KafkaConfig, unique: str,
                                                  running: list[Running]) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    messages, bad, n_good = mixed_input(spec)
    produce(kafka, spec.topics.raw, messages)

    r = Running(kafka, [spec.name], f"{unique}-ingest")
    running.append(r)
    # The tombstone is a deletion, not an event: passed over and counted by the runtime.
    wait_for(lambda: r.metric("loopline_ingest_events_total",
                              pipeline=spec.name) >= len(messages) - 1
             and r.metric("loopline_tombstones_skipped_total", service="ingest",
                          topic=spec.topics.raw) == 1,
             what="all messages handled")
    assert r.health.ready()[0]
    assert r.error is None

    n_bad = len(bad)
    features = read_all(kafka, spec.topics.features, spec.partitions, n_good)
    dead = read_all(kafka, spec.topics.deadletter, spec.partitions, n_bad)
    assert (len(features), len(dead)) == (n_good, n_bad)
    assert len(messages) == len(features) + len(dead) + 1  # + the tombstone

    # Metrics tell the same story, per rule.
    assert r.metric("loopline_ingest_events_total", pipeline=spec.name) == len(messages) - 1
    assert r.metric("loopline_ingest_accepted_total", pipeline=spec.name) == n_good
    expected_rules: dict[str, int] = {}
    for _, rule in bad.values():
        expected_rules[rule] = expected_rules.get(rule, 0) + 1
    for rule, n in expected_rules.items():
        assert r.metric("loopline_ingest_rejected_total", pipeline=spec.name, rule=rule) == n, rule

    # Every dead letter: original bytes untouched, its field and rule, source, key, a reason.
    codec = avro.codec("deadletter")
    seen = set()
    for m in dead:
        d = codec.decode(m.value())
        assert d["service"] == "ingest" and d["message"]
        assert d["source"]["topic"] == spec.topics.raw and d["source_timestamp"] is not None
        headers = dict(m.headers() or [])
        assert headers["loopline.rule"] == d["rule"].encode()
        assert headers["loopline.reason"] == d["message"].encode()
        assert (d["field"], d["rule"]) == bad[d["original"]], d["message"]
        assert d["original_key"] == b"bad" and m.key() == b"bad"
        seen.add(d["original"])
    assert seen == set(bad)

    # Features: producer ids kept, derived ids deterministic, key = producer's or the spec key.
    fcodec = avro.Codec(spec.features_schema())
    decoded = [fcodec.decode(m.value()) for m in features]
    by_id = {f["event_id"]: f for f in decoded}
    assert {f"ev-{i}" for i in range(40)} | {"avro-1"} <= set(by_id)
    for f in decoded:
        src = f["source"]
        if not f["event_id"].startswith(("ev-", "avro-")):
            assert f["event_id"] == derived_event_id(src["topic"], src["partition"], src["offset"])
            assert f["key"].startswith("cust-") and f["ts"] == 1714564800000
    assert by_id["avro-1"]["key"] == "k" and by_id["avro-1"]["features"]["device_age_days"] == 3
    assert by_id["ev-0"]["key"] == "c1"  # the spec's key feature
    r.close()


def test_restart_reprocesses_unacknowledged_input_with_same_ids(kafka: KafkaConfig, unique: str,
                                                               running: list[Running]) -> None:
    spec = make_spec(unique, partitions=1)
    apply_spec(kafka, spec)
    total = 1000
    produce(kafka, spec.topics.raw, [(orjson.dumps({"features": {**GOOD, "hour": i % 24}}), None)
                                     for i in range(total)])
    group = f"{unique}-ingest"
    first = Running(kafka, [spec.name], group, delivery=failing_delivery(3))
    running.append(first)
    first.thread.join(60)
    # it stopped mid-way, batch 3 produced but not committed
    assert isinstance(first.error, DeliveryError)

    second = Running(kafka, [spec.name], group)
    running.append(second)
    wait_for(lambda: second.metric("loopline_ingest_events_total", pipeline=spec.name) > 0
             and read_count(kafka, spec) >= total, what="second run catches up")
    second.close()

    fcodec = avro.Codec(spec.features_schema())
    out = [fcodec.decode(m.value()) for m in read_all(kafka, spec.topics.features, 1, total + 200)]
    ids_by_offset: dict[int, set[str]] = {}
    for f in out:
        ids_by_offset.setdefault(f["source"]["offset"], set()).add(f["event_id"])
    assert sorted(ids_by_offset) == list(range(total))  # nothing lost
    assert all(len(ids) == 1 for ids in ids_by_offset.values())  # a re-read keeps the id
    if kafka.exactly_once:  # the uncommitted batch was aborted: read_committed readers never saw it
        assert len(out) == total
    else:  # the unacknowledged batch really was processed twice, with the same ids
        assert len(out) > total


def read_count(kafka: KafkaConfig, spec: PipelineSpec) -> int:
    consumer = kafka.reader(f"test-count-{time.monotonic_ns()}")
    try:
        return sum(consumer.get_watermark_offsets(TopicPartition(spec.topics.features, p),
                                                  timeout=10)[1]
                   for p in range(spec.partitions))
    finally:
        consumer.close()


def test_pipeline_applied_later_is_picked_up_and_drop_policy_counts(kafka: KafkaConfig, unique: str,
                                                                   running: list[Running]) -> None:
    first = make_spec(f"{unique}a", partitions=1)
    later = make_spec(f"{unique}b", partitions=1, unknown_fields="drop")
    apply_spec(kafka, first)
    r = Running(kafka, [first.name, later.name], f"{unique}-ingest")
    running.append(r)
    wait_for(lambda: r.health.ready()[0], what="ready once subscribed")
    assert later.name in r.health.ready()[1]  # says what it still waits for

    apply_spec(kafka, later)
    produce(kafka, later.topics.raw,
            [(orjson.dumps({"features": {**GOOD, "colour": "red"}, "x": 1}), None)])
    wait_for(lambda: r.metric("loopline_ingest_accepted_total", pipeline=later.name) == 1,
             what="event of the later pipeline accepted")
    assert r.metric("loopline_ingest_dropped_fields_total", pipeline=later.name) == 2
    got = read_all(kafka, later.topics.features, 1, 1)
    assert len(got) == 1
    r.close()


def test_oversized_dead_letter_is_truncated_not_lost(kafka: KafkaConfig, unique: str,
                                                     running: list[Running]) -> None:
    spec = make_spec(unique, partitions=1)
    apply_spec(kafka, spec)
    # 520 kB: over the 100 kB limit below
    big = b'{"features": "' + bytes(range(65, 91)) * 20_000 + b'"}'
    produce(kafka, spec.topics.raw, [(big, b"k")])
    r = Running(kafka, [spec.name], f"{unique}-ingest", deadletter_max_bytes=100_000)
    running.append(r)
    wait_for(lambda: r.metric("loopline_ingest_events_total", pipeline=spec.name) == 1,
             what="handled")
    (m,) = read_all(kafka, spec.topics.deadletter, 1, 1)
    d = avro.codec("deadletter").decode(m.value())
    assert len(m.value()) <= 100_000 and big.startswith(d["original"])
    assert len(d["original"]) > 50_000
    assert d["rule"] == "type" and f"of {len(big)} bytes" in d["message"]
    assert "sha256" in d["message"]
    assert r.metric("loopline_ingest_deadletter_truncated_total", pipeline=spec.name) == 1
    r.close()


def test_loopline_run_ingest_process(kafka: KafkaConfig, unique: str, tmp_path: Path) -> None:
    spec = make_spec(unique, partitions=1)
    apply_spec(kafka, spec)
    port = free_port()
    env = {**os.environ, "LOOPLINE_BOOTSTRAP_SERVERS": kafka.settings.bootstrap_servers or "",
           "LOOPLINE_KAFKA_PROFILE": kafka.settings.kafka_profile, "LOOPLINE_PIPELINES": spec.name,
           "LOOPLINE_METRICS_PORT": str(port), "LOOPLINE_SESSION_TIMEOUT_MS": "6000",
           "LOOPLINE_GROUP_ID": f"{unique}-ingest", "LOOPLINE_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "run", "ingest"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    try:
        wait_for(lambda: get("/readyz")[0] == 200, what="/readyz 200")
        produce(kafka, spec.topics.raw,
                [(orjson.dumps({"features": GOOD}), None), (b"{oops", None)])
        line = f'loopline_ingest_events_total{{pipeline="{spec.name}"}} 2.0'
        wait_for(lambda: line in get("/metrics")[1], what="metrics count both messages")
        text = get("/metrics")[1]
        assert f'loopline_ingest_accepted_total{{pipeline="{spec.name}"}} 1.0' in text
        assert f'loopline_ingest_rejected_total{{pipeline="{spec.name}",rule="json"}} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]


def test_replicas_share_the_partitions(kafka: KafkaConfig, unique: str,
                                       running: list[Running]) -> None:
    spec = make_spec(unique, partitions=3)
    apply_spec(kafka, spec)
    group = f"{unique}-ingest"
    replicas = [Running(kafka, [spec.name], group), Running(kafka, [spec.name], group)]
    running.extend(replicas)

    def assigned() -> list[int]:
        sizes = []
        for r in replicas:
            consumer = r.service._consumer
            sizes.append(len(consumer.assignment()) if consumer is not None else 0)
        return sizes

    # A two-member cooperative rebalance takes ~40 s on the embedded broker (Tansu).
    wait_for(lambda: sum(assigned()) == 3 and min(assigned()) > 0, timeout_s=120,
             what="both replicas assigned")
    total = 600
    produce(kafka, spec.topics.raw, [(orjson.dumps({"features": {**GOOD, "customer_id": f"c{i}"}}),
                                      f"k{i}".encode()) for i in range(total)])

    def handled() -> list[float]:
        return [r.metric("loopline_ingest_events_total", pipeline=spec.name) for r in replicas]

    wait_for(lambda: sum(handled()) >= total, what="both replicas together handle every message")
    assert min(handled()) > 0  # the work really was shared
    assert sum(handled()) == total
    assert len(read_all(kafka, spec.topics.features, 3, total, timeout_s=120)) == total
    for r in replicas:
        r.close()
