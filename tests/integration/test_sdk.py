"""SDK and CLI tools on the real broker: local validation,
produce from files, tail, feedback, reading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from loopline import avro, feedback
from loopline.app.tools import decoder, tail
from loopline.apply import apply_spec
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.sdk import EventProducer, FeedbackSender, PredictionReader, ValidationError
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def spec_for(name: str) -> PipelineSpec:
    return parse_spec({"name": name, "key": "user", "partitions": 2,
                       "label": {"classes": ["no", "yes"]},
                       "features": [{"name": "user", "type": "string"},
                                    {"name": "amount", "type": "float", "min": 0}]})


def read_all(kafka: KafkaConfig, topic: str, kind: str, spec: PipelineSpec,
             n: int) -> list[dict]:  # type: ignore[type-arg]  # any records
    out: list[dict] = []  # type: ignore[type-arg]  # any records
    tail(kafka, topic, decoder(kind, spec, _state(kafka)), True, n, lambda: False, out.append)
    return out


def _state(kafka: KafkaConfig):  # type: ignore[no-untyped-def]  # the registry's state
    from loopline.registry import RegistryReader

    reader = RegistryReader(kafka)
    try:
        return reader.catch_up()
    finally:
        reader.close()


def test_producer_validates_locally_and_publishes(settings: LooplineSettings, kafka: KafkaConfig,
                                                  unique: str) -> None:
    spec = spec_for(unique)
    apply_spec(kafka, spec)
    with EventProducer(unique, settings) as producer:
        with pytest.raises(ValidationError) as info:
            producer.publish({"user": "u1", "amount": -5.0})
        assert (info.value.field, info.value.rule) == ("features.amount", "range")
        with pytest.raises(ValidationError, match="required"):
            producer.publish({"amount": 1.0})
        producer.publish({"user": "u1", "amount": 3.5}, event_id="e1")
    (message,) = read_all(kafka, spec.topics.raw, "raw", spec, 1)
    assert message["value"] == {"features": {"user": "u1", "amount": 3.5}, "event_id": "e1"}
    assert message["key"] == "u1"


def test_feedback_sender_and_prediction_reader(settings: LooplineSettings, kafka: KafkaConfig,
                                               unique: str) -> None:
    spec = spec_for(unique)
    apply_spec(kafka, spec)
    with FeedbackSender(unique, settings) as sender:
        with pytest.raises(ValidationError, match="label"):
            sender.send(prediction_id="p1", label="maybe")
        fid = sender.send(prediction_id="p1", label="yes")
    (fb,) = read_all(kafka, spec.topics.feedback, "feedback", spec, 1)
    assert fb["value"]["feedback_id"] == fid and fb["value"]["label"] == "yes"

    producer = AckedProducer(kafka.producer("test"))
    codec = avro.codec("prediction")
    for i in [*range(6), 0, 2]:  # p0 and p2 again, as a service retrying a batch re-produces them
        producer.send(spec.topics.predictions, codec.encode({
            "prediction_id": f"p{i}", "event_id": f"e{i // 2}", "key": None, "pipeline": unique,
            "model_name": "m", "model_version": 1, "model_sha256": "0" * 64,
            "variant": "champion" if i % 2 == 0 else "shadow", "served": i % 2 == 0, "label": "yes",
            "value": 0.9, "scores": {},
            "source": {"topic": spec.topics.features, "partition": 0, "offset": i},
            "event_ts": 1, "scored_at": 2}))
    producer.confirm()
    reader = PredictionReader(unique, f"{unique}-reader", settings=settings)
    got: list[dict] = []  # type: ignore[type-arg]  # any records
    for _ in range(40):
        batch = reader.poll()
        got += batch
        if len(got) >= 3 and not batch:  # drained: a fetch may split the 8 messages (Kafka)
            break
    reader.close()
    assert sorted(p["prediction_id"] for p in got) == ["p0", "p2", "p4"]
    again = PredictionReader(unique, f"{unique}-reader", settings=settings, poll_timeout_s=0.5)
    leftovers = [p for _ in range(12) for p in again.poll()]
    again.close()
    assert leftovers == []  # handled batches are committed on close


def test_cli_produce_tail_and_feedback(settings: LooplineSettings, kafka: KafkaConfig,
                                       tmp_path: Path, unique: str) -> None:
    spec = spec_for(unique)
    apply_spec(kafka, spec)
    csv_file = tmp_path / "events.csv"
    csv_file.write_text("user,amount,event_id\nu1,1.5,a\nu2,oops,b\nu3,,c\n")
    env = dict(os.environ, LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
               LOOPLINE_KAFKA_PROFILE=settings.kafka_profile)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loopline.app.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    produced = cli("produce", unique, str(csv_file), "--rate", "100")
    assert produced.returncode == 0, produced.stderr
    assert "3 events sent" in produced.stdout
    tailed = cli("tail", unique, "--topic", "raw", "--from-beginning", "-n", "3")
    assert tailed.returncode == 0, tailed.stderr
    values = sorted((orjson.loads(line)["value"] for line in tailed.stdout.splitlines()),
                    key=lambda v: v["event_id"])
    # Typed as the spec says where it parses; left as text for ingest to dead-letter where it does
    # not.
    assert [v["features"] for v in values] == [{"user": "u1", "amount": 1.5},
                                               {"user": "u2", "amount": "oops"}, {"user": "u3"}]
    sent = cli("feedback", unique, "--event-id", "a", "--verdict", "accept")
    assert sent.returncode == 0, sent.stderr
    bad = cli("feedback", unique, "--event-id", "a", "--label", "perhaps")
    assert bad.returncode == 2 and "label" in bad.stderr and "Traceback" not in bad.stderr
    (fb,) = read_all(kafka, spec.topics.feedback, "feedback", spec, 1)
    assert fb["value"]["verdict"] == "accept"
    assert feedback.check(fb["value"])


def test_clients_find_the_broker_as_the_docs_show_and_close(
        settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_spec({"name": unique, "label": {"name": "is_fraud", "classes": ["0", "1"]},
                       "features": [{"name": "amount", "type": "float"}]})
    apply_spec(kafka, spec)
    # As the README and the SDK docstring write them: no settings argument, LOOPLINE_* variables.
    monkeypatch.setenv("LOOPLINE_BOOTSTRAP_SERVERS", settings.bootstrap_servers or "")
    monkeypatch.setenv("LOOPLINE_KAFKA_PROFILE", settings.kafka_profile)
    with FeedbackSender(unique) as fb:
        fb.send(event_id="e1", label="1")
    assert fb._closed
    with pytest.raises(ValidationError), FeedbackSender(unique) as failing:
        failing.send(event_id="e2", label="maybe")
    assert failing._closed  # closed (queue dropped) on the way out of the error too
    with EventProducer(unique) as events:
        events.publish({"amount": 3.0}, event_id="e3")
    with PredictionReader(unique, group_id=f"{unique}-g", poll_timeout_s=0.2) as reader:
        assert reader.poll() == []
    assert reader._closed
    # feedback --file: the label column is named like the spec's label.
    labels = tmp_path / "labels.csv"
    labels.write_text("event_id,is_fraud\ne4,0\ne5,1\n")
    sent = subprocess.run([sys.executable, "-m", "loopline.app.cli", "feedback", unique,
                           "--file", str(labels)], env=dict(os.environ), capture_output=True,
                          text=True, timeout=120)
    assert sent.returncode == 0 and "2 feedback message(s) sent" in sent.stdout, sent.stderr
    got = read_all(kafka, spec.topics.feedback, "feedback", spec, 3)
    assert sorted((m["value"]["event_id"], m["value"]["label"]) for m in got) == [
        ("e1", "1"), ("e4", "0"), ("e5", "1")]
