"""`loopline apply` sets the spec's per-topic retention, and changes it when the spec changes."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

from loopline.apply import apply_spec
from loopline.kafka import KafkaConfig
from loopline.spec import parse_spec

pytestmark = pytest.mark.integration


def configs(kafka: KafkaConfig, topic: str) -> dict[str, str | None]:
    admin = kafka.admin()  # kept alive until the answer is in
    (future,) = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return {k: e.value for k, e in future.result().items()}


def spec_with(name: str, retention: dict[str, Any] | None) -> Any:
    data: dict[str, Any] = {"name": name, "features": [{"name": "x", "type": "float"}]}
    if retention is not None:
        data["retention"] = retention
    return parse_spec(data)


def test_retention_reaches_the_topics_and_follows_the_spec(kafka: KafkaConfig, unique: str) -> None:
    first = apply_spec(kafka, spec_with(unique, {"raw": "7d", "feedback": "forever"}))
    assert first.altered_configs == {}  # set at creation, nothing to alter
    raw, feedback = f"loopline.{unique}.raw", f"loopline.{unique}.feedback"
    assert configs(kafka, raw)["retention.ms"] == str(7 * 86_400_000)
    assert configs(kafka, feedback)["retention.ms"] == "-1"

    # Someone shortens the raw topic's retention by hand; the features topic is an operator's own.
    admin = kafka.admin()
    hand = [ConfigResource("topic", topic, incremental_configs=[
        ConfigEntry("retention.ms", ms, incremental_operation=AlterConfigOpType.SET)])
        for topic, ms in ((raw, "3600000"), (f"loopline.{unique}.features", "7200000"))]
    for future in admin.incremental_alter_configs(hand).values():
        future.result()

    # Re-applied with raw at 2 days, feedback no longer set, predictions newly set.
    second = apply_spec(kafka, spec_with(unique, {"raw": "2d", "predictions": 90_000_000}))
    assert second.published
    predictions = f"loopline.{unique}.predictions"
    assert second.altered_configs == {raw: {"retention.ms": str(2 * 86_400_000)},
                                      predictions: {"retention.ms": "90000000"},
                                      feedback: {"retention.ms": None}}
    assert configs(kafka, raw)["retention.ms"] == str(2 * 86_400_000)
    assert configs(kafka, f"loopline.{unique}.predictions")["retention.ms"] == "90000000"
    assert configs(kafka, feedback).get("retention.ms") != "-1"  # back to the broker's default
    assert configs(kafka, f"loopline.{unique}.features")["retention.ms"] == "7200000"  # left alone

    # The same spec again: the topics already say so, nothing is altered.
    third = apply_spec(kafka, spec_with(unique, {"raw": "2d", "predictions": 90_000_000}))
    assert not third.published and third.altered_configs == {}
