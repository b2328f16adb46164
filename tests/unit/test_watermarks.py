"""Watermark reads ride out a partition whose leader is being elected (no broker needed)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from loopline.kafka import watermarks


class FlakyConsumer:
    """Answers with ``errors`` first (as get_watermark_offsets raises them), then (0, 7)."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def get_watermark_offsets(self, tp: Any, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))  # a bare code: not "retriable"
        return 0, 7


@pytest.mark.parametrize("code", [KafkaError.NOT_LEADER_FOR_PARTITION,
                                  KafkaError.LEADER_NOT_AVAILABLE])
def test_a_moving_leader_is_asked_again(code: int) -> None:
    consumer = FlakyConsumer(code, code)
    assert watermarks(consumer, "t", 0, timeout_s=5) == (0, 7)  # type: ignore[arg-type]
    assert consumer.calls == 3


def test_other_errors_are_raised_at_once() -> None:
    consumer = FlakyConsumer(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, timeout_s=5)  # type: ignore[arg-type]
    assert consumer.calls == 1
