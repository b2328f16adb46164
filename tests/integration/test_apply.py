"""`loopline apply`: validation, topics, registry publication, safe evolution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loopline import avro
from loopline.apply import apply_spec
from loopline.errors import SpecError
from loopline.kafka import KafkaConfig
from loopline.registry import RegistryReader
from loopline.settings import LooplineSettings
from loopline.spec import parse_spec

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud.yaml"


def cli(settings: LooplineSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
               LOOPLINE_KAFKA_PROFILE=settings.kafka_profile)
    return subprocess.run([sys.executable, "-m", "loopline.app.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def spec_file(tmp_path: Path, name: str, **changes: object) -> Path:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(name=name, **changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_apply_creates_topics_and_publishes_once(settings: LooplineSettings, kafka: KafkaConfig,
                                                 tmp_path: Path, unique: str) -> None:
    path = spec_file(tmp_path, unique)
    first = cli(settings, "apply", str(path))
    assert first.returncode == 0, first.stderr
    assert "spec published" in first.stdout
    topics = kafka.admin().list_topics(timeout=10).topics
    for kind in ("raw", "features", "predictions", "feedback", "deadletter"):
        assert len(topics[f"loopline.{unique}.{kind}"].partitions) == 3
    second = cli(settings, "apply", str(path))
    assert second.returncode == 0 and "unchanged" in second.stdout

    reader = RegistryReader(kafka)
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    assert state.specs[unique].features[1].name == "amount"
    assert state.spec_events[unique]["spec"]["spec_sha256"] == state.specs[unique].sha256()


def test_bad_spec_gives_one_clear_error_and_changes_nothing(settings: LooplineSettings,
                                                            kafka: KafkaConfig,
                                                           tmp_path: Path, unique: str) -> None:
    path = spec_file(tmp_path, unique, partitions=0, bogus=True)
    result = cli(settings, "apply", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "partitions" in result.stderr and "greater_than_equal" in result.stderr
    assert "bogus" in result.stderr and "extra_forbidden" in result.stderr
    assert f"loopline.{unique}.raw" not in kafka.admin().list_topics(timeout=10).topics


def test_incompatible_evolution_is_refused(kafka: KafkaConfig, unique: str) -> None:
    base = {"name": unique, "features": [{"name": "x", "type": "float"}]}
    apply_spec(kafka, parse_spec(base))
    added_optional = {**base, "features": [*base["features"],
                                           {"name": "y", "type": "int", "required": False}]}
    assert apply_spec(kafka, parse_spec(added_optional)).published
    added_required = {**base,
                      "features": [*added_optional["features"], {"name": "z", "type": "int"}]}
    with pytest.raises(SpecError, match="backward_compatible"):
        apply_spec(kafka, parse_spec(added_required))

    # Both spec versions stay in the registry, so events written under the first still decode.
    reader = RegistryReader(kafka)
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    assert len(state.features_schemas[unique]) == 2
    old_event = {"event_id": "e1", "key": None, "ts": 1, "ingested_at": 1,
                 "source": {"topic": "raw", "partition": 0, "offset": 0}, "features": {"x": 1.5}}
    old_bytes = avro.Codec(parse_spec(base).features_schema()).encode(old_event)
    decoded = state.features_codec(unique).decode(old_bytes)
    assert decoded["features"] == {"x": 1.5, "y": None}


def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env["LOOPLINE_HOME"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "loopline.app.cli", "apply", str(EXAMPLE)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no Kafka broker" in result.stderr and "loopline broker" in result.stderr


def test_catch_up_reads_a_whole_last_batch(kafka: KafkaConfig, unique: str) -> None:
    # Tansu's high watermark is the last batch's base offset + 1: reading up to it alone would miss
    # the rest of a batch, such as a registration published with its stage changes.
    from loopline.kafka import AckedProducer
    from loopline.registry import spec_event

    producer = AckedProducer(kafka.producer("test-batch"))
    names = [f"{unique}{i}" for i in range(3)]
    for name in names:
        key, event = spec_event(parse_spec({"name": name,
                                            "features": [{"name": "x", "type": "float"}]}))
        producer.send("loopline.models", avro.codec("registry").encode(event), key=key)
    producer.confirm()
    reader = RegistryReader(kafka)
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    assert set(names) <= set(state.specs)
