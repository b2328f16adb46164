"""Feedback arrives as Avro or JSON; both decode to
the same record, bad ones name field and rule."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Message

from loopline import avro, feedback
from loopline.feedback import FeedbackError


def test_avro_and_json_decode_alike() -> None:
    record = feedback.make(prediction_id="p1", label="1", ts=5, feedback_id="f1",
                           classes=["0", "1"])
    from_avro = feedback.decode(feedback.encode(record), "t", 0)
    from_json = feedback.decode(
        b'{"feedback_id": "f1", "prediction_id": "p1", "label": 1, "ts": 5}', "t", 0)
    assert from_avro == from_json == record


def test_tombstones_and_huge_values_are_refused_with_bounded_messages() -> None:
    with pytest.raises(FeedbackError) as info:
        feedback.decode(None, "t", 0)
    assert info.value.rule == "tombstone"
    huge = b'{"event_id": "e", "label": "' + b"x" * 900_000 + b'"}'
    with pytest.raises(FeedbackError) as info:
        feedback.decode(huge, "t", 0)
    assert info.value.rule == "size" and len(str(info.value)) < 200
    long_label = b'{"event_id": "e", "label": "' + b"y" * 5_000 + b'"}'
    with pytest.raises(FeedbackError) as info:
        feedback.decode(long_label, "t", 0, classes=["0", "1"])
    assert (info.value.field, info.value.rule) == ("label", "size") and len(str(info.value)) < 200


def test_missing_feedback_id_is_derived_from_the_message_not_its_offset() -> None:
    a = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, timestamp_ms=7)
    b = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, timestamp_ms=7)
    c = feedback.decode(b'{"event_id": "e1", "verdict": "accept"}', "t", 2, timestamp_ms=8)
    d = feedback.decode(b'{"event_id": "e1", "verdict": "reject"}', "t", 2, timestamp_ms=7)
    assert a["feedback_id"] == b["feedback_id"]
    assert len({a["feedback_id"], c["feedback_id"], d["feedback_id"]}) == 3
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
        feedback.decode(data, "t", 0, classes=["0", "1"])
    assert (info.value.field, info.value.rule) == (field, rule)


def message(value: bytes | None, offset: int, partition: int = 0, ts: int = 7) -> Message:
    return Message(topic="t", partition=partition, offset=offset, key=None, value=value,
                   timestamp=(1, ts))


def outcome(r: object) -> object:
    return (r.field, r.rule, str(r)) if isinstance(r, FeedbackError) else r


@pytest.mark.parametrize("truncated", [False, True], ids=["block", "fallback"])
def test_decode_each_is_decode_of_each_message(truncated: bool) -> None:
    classes = ["0", "1"]
    good = [feedback.make(prediction_id=f"p{i}", label=str(i % 2), ts=i, feedback_id=f"f{i}")
            for i in range(60)]
    values: list[bytes | None] = [feedback.encode(r) for r in good]
    base = {"feedback_id": "x", "prediction_id": "p", "event_id": None, "label": "1", "value": None,
            "verdict": None, "ts": 5}
    # Avro records that break a rule: the schema fixes their types, the rules are still checked.
    breaks: list[dict[str, Any]] = [
        {"prediction_id": None}, {"label": None}, {"label": "2"}, {"ts": -1},
        {"label": None, "value": float("nan")}, {"label": None, "value": float("inf")},
        {"label": None, "verdict": "reject"}, {"prediction_id": "", "event_id": "e"},
        {"label": None, "value": 2.5}]
    for i, change in enumerate(breaks):
        values[3 + 5 * i] = avro.codec("feedback").encode({**base, **change})
    # JSON, and messages that are neither
    values[4] = b'{"event_id": "e1", "verdict": "accept"}'
    values[9] = b'{"event_id": "e1", "label": 1, "ts": 3}'
    values[14] = b'{"event_id": "e1", "label": "1", "colour": 1}'
    values[19], values[24], values[29] = b"", None, b"\xc3\x01garbage"
    if truncated:  # the Avro ones can no longer be read as one block
        values[34] = feedback.encode(good[34])[:-2]
    msgs = [message(v, offset=100 + i, partition=i % 2) for i, v in enumerate(values)]

    expected: list[dict[str, Any] | FeedbackError] = []
    for m in msgs:
        try:
            expected.append(feedback.decode(m.value(), "t", m.partition(), 7, classes))
        except FeedbackError as e:
            expected.append(e)
    got = feedback.decode_each(msgs, classes)
    assert [outcome(r) for r in got] == [outcome(r) for r in expected]
    assert got[0] == good[0]
    assert got[4] == {"feedback_id": feedback.derived_id("t", 0, 7, values[4]),
                      "prediction_id": None,
                      "event_id": "e1", "label": None, "value": None, "verdict": "accept", "ts": 7}
    errors = [i for i, r in enumerate(got) if isinstance(r, FeedbackError)]
    assert errors == [3, 8, 13, 14, 18, 19, 23, 24, 28, 29] + ([34] if truncated else [])
    assert feedback.decode_each([]) == []


def test_the_feedback_schema_fixes_the_types_that_check_also_validates() -> None:
    fields = {f["name"]: f["type"] for f in avro.load_schema("feedback")["fields"]}
    assert fields["verdict"][1]["symbols"] == list(feedback.VERDICTS)
    assert fields["value"] == ["null", "double"] and fields["ts"] == "long"
    assert all(fields[n] in ("string", ["null", "string"])
               for n in ("feedback_id", "prediction_id", "event_id", "label"))
