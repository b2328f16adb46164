"""Ingest validation rules, one case per rule, without a broker."""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from loopline import avro
from loopline.avro.writers import FeaturesEncoder, long_bytes
from loopline.services.ingest.idempotency import content_hash
from loopline.services.ingest.ids import DerivedIds, fast_uuid5, uuid5_many
from loopline.spec import PipelineSpec, load_spec
from loopline.validation import Accepted, Rejection, Validator, parse_ts

REPO = Path(__file__).resolve().parents[2]

GOOD = {"customer_id": "c1", "amount": 12.5, "merchant_risk": 0.2, "hour": 3, "country": "DE",
        "card_present": True}


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return load_spec(REPO / "examples" / "fraud.yaml")


@pytest.fixture(scope="module")
def validator(spec: PipelineSpec) -> Validator:
    return Validator(spec)


def event(**features: Any) -> bytes:
    return orjson.dumps({"features": {**GOOD, **features}})


def rejected(v: Validator, value: bytes | None) -> Rejection:
    verdict = v.validate(value)
    assert isinstance(verdict, Rejection), verdict
    return verdict


def test_valid_event_is_accepted_with_its_fields(validator: Validator) -> None:
    verdict = validator.validate(orjson.dumps(
        {"event_id": "e1", "key": "k1", "ts": 1_700_000_000_000, "features": GOOD}))
    assert verdict == Accepted("e1", "k1", 1_700_000_000_000, GOOD, 0)


def test_optional_feature_may_be_absent_or_null_and_ints_are_floats(validator: Validator) -> None:
    verdict = validator.validate(event(amount=12, device_age_days=None))
    assert isinstance(verdict, Accepted)
    assert verdict.features["amount"] == 12 and verdict.event_id is None and verdict.ts is None


@pytest.mark.parametrize(("value", "field", "rule", "words"), [
    (b'{"features": {"amount": 1', None, "json", "not valid JSON"),
    (b"\x00\xff\x13garbage", None, "json", "not UTF-8 text (first invalid byte 0xff at offset 1)"),
    (b"[1, 2]", None, "type", "got a JSON array"),
    (b'"hello"', None, "type", "got a JSON string"),
    (b'{"event_id": "x"}', "features", "required", "missing"),
    (b'{"features": [1]}', "features", "type", "must be a JSON object"),
    (event(amount="12"), "features.amount", "type", "never converted"),
    (event(hour=3.0), "features.hour", "type", "must be an integer"),
    (event(hour=True), "features.hour", "type", "got boolean true (true/false are booleans"),
    (event(amount=False), "features.amount", "type", "booleans"),
    (event(card_present=1), "features.card_present", "type", "a boolean"),
    (event(customer_id=7), "features.customer_id", "type", "a string"),
    (event(amount=-5), "features.amount", "range", "min 0, max 100000"),
    (event(merchant_risk=1.5), "features.merchant_risk", "range", "max 1"),
    (event(hour=24), "features.hour", "range", "max 23"),
    (event(country="XX"), "features.country", "values", "'DE'"),
    (event(country=None), "features.country", "required", "missing or null"),
    (event(colour="red"), "features.colour", "unknown_field", "not declared"),
    (orjson.dumps({"features": GOOD, "extra": 1}), "extra", "unknown_field", "not declared"),
    (orjson.dumps({"features": GOOD, "ts": "yesterday"}), "ts", "timestamp", "ISO-8601"),
    (orjson.dumps({"features": GOOD, "ts": "2024-05-01T12:00:00"}), "ts", "timestamp",
     "UTC offset"),
    (orjson.dumps({"features": GOOD, "ts": 1.7e12}), "ts", "timestamp", "integer"),
    (orjson.dumps({"features": GOOD, "ts": -1}), "ts", "timestamp", "epoch milliseconds"),
    (orjson.dumps({"features": GOOD, "event_id": 5}), "event_id", "type", "non-empty string"),
    (orjson.dumps({"features": GOOD, "event_id": ""}), "event_id", "type", "non-empty string"),
    (orjson.dumps({"features": GOOD, "key": ["a"]}), "key", "type", "must be a string"),
    (None, None, "tombstone", "tombstone"),
])
def test_each_rule_names_field_and_rule(validator: Validator, value: bytes | None,
                                        field: str | None, rule: str, words: str) -> None:
    verdict = rejected(validator, value)
    assert (verdict.field, verdict.rule) == (field, rule)
    assert words in verdict.message


def test_missing_required_feature(validator: Validator) -> None:
    features = {k: v for k, v in GOOD.items() if k != "merchant_risk"}
    verdict = rejected(validator, orjson.dumps({"features": features}))
    assert (verdict.field, verdict.rule) == ("features.merchant_risk", "required")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_literal_names_the_field(validator: Validator, literal: bytes) -> None:
    value = event(amount=0).replace(b'"amount":0', b'"amount":' + literal)
    verdict = rejected(validator, value)
    assert (verdict.field, verdict.rule) == ("features.amount", "finite")
    assert "not valid JSON" in verdict.message


