"""Compiled writers of whole records write exactly what fastavro writes, or leave it to fastavro."""

from __future__ import annotations

import random
from typing import Any

import pytest

from loopline import avro
from loopline.avro.writers import Unsupported, compile_writer, record_encoder
from loopline.errors import SchemaError

_INT64_MAX = 2**63 - 1


def dead_letters(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """Dead-letter records with every optional field present and absent, and extreme values."""
    rng = random.Random(seed)
    texts = ["", "x", "ü€😀", "a" * 300, "line\nbreak", "\x00"]
    longs = [0, 1, -1, 63, 64, 8191, 8192, 2**31, 2**40, _INT64_MAX, -(2**63)]
    out = []
    for i in range(n):
        out.append(
            {
                "original": rng.choice(
                    [b"", b"\x00\xff", bytes(rng.randrange(256) for _ in range(rng.randrange(400)))]
                ),
                "original_key": rng.choice([None, b"", b"k", bytes(range(256))]),
                "source": {
                    "topic": rng.choice(["loopline.fraud.raw", "ü", ""]),
                    "partition": rng.choice([0, 1, 2**31 - 1]),
                    "offset": rng.choice(longs),
                },
                "source_timestamp": rng.choice([None, *longs]),
                "field": rng.choice([None, *texts]),
                "rule": rng.choice(texts),
                "message": rng.choice(texts) * rng.randrange(1, 3),
                "service": rng.choice(["ingest", "inference", ""]),
                "at": rng.choice(longs),
                "deadletter_id": rng.choice([None, f"{i:032x}", ""]),
            }
        )
    return out


def test_dead_letter_writer_matches_fastavro() -> None:
    codec = avro.codec("deadletter")
    encode = record_encoder(codec)
    assert encode is not codec.encode  # the dead-letter schema compiles
    for record in dead_letters(3000):
        assert encode(record) == codec.encode(record), record


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("original", "text, not bytes"),
        ("rule", b"bytes, not text"),
        ("at", 1.5),
        ("at", 2**63),
        ("source_timestamp", "yesterday"),
        ("field", 5),
        ("original_key", "str key"),
        ("message", None),
    ],
)
def test_records_the_writer_cannot_take_are_judged_by_fastavro(field: str, value: Any) -> None:
    codec = avro.codec("deadletter")
    encode = record_encoder(codec)
    record = {**dead_letters(1)[0], field: value}
    try:
        expected: bytes | type[Exception] = codec.encode(record)
    except (SchemaError, OverflowError) as e:  # fastavro's own OverflowError, unwrapped by Codec
        expected = type(e)
    if isinstance(expected, bytes):
        assert encode(record) == expected
    else:
        with pytest.raises(expected):
            encode(record)


def test_missing_field_with_a_default_is_written_as_fastavro_writes_it() -> None:
    codec = avro.codec("deadletter")
    record = dead_letters(1)[0]
    del record["deadletter_id"]
    assert record_encoder(codec)(record) == codec.encode(record)


def test_unsupported_types_are_refused_at_compile_time() -> None:
    with pytest.raises(Unsupported):
        compile_writer(
            {
                "type": "record",
                "name": "A",
                "fields": [{"name": "m", "type": {"type": "map", "values": "long"}}],
            }
        )
    with pytest.raises(Unsupported):
        compile_writer(
            {"type": "record", "name": "B", "fields": [{"name": "u", "type": ["string", "long"]}]}
        )


def test_the_compiled_dead_letter_writer_can_be_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from loopline.avro.__main__ import main

    main(["deadletter"])
    printed = capsys.readouterr().out
    assert "# compiled writer of loopline.DeadLetter" in printed and "def write(r):" in printed
