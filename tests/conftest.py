"""Shared fixtures: one real broker per test session, unique names per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loopline.broker import EmbeddedBroker
from loopline.kafka import KafkaConfig, TopicSpec, ensure_topics
from loopline.settings import LooplineSettings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def broker_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LOOPLINE_HOME of the session broker."""
    return tmp_path_factory.mktemp("loopline-home")


@pytest.fixture(scope="session")
def bootstrap_servers(broker_home: Path) -> Iterator[str]:
    """The session's broker: LOOPLINE_TEST_BOOTSTRAP_SERVERS if set, else the embedded one."""
    external = os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with EmbeddedBroker(home=broker_home) as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def settings(bootstrap_servers: str, broker_home: Path) -> LooplineSettings:
    """Settings pointing at the session broker, with a short session timeout for fast joins."""
    profile = "kafka" if os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS") else "embedded"
    return LooplineSettings(bootstrap_servers=bootstrap_servers, kafka_profile=profile,
                            session_timeout_ms=6000, home=broker_home)


@pytest.fixture(scope="session")
def kafka(settings: LooplineSettings) -> KafkaConfig:
    """Client factory for the session broker."""
    return KafkaConfig.from_settings(settings)


@pytest.fixture
def unique() -> str:
    """A short name no other test uses (for pipelines, topics and groups)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def make_topic(kafka: KafkaConfig, unique: str):  # type: ignore[no-untyped-def]
    """Factory: create a fresh topic for this test and return its name."""
    counter = iter(range(1000))

    def make(partitions: int = 1) -> str:
        name = f"test.{unique}.{next(counter)}"
        ensure_topics(kafka.admin(), [TopicSpec(name, partitions)])
        return name

    return make
