"""The msgspec fast path against the full validator: it never accepts what the validator rejects.

A differential test over a generated corpus (tests/unit/ingest_corpus.py) and named edge cases:
whatever msgspec accepts, :meth:`Validator.validate` accepts unchanged, with the same event id,
key, timestamp and feature values (same Python types), encoded to the same bytes; and every
plainly valid event is accepted by msgspec, so the fast path is the common path.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from ingest_corpus import corpus, edge_spec

from loopline.avro.writers import FeaturesEncoder
from loopline.spec import PipelineSpec, load_spec
from loopline.validation import Accepted, Rejection, Validator

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "customer_id": "c1",
    "amount": 12.5,
    "merchant_risk": 0.2,
    "hour": 3,
    "country": "DE",
    "card_present": True,
}


def _fraud(**changes: Any) -> PipelineSpec:
    return load_spec(REPO / "examples" / "fraud.yaml").model_copy(update=changes)


SPECS = {
    "fraud": lambda: _fraud(),
    "fraud-drop": lambda: _fraud(unknown_fields="drop"),
    "fraud-256-bytes": lambda: _fraud(max_message_bytes=256),
    "edge": edge_spec,
    "edge-drop": lambda: edge_spec().model_copy(update={"unknown_fields": "drop"}),
}


def same(a: Any, b: Any) -> bool:
    """Equal values of the same type; floats bit for bit (so -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b)
    return bool(a == b)


def agree(
    v: Validator, encoder: FeaturesEncoder, value: bytes | None
) -> Accepted | Rejection | None:
    """Check one message both ways; the full verdict if the fast path accepted it, else None."""
    event = v.fast(value)
    full = v.validate(value)
    if event is None:
        return None
    assert isinstance(full, Accepted) and full.dropped == 0, (value, full)
    for mine, theirs in (
        (event.event_id, full.event_id),
        (event.key, full.key),
        (event.ts, full.ts),
    ):
        assert same(mine, theirs), (value, mine, theirs)
    for name, attr in v.attributes.items():
        mine, theirs = getattr(event.features, attr), full.features.get(name)
        assert same(mine, theirs), (value, name, mine, theirs)
    assert encoder.encode_struct is not None
    assert encoder.encode_struct(event.features) == encoder.encode_features(full.features)
    return full


@pytest.mark.parametrize("name", list(SPECS))
def test_msgspec_accepts_only_what_the_validator_accepts_unchanged(name: str) -> None:
    spec = SPECS[name]()
    v = Validator(spec)
    encoder = FeaturesEncoder(spec.features_schema(), v.attributes)
    cases = corpus(spec, 12_000, seed=sum(map(ord, name)))
    fast = plain = slow_accepted = 0
    for case in cases:
        verdict = agree(v, encoder, case.value)
        if verdict is not None:
            fast += 1
        else:
            assert not case.plain, f"a plainly valid event took the slow path: {case.value!r}"
            slow_accepted += isinstance(v.validate(case.value), Accepted)
        plain += case.plain
    # The corpus exercises all three outcomes: fast accepts, slow accepts, rejections.
    assert (
        fast >= plain > 5_000 and slow_accepted > 500 and len(cases) - fast - slow_accepted > 3_000
    )


FIELDS = (
    '"features":{"customer_id":"c","amount":%s,"merchant_risk":0.5,"hour":%s,"country":"DE",'
    '"card_present":true}'
)


