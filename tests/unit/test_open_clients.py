"""The suite's safety net: Kafka clients a test left open are closed before the broker stops."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer, Producer
from conftest import close_open_clients


def test_open_clients_are_found_and_closed_and_closed_ones_left_alone() -> None:
    quiet = {"bootstrap.servers": "127.0.0.1:9", "log_level": 0}  # nothing listens there
    producer, consumer = Producer(quiet), Consumer(dict(quiet, **{"group.id": "g"}))
    closed = Producer(quiet)
    closed.close()
    found = close_open_clients()
    assert found["Producer"] >= 1 and found["Consumer"] >= 1
    with pytest.raises(RuntimeError):
        producer.poll(0)
    with pytest.raises(RuntimeError):
        consumer.assignment()
    assert close_open_clients() == {}  # nothing open is left
