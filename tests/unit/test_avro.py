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
                                                {"name": "tag", "type": "string",
                                                 "required": False}]})


def codecs() -> list[avro.Codec]:
    return [avro.codec(k) for k in FIXED] + [avro.Codec(SPEC.features_schema()),
                                             avro.Codec(SPEC.raw_schema())]


def test_avro_null_fingerprint_matches_the_specification() -> None:
    # Avro spec / Java SchemaNormalization: CRC-64-AVRO("null") = 0x63dd24e7cc258f8a, sent
    # little-endian.
    assert avro.fingerprint(fastavro.parse_schema("null")) == (0x63DD24E7CC258F8A).to_bytes(
        8, "little")


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_round_trip_of_generated_records(codec: avro.Codec) -> None:
    for record in fastavro.utils.generate_many(codec.parsed, 20):
        data = codec.encode(record)
        assert data[:2] == b"\xc3\x01" and data[2:10] == codec.fingerprint
        assert codec.decode(data) == record


def test_encode_names_the_problem() -> None:
    with pytest.raises(SchemaError, match="Feedback"):
        avro.codec("feedback").encode({"feedback_id": 1})


@pytest.mark.parametrize("data",
                         [b"", b"{}", b"\xc3\x01" + b"\x00" * 8, b"\xc3\x02" + b"\x00" * 20])
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


# --- decode_many / decode_each: compiled readers, identical to decode -------------------------

PAIR = avro.Codec({"type": "record", "name": "Pair", "namespace": "test",
                   "fields": [{"name": "a", "type": "long"}, {"name": "b", "type": "long"}]})


def pair(a: int, b: int) -> bytes:
    return PAIR.encode({"a": a, "b": b})


def per_message(codec: avro.Codec, values: list[bytes]) -> list[object]:
    """What fastavro says of each message: the record, or the text of its error."""
    out: list[object] = []
    for v in values:
        try:
            out.append(codec._decode_fastavro(v))
        except SchemaError as e:
            out.append(str(e))
    return out