def doc(amount: str = "1", hour: str = "3", extra: str = "") -> bytes:
    return ("{" + FIELDS % (amount, hour) + extra + "}").encode()


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (doc(amount="NaN"), "finite"),
        (doc(amount="-Infinity"), "finite"),
        (doc(amount="1e400"), "json"),  # orjson: infinity is not a double; msgspec: out of range
        (doc(hour="true"), "type"),  # booleans are not numbers, in either parser
        (doc(amount="false"), "type"),
        (doc(hour="3.0"), "type"),
        (doc(hour=str(2**64)), "type"),  # orjson reads it as a float
        (doc(hour=str(2**63)), "range"),
        (doc(amount='"1"'), "type"),
        (doc(amount="[1]"), "type"),
        (doc(amount='{"a":[[[1]]]}'), "type"),
        (doc(extra=',"ts":"2024-05-01T12:00:00"'), "timestamp"),
        (doc(extra=',"ts":1.7e12'), "timestamp"),
        (doc(extra=',"ts":253402300800000'), "timestamp"),
        (doc(extra=',"event_id":""'), "type"),
        (doc(extra=',"extra":1'), "unknown_field"),
        (b'{"features":{"customer_id":"\\ud800","amount":1}}', "json"),  # a lone surrogate
        (b"\xef\xbb\xbf" + doc(), "json"),  # a byte order mark
        (doc().replace(b'"c"', b'"\xff"'), "json"),  # not UTF-8
        (doc() + b"{}", "json"),
        (b"[" + doc() + b"]", "type"),
        # duplicate keys: both parsers keep the last value, which the full check judges
        (doc(hour="99").replace(b'"features":{', b'"features":{"hour":3,'), "range"),
        (doc(hour='"x"').replace(b'"features":{', b'"features":{"hour":3,'), "type"),
        (doc().replace(b"}}", b'},"features":[]}'), "type"),
    ],
)
def test_edge_inputs_take_the_full_path(value: bytes, rule: str) -> None:
    v = Validator(_fraud())
    assert v.fast(value) is None
    verdict = v.validate(value)
    assert isinstance(verdict, Rejection) and verdict.rule == rule, verdict


@pytest.mark.parametrize(
    "value",
    [
        doc(extra=',"ts":"2024-05-01T12:00:00Z"'),  # ISO timestamps need parsing
        doc(extra=',"colour":"red"'),  # dropped under unknown_fields: drop
        doc().replace(b'"hour"', b'"colour":1,"hour"'),
    ],
)
def test_valid_events_msgspec_cannot_take_as_they_are_are_accepted_by_the_full_path(
    value: bytes,
) -> None:
    v = Validator(_fraud(unknown_fields="drop"))
    assert v.fast(value) is None
    assert isinstance(v.validate(value), Accepted)


def test_duplicate_keys_with_a_valid_last_value_agree() -> None:
    v = Validator(_fraud())
    encoder = FeaturesEncoder(v.spec.features_schema(), v.attributes)
    value = doc(hour="3").replace(b'"features":{', b'"features":{"hour":5,')
    full = agree(v, encoder, value)
    assert isinstance(full, Accepted) and full.features["hour"] == 3


def test_ints_stay_ints_for_float_features_and_bounds_hold() -> None:
    v = Validator(edge_spec())
    event = v.fast(
        orjson.dumps(
            {
                "features": {
                    "x": 12,
                    "n": -(2**63),
                    "class": "c",
                    "big": -1e300,
                    "frac": 1,
                    "hi_only": -3,
                }
            }
        )
    )
    assert event is not None
    x, n, frac = (getattr(event.features, v.attributes[k]) for k in ("x", "n", "frac"))
    assert (type(x), x, n, frac) == (int, 12, -(2**63), 1)  # the key of this spec is str(x) == "12"
    beyond = orjson.dumps({"features": {"x": 1, "n": 0, "class": "c", "big": 0.0}}).replace(
        b'"x":1', b'"x":' + str(10**19).encode()
    )  # exact for msgspec, a float for orjson
    assert v.fast(beyond) is None
    assert isinstance(v.validate(beyond), Accepted)
    for features in (
        {"frac": 0},
        {"frac": 11},
        {"hi_only": -2},
        {"n": 2**63 - 1, "frac": 0.5},
        {"big": math.nextafter(1e300, math.inf)},
        {"lo_only": -3},
        {"tag": "A"},
    ):
        value = orjson.dumps({"features": {"x": 1.5, "n": 0, "class": "c", "big": 0.0, **features}})
        assert v.fast(value) is None, features
        assert isinstance(v.validate(value), Rejection), features


def test_oversized_and_non_json_messages_take_the_full_path() -> None:
    v = Validator(_fraud(max_message_bytes=150))
    big = orjson.dumps({"features": {**GOOD, "customer_id": "c" * 200}})
    assert v.fast(big) is None and v.validate(big).rule == "size"  # type: ignore[union-attr]  # not None here
    assert v.fast(None) is None and v.validate(None).rule == "tombstone"  # type: ignore[union-attr]  # not None here
    avro_event = v.raw_codec.encode(
        {"event_id": "a", "key": None, "ts": None, "features": {**GOOD, "device_age_days": None}}
    )
    assert v.fast(avro_event) is None and isinstance(v.validate(avro_event), Accepted)
