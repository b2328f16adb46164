"""Nothing lost, whoever writes (issue 14): JSON and Avro feedback stored, bad feedback
dead-lettered once with its reason, event ids as idempotency keys, and a broker that restarts
empty."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition
from services_harness import ServiceThread, wait_until

from loopline import avro, feedback
from loopline.apply import apply_spec
from loopline.broker import EmbeddedBroker
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.registry import now_ms
from loopline.services.ingest.settings import IngestSettings
from loopline.services.lineage import query as q
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "partitions": 2, "key": "user",
                       "features": [{"name": "user", "type": "string"},
                                    {"name": "x", "type": "float"}],
                       "label": {"task": "classification", "classes": ["0", "1"]}})


def lineage(settings: LooplineSettings, home: Path, pipeline: str, group: str) -> ServiceThread:
    return ServiceThread("lineage", LineageSettings(
        bootstrap_servers=settings.bootstrap_servers, kafka_profile=settings.kafka_profile,
        home=home, session_timeout_ms=6000, pipelines=[pipeline], group_id=group, instance_id=group,
        flush_rows=50, flush_interval_s=0.3, batch_size=100))


def read(kafka: KafkaConfig, topic: str, partitions: int, expect: int, timeout_s: float = 60.0,
         settle_s: float = 1.0) -> list[Any]:
    consumer = kafka.reader(f"test-read-{time.monotonic_ns()}")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    got: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(got) < expect and time.monotonic() < deadline:
            got += [m for m in consumer.consume(500, 0.2) if m.error() is None]
        settle = time.monotonic() + settle_s
        while time.monotonic() < settle:
            got += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return got


def stored(home: Path, pipeline: str, sql: str) -> list[tuple[Any, ...]]:
    store = LineageStore(home / "lineage")
    if pipeline not in store.pipelines():
        return []
    con = q.connect(store, pipeline)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_json_and_avro_feedback_are_stored_and_bad_feedback_is_dead_lettered_once(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    # any client, no Loopline code
    plain = Producer({"bootstrap.servers": settings.bootstrap_servers})
    good_json = [orjson.dumps({"prediction_id": f"p{i}", "label": str(i % 2)}) for i in range(20)]
    good_json += [orjson.dumps({"event_id": f"e{i}", "verdict": "reject"}) for i in range(10)]
    good_json += [orjson.dumps({"event_id": f"e{i}", "label": 1, "feedback_id": f"num{i}"})
                  for i in range(5)]
    good_avro = [feedback.encode(feedback.make(prediction_id=f"q{i}", label="1",
                                               feedback_id=f"a{i}"))
                 for i in range(10)]
    bad = {  # value -> (field, rule)
        b'{"event_id": "e1", "verdict": "nuke"}': ("verdict", "values"),
        b'{"event_id": "e1", "label": "7"}': ("label", "values"),
        b'{"event_id": "e1", "value": NaN}': (None, "json"),
        b'{"event_id": "e1", "label": "1", "colour": "red"}': ("colour", "unknown_field"),
        b"": (None, "empty"),
        b'{"event_id": "e1", "label": "' + b"x" * 800_000 + b'"}': (None, "size"),
        avro.codec("feedback").encode({"feedback_id": "f", "prediction_id": "p", "event_id": None,
                                       "label": "9", "value": None, "verdict": None,
                                       "ts": 1}): ("label", "values"),
    }
    for value in [*good_json, *good_avro, *bad]:
        plain.produce(spec.topics.feedback, value)
    plain.produce(spec.topics.feedback, None, key=b"tombstone")  # a tombstone: null value
    assert plain.flush(30) == 0
    service = lineage(settings, tmp_path, unique, f"{unique}-lineage")
    try:
        wait_until(lambda: stored(tmp_path, unique, "SELECT count(*) FROM feedback") == [(45,)], 90,
                   "every valid feedback stored")
        letters = read(kafka, spec.topics.deadletter, spec.partitions, len(bad) + 1)
    finally:
        service.close()
    decoded = [avro.codec("deadletter").decode(m.value()) for m in letters]
    assert len(decoded) == len(bad) + 1, "exactly one dead letter per bad message"
    reasons = Counter((d["original"], d["field"], d["rule"]) for d in decoded)
    expected = Counter((value, field, rule) for value, (field, rule) in bad.items())
    expected[(b"", None, "tombstone")] += 1  # a tombstone has no bytes to keep
    assert reasons == expected, [(v[:60], f, r) for v, f, r in reasons - expected]
    assert all(d["service"] == "lineage" and len(d["message"]) < 2_000 for d in decoded)
    labels = dict(stored(tmp_path, unique,
                         "SELECT feedback_id, label FROM feedback WHERE feedback_id LIKE 'num%'"))
    # a JSON number label is a class name all the same
    assert labels == {f"num{i}": "1" for i in range(5)}
    chain = stored(tmp_path, unique, "SELECT count(*) FROM feedback WHERE verdict = 'reject'")
    assert chain == [(10,)]


def test_tombstones_on_event_topics_are_deletions_counted_not_dead_letters(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path) -> None:
    """`lineage forget` (or any compacting client) writes null values on raw and features: no
    events."""
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    plain = Producer({"bootstrap.servers": settings.bootstrap_servers})
    plain.produce(spec.topics.raw,
                  orjson.dumps({"event_id": "e0", "features": {"user": "u", "x": 1.0}}), key=b"u")
    plain.produce(spec.topics.raw, None, key=b"u")
    plain.produce(spec.topics.raw,
                  orjson.dumps({"event_id": "e1", "features": {"user": "u", "x": 2.0}}), key=b"u")
    plain.produce(spec.topics.features, None, key=b"u")
    assert plain.flush(30) == 0
    ingest = ServiceThread("ingest", IngestSettings(
        bootstrap_servers=settings.bootstrap_servers, kafka_profile=settings.kafka_profile,
        home=tmp_path, session_timeout_ms=6000, pipelines=[spec.name], group_id=f"{unique}-ingest",
        instance_id=unique))
    service = lineage(settings, tmp_path, unique, f"{unique}-lineage")
    try:
        wait_until(lambda: ingest.metric("loopline_ingest_accepted_total", pipeline=spec.name) == 2,
                   90, "both events accepted")
        wait_until(lambda: stored(tmp_path, unique, "SELECT count(*) FROM features") == [(2,)], 90,
                   "both feature events stored")
        assert ingest.metric("loopline_tombstones_skipped_total", topic=spec.topics.raw) == 1
        assert service.metric("loopline_tombstones_skipped_total", topic=spec.topics.features) == 1
        assert ingest.metric("loopline_poison_messages_total") == 0
    finally:
        service.close()
        ingest.close()
    assert read(kafka, spec.topics.deadletter, spec.partitions, expect=0, timeout_s=0) == []


def test_event_ids_are_idempotency_keys(settings: LooplineSettings, kafka: KafkaConfig, unique: str,
                                        tmp_path: Path) -> None:
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    raw = AckedProducer(kafka.producer("test-raw"))

    def send(event_id: str, x: float, user: str = "u1") -> None:
        raw.send(spec.topics.raw,
                 orjson.dumps({"event_id": event_id, "features": {"user": user, "x": x}}), key=user)

    for i in range(30):
        send(f"e{i}", float(i))
    raw.confirm()
    ingest = ServiceThread("ingest", IngestSettings(
        bootstrap_servers=settings.bootstrap_servers, kafka_profile=settings.kafka_profile,
        home=tmp_path, session_timeout_ms=6000, pipelines=[spec.name], group_id=f"{unique}-ingest",
        instance_id=unique))
    try:
        wait_until(lambda: ingest.metric("loopline_ingest_accepted_total",
                                         pipeline=spec.name) == 30, 90,
                   "first sends accepted")
        for i in range(10):
            send(f"e{i}", float(i))  # the same event again: a duplicate
        for i in range(10, 13):
            send(f"e{i}", 100.0 + i)  # the same id, other content: a conflict
        raw.confirm()
        wait_until(lambda: ingest.metric("loopline_ingest_events_total", pipeline=spec.name) == 43,
                   60, "resends handled")
        assert ingest.metric("loopline_ingest_duplicates_total", pipeline=spec.name) == 10
        assert ingest.metric("loopline_ingest_rejected_total", pipeline=spec.name,
                             rule="conflict") == 3
    finally:
        ingest.close()
    features = read(kafka, spec.topics.features, spec.partitions, 30)
    codec = avro.Codec(spec.features_schema())
    ids = Counter(codec.decode(m.value())["event_id"] for m in features)
    assert ids == {f"e{i}": 1
                   for i in range(30)}, "duplicates and conflicts never reach the features topic"
    letters = [avro.codec("deadletter").decode(m.value())
               for m in read(kafka, spec.topics.deadletter, spec.partitions, 3)]
    assert sorted(orjson.loads(d["original"])["features"]["x"]
                  for d in letters) == [110.0, 111.0, 112.0]
    for d in letters:
        assert d["rule"] == "conflict" and d["field"] == "event_id"
        assert "already accepted with other content" in d["message"] and "offset" in d["message"]


def test_a_broker_that_restarts_empty_is_not_mistaken_for_the_stored_one(tmp_path: Path,
                                                                         unique: str) -> None:
    """Lineage keyed by topic incarnation: after the embedded broker restarts empty, with the same
    LOOPLINE_HOME (as `loopline up` after a crash), every new event is stored, none skipped."""
    home = tmp_path / "home"
    spec = make_spec(unique)
    counts = []
    for round_ in range(2):
        with EmbeddedBroker(home=tmp_path / f"broker{round_}") as broker:
            settings = LooplineSettings(bootstrap_servers=broker.bootstrap_servers,
                                        kafka_profile="embedded",
                                        session_timeout_ms=6000, home=home)
            kafka = KafkaConfig.from_settings(settings)
            apply_spec(kafka, spec)
            codec = avro.Codec(spec.features_schema())
            producer = AckedProducer(kafka.producer("test-features"))
            for i in range(60):
                event_id = f"r{round_}-e{i}"
                producer.send(spec.topics.features, codec.encode({
                    "event_id": event_id, "key": "u", "ts": now_ms(), "ingested_at": now_ms(),
                    "source": {"topic": spec.topics.raw, "partition": 0, "offset": i},
                    "features": {"user": "u", "x": float(i)}, "content_hash": None}), key=b"u")
            producer.confirm()
            service = lineage(settings, home, spec.name, f"{unique}-lineage")
            try:
                expected = 60 * (round_ + 1)
                wait_until(lambda n=expected: stored(home, spec.name,
                                                     "SELECT count(*) FROM features") == [(n,)],
                           90, f"round {round_}: every event stored")
            finally:
                service.close()
            counts.append(stored(home, spec.name,
                                 "SELECT count(DISTINCT event_id) FROM features")[0][0])
    assert counts == [60, 120]
    skipped = stored(home, spec.name, "SELECT count(*) FROM features WHERE event_id LIKE 'r1-%'")
    assert skipped == [(60,)], "the new broker's offsets 0..59 were not taken for the stored ones"


@pytest.mark.only_kafka
def test_status_lag_is_exact_on_kafka(settings: LooplineSettings, kafka: KafkaConfig, unique: str,
                                      tmp_path: Path) -> None:
    """Kafka's high watermarks are exact (Tansu's are a batch's base offset + 1): lag to the
    event."""
    from loopline.app.status import collect
    from loopline.registry import RegistryReader

    spec = make_spec(unique)
    apply_spec(kafka, spec)
    raw = AckedProducer(kafka.producer("test-raw"))

    def send(start: int, n: int) -> None:
        for i in range(start, start + n):
            event = {"event_id": f"e{i}", "features": {"user": f"u{i % 5}", "x": float(i)}}
            raw.send(spec.topics.raw, orjson.dumps(event))
        raw.confirm()

    def lag() -> dict[str, int | None]:
        reader = RegistryReader(kafka, client_id="test-status")
        try:
            (status,) = collect(kafka, reader.catch_up(), [spec.name], sample_s=0.1)
        finally:
            reader.close()
        return status.lag

    send(0, 100)
    ingest = ServiceThread("ingest", IngestSettings(  # the default group, as status reads it
        bootstrap_servers=settings.bootstrap_servers, kafka_profile=settings.kafka_profile,
        home=tmp_path, session_timeout_ms=6000, pipelines=[spec.name], instance_id=unique))
    try:
        wait_until(lambda: lag()["ingest"] == 0, 90, "ingest committed all 100 events")
    finally:
        ingest.close()
    send(100, 37)
    assert lag()["ingest"] == 37
