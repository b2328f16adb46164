"""Compatibility: the broker code lives in :mod:`loopline.brokers` (one module per engine)."""

from __future__ import annotations

from loopline.brokers import (
    STATE_FILE,
    BrokerAddress,
    EmbeddedBroker,
    die_with_parent,
    free_port,
    pid_alive,
    read_state,
    resolve_broker,
    tansu_binary,
    write_state,
)

__all__ = ["STATE_FILE", "BrokerAddress", "EmbeddedBroker", "die_with_parent", "free_port",
           "pid_alive", "read_state", "resolve_broker", "tansu_binary", "write_state"]
