"""What the broker-bound benchmarks share: ``--engine``, starting that broker, client settings.

Every benchmark that needs a broker starts its own (``tansu``: the embedded default, memory
storage; ``kafka``: Apache Kafka from Maven, durable in a temporary LOOPLINE_HOME) and tunes its
clients with that engine's profile, exactly as the services would (``LOOPLINE_KAFKA_PROFILE``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopline.brokers import ENGINES, Engine, make_broker
from loopline.kafka import KafkaConfig
from loopline.settings import LooplineSettings

#: Short enough that a restarted service rejoins quickly; Kafka's own minimum is 6 s.
SESSION_TIMEOUT_MS = 6000


def say(msg: str) -> None:
    """Progress on stdout (benchmarks are command-line tools, not services)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _NoBroker(argparse.Action):
    """``--engine`` of a bench without a broker: stored, and the run says it changes nothing."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        say(f"--engine {values}: this bench uses no broker, so the engine changes nothing")


def add_engine_argument(parser: argparse.ArgumentParser, uses_broker: bool = True) -> None:
    """Add ``--engine tansu|kafka`` (accepted, and said unused, by benches without a broker)."""
    if uses_broker:
        parser.add_argument("--engine", choices=ENGINES, default="tansu",
                            help="the broker this bench starts (default tansu)")
        return
    # Accepted all the same, so one command line (a loop over benches) runs every one of them.
    parser.add_argument("--engine", choices=ENGINES, default="tansu", action=_NoBroker,
                        help="accepted for a uniform command line; this bench uses no broker")


@dataclass(frozen=True)
class BenchBroker:
    """A broker a bench started: its engine, address and the client profile that goes with it."""

    engine: Engine
    bootstrap_servers: str
    home: Path
    pids: tuple[int, ...]

    @property
    def profile(self) -> str:
        """The LOOPLINE_KAFKA_PROFILE of this engine."""
        return "embedded" if self.engine == "tansu" else "kafka"

    def settings(self, cls: type[LooplineSettings] = LooplineSettings, **extra: Any) -> Any:
        """Settings of ``cls`` pointing at this broker, with the engine's client profile."""
        base: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers,
                                "kafka_profile": self.profile, "home": self.home,
                                "session_timeout_ms": SESSION_TIMEOUT_MS}
        return cls(**{**base, **extra})

    def kafka(self, **extra: Any) -> KafkaConfig:
        """A client factory for this broker."""
        return KafkaConfig.from_settings(self.settings(**extra))

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a `loopline run <service>` subprocess on this broker."""
        return dict(os.environ, LOOPLINE_BOOTSTRAP_SERVERS=self.bootstrap_servers,
                    LOOPLINE_KAFKA_PROFILE=self.profile, LOOPLINE_HOME=str(self.home),
                    LOOPLINE_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
                    LOOPLINE_LOG_LEVEL="WARNING", **extra)


@contextmanager
def bench_broker(engine: Engine, home: Path) -> Iterator[BenchBroker]:
    """Start a broker of ``engine`` with its state under ``home``; stop it on the way out."""
    slow = " (Apache Kafka: about 10-30 s)" if engine == "kafka" else ""
    say(f"starting the {engine} broker{slow}")
    broker_home = home / "broker"
    with make_broker(engine, broker_home, progress=lambda line: say(f"  {line}")) as broker:
        say(f"{engine} broker ready at {broker.bootstrap_servers}")
        yield BenchBroker(engine, broker.bootstrap_servers, home, tuple(broker.pids))
