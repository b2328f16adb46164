"""Avro codecs: single-object encoding, schema identity, resolution of older writers."""

from __future__ import annotations

import copy

import fastavro
import fastavro.utils
import pytest

from loopline import avro
from loopline.errors import SchemaError
from loopline.spec import parse_spec

FIXED = ["prediction", "feedback", "deadletter", "alert", "registry"]
SPEC = parse_spec({"name": "demo", "features": [{"name": "x", "type": "float"},
                                                {"name": "tag", "type": "string", "required": False}]})


def codecs() -> list[avro.Codec]:
    return [avro.codec(k) for k in FIXED] + [avro.Codec(SPEC.features_schema()), avro.Codec(SPEC.raw_schema())]


def test_avro_null_fingerprint_matches_the_specification() -> None:
    # Avro spec / Java SchemaNormalization: CRC-64-AVRO("null") = 0x63dd24e7cc258f8a, sent little-endian.
    assert avro.fingerprint(fastavro.parse_schema("null")) == (0x63DD24E7CC258F8A).to_bytes(8, "little")


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_round_trip_of_generated_records(codec: avro.Codec) -> None:
    for record in fastavro.utils.generate_many(codec.parsed, 20):
        data = codec.encode(record)
        assert data[:2] == b"\xc3\x01" and data[2:10] == codec.fingerprint
        assert codec.decode(data) == record


def test_encode_names_the_problem() -> None:
    with pytest.raises(SchemaError, match="Feedback"):
        avro.codec("feedback").encode({"feedback_id": 1})


@pytest.mark.parametrize("data", [b"", b"{}", b"\xc3\x01" + b"\x00" * 8, b"\xc3\x02" + b"\x00" * 20])
def test_decode_rejects_foreign_bytes(data: bytes) -> None:
    with pytest.raises(SchemaError):
        avro.codec("feedback").decode(data)


def test_decode_rejects_truncated_body() -> None:
    c = avro.codec("alert")
    good = c.encode(fastavro.utils.generate_one(c.parsed))
    with pytest.raises(SchemaError, match="corrupt"):
        c.decode(good[:-5])


def test_schemas_differ_so_messages_identify_their_kind() -> None:
    fps = {c.fingerprint for c in codecs()}
    assert len(fps) == len(FIXED) + 2
    with pytest.raises(SchemaError, match="unknown writer schema"):
        avro.codec("feedback").decode(avro.codec("alert").encode(
            fastavro.utils.generate_one(avro.codec("alert").parsed)))


def test_new_reader_resolves_old_writer() -> None:
    old = copy.deepcopy(avro.load_schema("feedback"))
    new = copy.deepcopy(old)
    new["fields"].append({"name": "comment", "type": ["null", "string"], "default": None})
    old_codec, new_codec = avro.Codec(old), avro.Codec(new, writers=[old])
    record = fastavro.utils.generate_one(old_codec.parsed)
    decoded = new_codec.decode(old_codec.encode(record))
    assert decoded == {**record, "comment": None}


def test_compatibility_check_finds_a_missing_default() -> None:
    old = copy.deepcopy(avro.load_schema("feedback"))
    new = copy.deepcopy(old)
    new["fields"].append({"name": "required_now", "type": "string"})
    assert avro.is_backward_compatible(new, old) is not None
    assert avro.is_backward_compatible(old, old) is None