def test_nan_outside_features_is_still_invalid_json(validator: Validator) -> None:
    spec = validator.spec.model_copy(update={"unknown_fields": "drop"})
    verdict = rejected(Validator(spec),
                       b'{"features": {"customer_id": "c", "amount": 1, "merchant_risk": 0, '
                                        b'"hour": 1, "country": "DE", "card_present": false, "x": '
                                        b'NaN}}')
    assert (verdict.field, verdict.rule) == (None, "json")


def test_first_problem_in_spec_order_and_count_of_others(validator: Validator) -> None:
    verdict = rejected(validator, event(amount="x", hour=99, country="XX", colour=1))
    assert (verdict.field, verdict.rule) == ("features.amount", "type")
    assert "(and 3 more problem(s))" in verdict.message


def test_size_limit(spec: PipelineSpec) -> None:
    small = Validator(spec.model_copy(update={"max_message_bytes": 100}))
    verdict = rejected(small, event(customer_id="c" * 200))
    assert (verdict.field, verdict.rule) == (None, "size")
    assert "at most 100" in verdict.message


def test_unknown_fields_dropped_and_counted_with_drop_policy(spec: PipelineSpec) -> None:
    v = Validator(spec.model_copy(update={"unknown_fields": "drop"}))
    verdict = v.validate(orjson.dumps({"features": {**GOOD, "colour": "red"}, "extra": 1}))
    assert isinstance(verdict, Accepted)
    assert verdict.dropped == 2 and "colour" not in verdict.features


def test_avro_event_is_accepted_and_checked(spec: PipelineSpec, validator: Validator) -> None:
    codec = avro.Codec(spec.raw_schema())
    good = {"event_id": "a1", "key": None, "ts": 5, "features": {**GOOD, "device_age_days": None}}
    verdict = validator.validate(codec.encode(good))
    assert isinstance(verdict, Accepted) and verdict.event_id == "a1" and verdict.ts == 5
    nan = validator.validate(codec.encode({**good,
                                           "features": {**good["features"], "amount": math.nan}}))
    assert isinstance(nan, Rejection) and (nan.field, nan.rule) == ("features.amount", "finite")
    far = validator.validate(codec.encode({**good, "features": {**good["features"], "hour": 40}}))
    assert isinstance(far, Rejection) and (far.field, far.rule) == ("features.hour", "range")


def test_avro_unknown_fingerprint_and_corrupt_body(spec: PipelineSpec,
                                                   validator: Validator) -> None:
    other = avro.codec("feedback").encode({"feedback_id": "f", "ts": 1})
    assert (rejected(validator, other).rule) == "schema"
    codec = avro.Codec(spec.raw_schema())
    truncated = codec.encode({"event_id": "a1", "features": GOOD})[:14]
    assert rejected(validator, truncated).rule == "avro"


def test_parse_ts_iso_and_millis() -> None:
    assert parse_ts("1970-01-01T00:00:01Z") == 1000
    assert parse_ts("2024-05-01T12:00:00.250+02:00") == 1714557600250
    assert parse_ts(1_700_000_000_000) == 1_700_000_000_000
    assert isinstance(parse_ts("1700000000000"), str)  # no string->number coercion


# --- the generated features encoder must agree with fastavro ---------------------------------

def corpus(seed: int = 3, n: int = 400) -> list[dict[str, Any]]:
    """Events near every rule's edge: valid, wrong
    types, bounds, NaN, unknown and missing fields."""
    rng = random.Random(seed)
    # (valid values at and inside the edges, invalid values just beyond them) per feature
    edge: dict[str, tuple[list[Any], list[Any]]] = {
        "customer_id": (["c", "", "ü"], [1, None, True]),
        "amount": ([0, 100000, 12.5, 3], [100000.5, -0.1, math.nan, math.inf, "1", True, None]),
        "merchant_risk": ([0.0, 1, 0.5], [1.0001, -1e-9, None, math.nan]),
        "hour": ([0, 23, 7], [24, -1, 3.0, True, "3", None, 2**70]),
        "country": (["DE", "US"], ["de", 5, None]),
        "card_present": ([True, False], [0, "true", None]),
        "device_age_days": ([None, 0, 10**6], [-1, 1.5, math.inf, "1"]),
    }
    out = []
    for _ in range(n):
        features = {k: rng.choice(good if rng.random() < 0.9 else bad)
                    for k, (good, bad) in edge.items()
                    if rng.random() > 0.03}
        if rng.random() < 0.1:
            features["colour"] = "red"
        doc: dict[str, Any] = {"features": features}
        for field, choices in (("event_id", ["e", "", 3]), ("key", ["k", 1]),
                               ("ts", [0, 5, -1, 1.5, "2024-01-01T00:00:00Z", 10**15])):
            if rng.random() < 0.3:
                doc[field] = rng.choice(choices)
        if rng.random() < 0.05:
            doc["extra"] = 1
        out.append(doc)
    return out


