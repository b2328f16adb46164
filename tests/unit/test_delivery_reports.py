"""A delivery that fails is reported, although the runtime's producers report only failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.broker import free_port
from loopline.errors import DeliveryError
from loopline.runtime.delivery import AtLeastOnce, Delivery
from loopline.runtime.outputs import Out
from loopline.runtime.service import ServiceRuntime
from loopline.settings import ServiceSettings


def nowhere(tmp_path: Path) -> ServiceRuntime:
    """A runtime whose broker address has nothing listening: every delivery times out."""
    settings = ServiceSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        kafka_profile="embedded",
        delivery="at-least-once",
        home=tmp_path,
        log_level="WARNING",
    )
    return ServiceRuntime("ingest", settings, install_signals=False)


def test_runtime_delivery_reports_a_failed_message(tmp_path: Path) -> None:
    with nowhere(tmp_path) as rt:
        delivery = rt.delivery(**{"message.timeout.ms": 300})
        assert isinstance(delivery, AtLeastOnce)
        with pytest.raises(
            DeliveryError, match=r"2 message.*failed delivery, first: t1: .*timed out"
        ):
            delivery.commit(
                [Out("t1", b"v", b"k"), Out("t2", b"v", headers=[("h", b"x")], partition=0)],
                [],
                None,
            )


def test_delivery_of_a_plain_producer_reports_failures_per_message(tmp_path: Path) -> None:
    with nowhere(tmp_path) as rt:
        producer = rt.kafka.producer("plain", **{"message.timeout.ms": 300})
        delivery: Delivery = AtLeastOnce(
            producer
        )  # no configured callback: one goes with each message
        with pytest.raises(DeliveryError, match="2 message"):
            delivery.commit([Out("t1", b"v"), Out("t1", b"w", b"k")], [], None)
