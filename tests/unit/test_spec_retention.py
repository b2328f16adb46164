"""The spec's retention section: durations read as milliseconds; bad ones name field and rule."""

from __future__ import annotations

from typing import Any

import pytest

from loopline import topics
from loopline.apply import pipeline_topics, topic_configs
from loopline.errors import SpecError
from loopline.spec import Retention, parse_spec


def spec(retention: Any) -> Any:
    return parse_spec({"name": "demo", "features": [{"name": "x", "type": "float"}],
                       "retention": retention})


@pytest.mark.parametrize(("text", "ms"), [
    ("7d", 604_800_000), ("2w", 1_209_600_000), ("36h", 129_600_000), ("15m", 900_000),
    ("90s", 90_000), ("1.5h", 5_400_000), ("120000ms", 120_000), (" 12 h ", 43_200_000),
    ("604800000", 604_800_000), (604_800_000, 604_800_000), (6.048e8, 604_800_000),
    ("forever", -1), ("Infinite", -1), ("-1", -1), (-1, -1),
])
def test_durations(text: Any, ms: int) -> None:
    assert spec({"raw": text}).retention.raw == ms


@pytest.mark.parametrize(("value", "says"), [
    ("7x", "is not a duration"), ("d7", "is not a duration"), ("", "is not a duration"),
    ("-2", "is not a duration"), (True, "expected a duration"), ([7], "expected a duration"),
    (1.5, "whole number"), (float("nan"), "whole number"), (0, "shorter than 1 minute"),
    (59_999, "shorter than 1 minute"), ("30s", "shorter than 1 minute"),
    (-5, "shorter than 1 minute"),
    (2**63, "64-bit"),
])
def test_bad_durations_name_the_field_and_say_how(value: Any, says: str) -> None:
    with pytest.raises(SpecError) as e:
        spec({"features": value})
    problems = e.value.problems
    assert [(field, rule) for field, rule, _ in problems] == [("retention.features", "value_error")]
    assert says in problems[0][2]


def test_unknown_topic_kind_is_refused() -> None:
    with pytest.raises(SpecError) as e:
        spec({"raws": "7d"})
    assert [(f, r) for f, r, _ in e.value.problems] == [("retention.raws", "extra_forbidden")]


def test_retention_covers_every_topic_kind_and_reaches_topic_configs() -> None:
    assert tuple(Retention.model_fields) == topics.KINDS
    s = spec({"raw": "7d", "feedback": "forever"})
    assert s.retention.ms() == {"raw": 604_800_000, "feedback": -1}
    assert topic_configs(s) == {"loopline.demo.raw": {"retention.ms": "604800000"},
                                "loopline.demo.feedback": {"retention.ms": "-1"}}
    made = {t.name: t.config for t in pipeline_topics(s)}
    assert made["loopline.demo.raw"] == {"retention.ms": "604800000"}
    assert made["loopline.demo.features"] == {}


def test_unset_retention_keeps_broker_defaults_and_round_trips() -> None:
    s = parse_spec({"name": "demo", "features": [{"name": "x", "type": "float"}]})
    assert s.retention.ms() == {} and topic_configs(s) == {}
    again = parse_spec(spec({"raw": "7d"}).model_dump(mode="json"))
    assert again.retention.raw == 604_800_000
    assert again.sha256() == spec({"raw": 604_800_000}).sha256()