def test_fast_encoder_writes_exactly_what_fastavro_writes(spec: PipelineSpec) -> None:
    codec = avro.Codec(spec.features_schema())
    encoder = FeaturesEncoder(spec.features_schema())
    v = Validator(spec)
    accepted = [r for r in (v.check(d) for d in corpus(n=600)) if isinstance(r, Accepted)]
    assert len(accepted) > 10
    for i, a in enumerate(accepted):
        for key in (None, "k", "ünïcode"):
            record = {"event_id": f"id-{i}", "key": key, "ts": a.ts or 1_700_000_000_000 + i,
                      "ingested_at": 1_700_000_000_123, "features": a.features,
                      "source": {"topic": "loopline.fraud.raw", "partition": i % 3,
                                 "offset": i * 7919},
                      "content_hash": f"h{i}"}
            fast = encoder.encode(record["event_id"], key, record["ts"],
                                  long_bytes(record["ingested_at"]),
                                  encoder.source_prefix("loopline.fraud.raw"), i % 3, i * 7919,
                                  encoder.encode_features(a.features), f"h{i}")
            assert fast == codec.encode(record)
    assert encoder.encode("x", None, 2**40, long_bytes(0), encoder.source_prefix("t"), 0, 2**40,
                          encoder.encode_features(accepted[0].features), "") == codec.encode(
        {"event_id": "x", "key": None, "ts": 2**40, "ingested_at": 0,
         "features": accepted[0].features,
         "source": {"topic": "t", "partition": 0, "offset": 2**40}, "content_hash": ""})


_EDGES = [0, 1, 8191, 8192, 2**27 - 1, 2**27, 2**41 - 1, 2**41, 2**62, 2**63 - 1]


def test_generated_event_writer_matches_fastavro_and_the_content_hash(spec: PipelineSpec) -> None:
    codec = avro.Codec(spec.features_schema())
    encoder = FeaturesEncoder(spec.features_schema())
    v = Validator(spec)
    accepted = [r for r in (v.check(d) for d in corpus(n=300)) if isinstance(r, Accepted)]
    middle = long_bytes(1_700_000_000_123) + encoder.source_prefix("loopline.fraud.raw")
    for i, a in enumerate(accepted):
        key = (None, "", "k", "ünïcode", "x" * 9000)[i % 5]
        # timestamps and offsets on every edge of the varint tables the generated code reads
        ts, offset = _EDGES[i % len(_EDGES)], _EDGES[(i // 3) % len(_EDGES)]
        partition = (0, 1, 8191, 8192)[i % 4]
        event_id = ("e", "ü" * 9000, "8c4b2f0e-aaaa-5bbb-8ccc-0123456789ab")[i % 3]
        key_bytes = None if key is None else key.encode()
        record, content = encoder.event(a.features, event_id.encode(), key_bytes, ts, middle,
                                        partition, offset)
        body = encoder.encode_features(a.features)
        assert content.decode() == content_hash(key, body)
        assert record == codec.encode({
            "event_id": event_id, "key": key, "ts": ts, "ingested_at": 1_700_000_000_123,
            "features": a.features, "content_hash": content.decode(),
            "source": {"topic": "loopline.fraud.raw", "partition": partition, "offset": offset}})


@pytest.mark.parametrize("n", [0, 1, 63, 64, 8191, 8192, 2**40, 2**62])
def test_varint_matches_avro_long(n: int) -> None:
    for value in (n, -n):
        assert long_bytes(value) == avro.Codec({"type": "record", "name": "L", "fields": [
            {"name": "v", "type": "long"}]}).encode({"v": value})[avro.HEADER_LEN:]


def test_uuid5_many_is_uuid5() -> None:
    ns = uuid.UUID("6f1c52a4-1d0e-5b7e-9a57-2c4f0e8a1b01")
    ids = DerivedIds(ns.bytes, "loopline.fraud.raw")
    places = [(p, o) for p in (0, 1, 7, 8191) for o in (0, 1, 9, 10, 2**31, 2**62)]
    places += [(2, o) for o in range(300)]
    digests = [hashlib.sha1(ids[p] + str(o).encode()).digest() for p, o in places]
    expected = [str(uuid.uuid5(ns, f"loopline.fraud.raw:{p}:{o}")).encode() for p, o in places]
    assert uuid5_many(digests) == expected
    assert uuid5_many([]) == []


def test_fast_uuid5_is_uuid5() -> None:
    ns = uuid.UUID("6f1c52a4-1d0e-5b7e-9a57-2c4f0e8a1b01")
    for name in ["loopline.fraud.raw:0:0", "x:2:123456789", "ü"] + [f"t:0:{i}" for i in range(200)]:
        assert fast_uuid5(ns.bytes, name) == str(uuid.uuid5(ns, name))
