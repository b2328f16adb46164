"""Compiled Avro readers: the same records as fastavro, and a refusal wherever they might differ."""

from __future__ import annotations

import io
import random
from typing import Any

import fastavro
import fastavro.utils
import pytest

from loopline import avro
from loopline.avro.readers import Unsupported, compile_reader
from loopline.spec import parse_spec

EVERY_TYPE = {
    "type": "record", "name": "Every", "namespace": "test",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "flag", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "raw", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "color",
         "type": {"type": "enum", "name": "Color", "symbols": ["red", "green", "blue"]}},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "code",
         "type": {"type": "enum", "name": "Code", "symbols": [f"c{i}" for i in range(100)]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "weights", "type": {"type": "map", "values": "double"}},
        {"name": "pos", "type": {"type": "record", "name": "Pos",
                                 "fields": [{"name": "x", "type": "int"},
                                            {"name": "y", "type": ["null", "double"]}]}},
        {"name": "again", "type": "Pos"},
        {"name": "many",
         "type": ["null", "string", "long", "Color", {"type": "array", "items": "Pos"}]},
        {"name": "nested",
         "type": {"type": "map", "values": {"type": "array", "items": ["null", "Hash"]}}},
    ],
}
SPEC = parse_spec({"name": "demo", "features": [
    {"name": "x", "type": "float"}, {"name": "n", "type": "int", "required": False},
    {"name": "ok", "type": "bool"}, {"name": "tag", "type": "string", "required": False}]})


def schemas() -> list[dict[str, Any]]:
    fixed = [avro.codec(k).schema
             for k in ("prediction", "feedback", "deadletter", "alert", "registry")]
    return [EVERY_TYPE, SPEC.features_schema(), SPEC.raw_schema(), *fixed]


def expanded(schema: dict[str, Any]) -> dict[str, Any]:
    return fastavro.parse_schema(schema, named_schemas=avro.named_types(),
                                 expand=True)  # type: ignore[no-any-return]  # fastavro: any schema form


def body(parsed: dict[str, Any], record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, record)
    return out.getvalue()


def fastavro_reads(parsed: dict[str, Any], data: bytes) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(data), parsed, None)


@pytest.mark.parametrize("schema", schemas(), ids=lambda s: s["name"])
def test_reads_what_fastavro_reads(schema: dict[str, Any]) -> None:
    parsed = expanded(schema)
    read = compile_reader(parsed)
    for record in fastavro.utils.generate_many(parsed, 300):
        data = body(parsed, record)
        got, end = read(b"xy" + data, 2)  # from an offset, as after a message header
        assert got == fastavro_reads(parsed, data) and end == len(data) + 2


@pytest.mark.parametrize("schema", schemas(), ids=lambda s: s["name"])
def test_skipped_fields_leave_the_rest_as_read(schema: dict[str, Any]) -> None:
    parsed = expanded(schema)
    names = [f["name"] for f in parsed["fields"]]
    rng = random.Random(7)
    for _ in range(5):
        keep = rng.sample(names, rng.randint(0, len(names)))
        read = compile_reader(parsed, keep)
        for record in fastavro.utils.generate_many(parsed, 50):
            data = body(parsed, record)
            full = fastavro_reads(parsed, data)
            assert read(data, 0) == ({k: full[k] for k in names if k in keep}, len(data))


@pytest.mark.parametrize("schema", schemas(), ids=lambda s: s["name"])
def test_damaged_bodies_are_refused_or_read_as_fastavro_reads_them(schema: dict[str, Any]) -> None:
    parsed = expanded(schema)
    read = compile_reader(parsed)
    rng = random.Random(11)
    refused = 0
    for record in fastavro.utils.generate_many(parsed, 150):
        data = bytearray(body(parsed, record))
        for _ in range(4):
            damaged = bytearray(data)
            cut = rng.randrange(len(damaged) + 1)
            how = rng.choice(("flip", "truncate", "insert", "high"))
            if how == "truncate":
                del damaged[cut:]
            elif how == "insert":
                damaged[cut:cut] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            elif damaged:
                damaged[min(cut, len(damaged) - 1)] = (rng.randrange(128, 256) if how == "high"
                                                       else rng.randrange(256))
            try:
                got, end = read(bytes(damaged), 0)
            except Exception:  # noqa: BLE001 - any refusal is fine: fastavro then judges
                refused += 1
                continue
            if end > len(damaged):  # the caller refuses a record that ran past the body
                refused += 1
                continue
            assert got == fastavro_reads(parsed, bytes(damaged)), (how, cut)
    assert refused  # the damage did reach the reader's checks


def test_negative_block_counts_carry_a_byte_size() -> None:
    schema = {"type": "record", "name": "M", "fields": [
        {"name": "m", "type": {"type": "map", "values": "long"}},
        {"name": "a", "type": {"type": "array", "items": "long"}}]}
    # map: a block of -2 entries (4 bytes) then 0; array: -1 item (1 byte), 1 item, then 0
    data = bytes([3, 8, 2, 0x61, 2, 2, 0x62, 4, 0, 1, 2, 6, 2, 8, 0])
    assert compile_reader(schema)(data, 0) == ({"m": {"a": 1, "b": 2}, "a": [3, 4]}, len(data))
    assert fastavro_reads(fastavro.parse_schema(schema), data) == {"m": {"a": 1, "b": 2},
                                                                   "a": [3, 4]}


def test_refuses_what_fastavro_would_read_differently() -> None:
    read = compile_reader({"type": "record", "name": "L",
                           "fields": [{"name": "v", "type": "long"}]})
    assert read(bytes([0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
                0)[0] == {"v": 2**63 - 1}
    with pytest.raises(ValueError, match="beyond 64 bits"):
        read(bytes([0xFF] * 9 + [0x7F]), 0)
    padded = bytes([0x80] * 12 + [0x00])  # zero written long-hand: both read 0
    assert read(padded, 0) == ({"v": 0}, 13)
    assert fastavro_reads(fastavro.parse_schema({"type": "record", "name": "L", "fields": [
        {"name": "v", "type": "long"}]}), padded) == {"v": 0}
    read_s = compile_reader({"type": "record", "name": "S",
                             "fields": [{"name": "s", "type": "string"}]})
    with pytest.raises(ValueError, match="negative length"):
        read_s(bytes([0x01]) + b"abc", 0)


def test_what_it_cannot_compile_is_named() -> None:
    with pytest.raises(Unsupported, match="recursive record Node"):
        compile_reader({"type": "record", "name": "Node", "fields": [
            {"name": "next", "type": ["null", "Node"]}]})
    with pytest.raises(Unsupported, match="logical type decimal"):
        compile_reader({"type": "record", "name": "P", "fields": [
            {"name": "p", "type": {"type": "bytes", "logicalType": "decimal", "precision": 4}}]})
