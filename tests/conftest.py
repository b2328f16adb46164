"""Shared fixtures: one real broker per test session (per xdist worker), unique names per test.

The session broker is chosen by environment variables:

- ``LOOPLINE_TEST_BOOTSTRAP_SERVERS``: an external cluster (Apache Kafka or compatible);
- else ``LOOPLINE_TEST_ENGINE``: ``tansu`` (default, `make test`) or ``kafka`` (`make
  test-kafka`), started here on a free loopback port and stopped at the end.
"""

from __future__ import annotations

import gc
import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from loopline.brokers import Engine, make_broker
from loopline.kafka import KafkaConfig, TopicSpec, ensure_topics
from loopline.settings import LooplineSettings

REPO = Path(__file__).resolve().parent.parent

# pytest-xdist's workers inherit COLUMNS=80 from execnet; the CLI's output is captured here,
# never a terminal, and must be tested as a pipe sees it (whole lines, no 80-column cut).
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


def _engine() -> Engine:
    value = os.environ.get("LOOPLINE_TEST_ENGINE", "tansu")
    if value not in ("tansu", "kafka"):
        raise pytest.UsageError(f"LOOPLINE_TEST_ENGINE={value!r}: choose tansu or kafka")
    return value  # type: ignore[return-value]  # checked just above


def pytest_report_header(config: pytest.Config) -> str:
    """Say which broker the session runs against."""
    external = os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS")
    return f"loopline broker: {f'external cluster {external}' if external else _engine()}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests of what only Apache Kafka offers (marked ``only_kafka``) run in `make test-kafka`."""
    if os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS") or _engine() == "kafka":
        return
    keep = [i for i in items if i.get_closest_marker("only_kafka") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The engine of the session broker: tansu or kafka (an external cluster counts as kafka)."""
    return "kafka" if os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS") else _engine()


@pytest.fixture(scope="session")
def broker_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LOOPLINE_HOME of the session broker."""
    return tmp_path_factory.mktemp("loopline-home")


#: Kafka clients the tests left open, closed before the session broker stopped (by kind).
_LEFT_OPEN: Counter[str] = Counter()


def close_open_clients() -> Counter[str]:
    """Close every producer and consumer still open; how many of each kind there were.

    A client nobody closed (a test's helper, an object kept alive by a callback cycle) keeps
    reconnecting once the broker is gone, and librdkafka prints `Connection refused` after the
    test summary. Closed here, while the broker still answers, it goes quietly.
    """
    found: Counter[str] = Counter()
    gc.collect()
    for client in [o for o in gc.get_objects() if isinstance(o, (Producer, Consumer))]:
        try:
            _close(client)
        except RuntimeError:  # closed already: "Producer has been closed", "Consumer closed"
            continue
        found[type(client).__name__] += 1
    return found


def _close(client: Any) -> None:
    if isinstance(client, Producer):
        client.poll(0)  # raises RuntimeError when closed
        client.purge()
        client.close()
    else:
        client.assignment()  # raises RuntimeError when closed
        client.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say which Kafka clients the tests left open (they were closed before the broker stopped)."""
    if _LEFT_OPEN:
        counts = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(_LEFT_OPEN.items()))
        terminalreporter.write_line(f"loopline: closed Kafka clients the tests left open: {counts}")


@pytest.fixture(scope="session")
def bootstrap_servers(broker_home: Path) -> Iterator[str]:
    """The session's broker: LOOPLINE_TEST_BOOTSTRAP_SERVERS if set, else one of our engines."""
    external = os.environ.get("LOOPLINE_TEST_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    # Progress (the first Maven fetch of Kafka) goes to the real terminal: pytest captures
    # the rest, and a silent minute would look like a hang.
    with make_broker(_engine(), broker_home,
                     progress=lambda line: print(line, file=sys.__stderr__, flush=True)) as broker:
        try:
            yield broker.bootstrap_servers
        finally:
            _LEFT_OPEN.update(close_open_clients())


@pytest.fixture(scope="session")
def settings(bootstrap_servers: str, broker_home: Path, engine: Engine) -> LooplineSettings:
    """Settings pointing at the session broker, with a short session timeout for fast joins."""
    return LooplineSettings(bootstrap_servers=bootstrap_servers,
                            kafka_profile="embedded" if engine == "tansu" else "kafka",
                            session_timeout_ms=6000, home=broker_home, engine=engine)


@pytest.fixture(scope="session")
def kafka(settings: LooplineSettings) -> KafkaConfig:
    """Client factory for the session broker."""
    return KafkaConfig.from_settings(settings)


@pytest.fixture
def unique() -> str:
    """A short name no other test uses (for pipelines, topics and groups)."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def make_topic(kafka: KafkaConfig, unique: str):  # type: ignore[no-untyped-def]  # returns a factory
    """Factory: create a fresh topic for this test and return its name."""
    counter = iter(range(1000))

    def make(partitions: int = 1) -> str:
        name = f"test.{unique}.{next(counter)}"
        ensure_topics(kafka.admin(), [TopicSpec(name, partitions)])
        return name

    return make
