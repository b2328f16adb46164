"""Feedback arrives as Avro or JSON; both decode to the same record, bad ones name field and rule."""

from __future__ import annotations

import pytest

from loopline import feedback
from loopline.feedback import FeedbackError


def test_avro_and_json_decode_alike() -> None:
    record = feedback.make(prediction_id="p1", label="1", ts=5, feedback_id="f1", classes=["0", "1"])
    from_avro = feedback.decode(feedback.encode(record), "t", 0, 9)
    from_json = feedback.decode(b'{"feedback_id": "f1", "prediction_id": "p1", "label": 1, "ts": 5}', "t", 0, 9)
    assert from_avro == from_json == record


def test_missing_feedback_id_is_derived_from_the_offset() -> None:
    a = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, 40, timestamp_ms=7)
    b = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, 40, timestamp_ms=7)
    c = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, 41, timestamp_ms=7)
    assert a["feedback_id"] == b["feedback_id"] != c["feedback_id"]
    assert a["ts"] == 7


@pytest.mark.parametrize(("data", "field", "rule"), [
    (b"", None, "empty"),
    (b"{not json", None, "json"),
    (b"[1]", None, "type"),
    (b'{"label": "1"}', "prediction_id", "required"),
    (b'{"event_id": "e"}', "label", "required"),
    (b'{"event_id": "e", "verdict": "maybe"}', "verdict", "values"),
    (b'{"event_id": "e", "value": "3"}', "value", "type"),
    (b'{"event_id": "e", "label": "2"}', "label", "values"),
    (b'{"event_id": "e", "label": "1", "colour": 1}', "colour", "unknown_field"),
    (b'{"event_id": "e", "label": "1", "ts": "yesterday"}', "ts", "timestamp"),
    (b"\xc3\x01garbage", None, "avro"),
])
def test_bad_feedback_names_field_and_rule(data: bytes, field: str | None, rule: str) -> None:
    with pytest.raises(FeedbackError) as info:
        feedback.decode(data, "t", 0, 0, classes=["0", "1"])
    assert (info.value.field, info.value.rule) == (field, rule)