def each(codec: avro.Codec, values: list[bytes]) -> list[object]:
    return [str(r) if isinstance(r, SchemaError) else r for r in codec.decode_each(values)]


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Messages that fastavro decoded (not the compiled reader)."""
    calls: list[bytes] = []
    original = avro.Codec._decode_fastavro

    def spy(self: avro.Codec, data: bytes) -> dict[str, object]:
        calls.append(data)
        return original(self, data)

    monkeypatch.setattr(avro.Codec, "_decode_fastavro", spy)
    return calls


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_decode_many_is_decode_of_each(codec: avro.Codec) -> None:
    values = [codec.encode(r) for r in fastavro.utils.generate_many(codec.parsed, 300)]
    expected = per_message(codec, values)
    assert [codec.decode(v) for v in values] == expected
    assert codec.decode_many(values) == expected
    for n in (0, 1, 5):
        assert codec.decode_many(values[:n]) == expected[:n]


@pytest.mark.parametrize("codec", codecs(), ids=lambda c: c.name)
def test_decode_each_keeps_only_the_fields_asked_for(codec: avro.Codec) -> None:
    values = [codec.encode(r) for r in fastavro.utils.generate_many(codec.parsed, 100)]
    names = [f["name"] for f in codec.schema["fields"]]
    for fields in (names[:1], names[1::2], names[-1:]):
        assert codec.decode_each(values,
                                 fields) == [{k: r[k] for k in fields}
                                             for r in per_message(codec,
                                                                  values)]  # type: ignore[index]  # decoded records
    with pytest.raises(SchemaError, match="has no field 'nope'"):
        codec.decode_each(values, ["nope"])


def test_a_clean_batch_takes_the_compiled_path(decode_calls: list[bytes]) -> None:
    codec = avro.codec("prediction")
    values = [codec.encode(r) for r in fastavro.utils.generate_many(codec.parsed, 100)]
    decode_calls.clear()
    assert len(codec.decode_many(values)) == 100
    assert decode_calls == []


def test_several_writer_versions_in_one_batch(decode_calls: list[bytes]) -> None:
    v1 = copy.deepcopy(avro.load_schema("feedback"))
    v2 = copy.deepcopy(v1)
    v2["fields"].append({"name": "comment", "type": ["null", "string"], "default": None})
    v3 = copy.deepcopy(v2)
    v3["fields"].append({"name": "score", "type": "double", "default": 0.5})
    old1, old2, new = avro.Codec(v1), avro.Codec(v2), avro.Codec(v3, writers=[v1, v2])
    values = []
    for i, r in enumerate(fastavro.utils.generate_many(old1.parsed, 120)):
        values.append([old1.encode(r), old2.encode({**r, "comment": f"c{i}"}),
                       new.encode({**r, "comment": None, "score": i / 7})][i % 3])
    decode_calls.clear()
    records = new.decode_many(values)
    # older writers: fastavro resolves
    assert decode_calls == [v for i, v in enumerate(values) if i % 3 != 2]
    assert records == per_message(new, values)
    assert {r["comment"] for r in records[:3]} == {None, "c1"} and records[0]["score"] == 0.5
    assert new.decode_each(values[:3], ["score"]) == [{"score": 0.5}, {"score": 0.5},
                                                      {"score": 2 / 7}]


def test_fastavro_judges_what_the_compiled_reader_refuses(decode_calls: list[bytes]) -> None:
    # A carries a trailing byte (decode ignores it, so does the compiled reader); B lost its last
    # byte: the compiled reader refuses it and fastavro's decode gives the error.
    a, b = pair(1, 2) + b"\x06", pair(4, 5)[:-1]
    values = [pair(i, i) for i in range(40)] + [a, b] + [pair(i, -i) for i in range(40)]
    expected = per_message(PAIR, values)
    decode_calls.clear()
    result = each(PAIR, values)
    assert decode_calls == [b]
    assert result == expected
    assert result[40] == {"a": 1, "b": 2}
    assert [i for i, r in enumerate(result) if isinstance(r, str)] == [41]
    with pytest.raises(SchemaError, match=r"message 41 of 82: corrupt test.Pair message"):
        PAIR.decode_many(values)


def test_a_schema_the_compiler_does_not_handle_is_read_by_fastavro(
        decode_calls: list[bytes]) -> None:
    codec = avro.Codec({"type": "record", "name": "When", "namespace": "test",
                        "fields": [{"name": "at",
                                    "type": {"type": "long", "logicalType": "timestamp-millis"}}]})
    values = [codec.encode(r) for r in fastavro.utils.generate_many(codec.parsed, 5)]
    expected = per_message(codec, values)
    decode_calls.clear()
    assert codec.decode_each(values) == expected
    assert decode_calls == values


@pytest.mark.parametrize("bad", [
    pytest.param(lambda good: good[:-3], id="truncated"),
    pytest.param(lambda good: good[:avro.HEADER_LEN], id="header-only"),
    pytest.param(lambda good: b'{"json": true}', id="foreign"),
    pytest.param(lambda good: b"\xc3\x02" + good[2:], id="bad-magic"),
    pytest.param(lambda good: avro.codec("feedback").encode({
        "feedback_id": "f", "prediction_id": "p", "event_id": None, "label": "1", "value": None,
        "verdict": None, "ts": 1}), id="other-schema"),
    pytest.param(lambda good: None, id="tombstone"),
])
def test_one_bad_message_is_named_and_the_rest_decoded(bad: object) -> None:
    codec = avro.codec("alert")
    values = [codec.encode(r) for r in fastavro.utils.generate_many(codec.parsed, 60)]
    values[17] = bad(values[17])  # type: ignore[operator]  # bytes in the test
    result = each(codec, values)
    assert result == per_message(codec, values)
    assert [i for i, r in enumerate(result) if isinstance(r, str)] == [17]
    with pytest.raises(SchemaError, match=r"^message 17 of 60: "):
        codec.decode_many(values)


def test_an_empty_batch() -> None:
    assert avro.codec("prediction").decode_many([]) == []
    assert avro.codec("prediction").decode_each([]) == []
