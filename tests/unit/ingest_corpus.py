"""Raw ingest messages near every edge of the validation rules, written as bytes.

Events are assembled from JSON text fragments, not from ``orjson.dumps``, so the corpus holds what
JSON encoders never write but producers do send: NaN/Infinity literals, numbers beyond 64 bits,
duplicate keys, escaped key names, lone surrogates, invalid UTF-8, byte order marks, nested junk,
truncated and concatenated documents, and Avro messages. Each case says whether it is *plain*: a
valid JSON event with nothing to explain (the fast path must accept those).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

from loopline import avro
from loopline.spec import Feature, PipelineSpec

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TS_MAX = 253_402_300_799_999
_JUNK = [
    "[]",
    "{}",
    "[1]",
    '{"a":1}',
    "[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]",
    '{"a":{"b":{"c":[null]}}}',
    '"' + "x" * 300 + '"',
]
_NONFINITE = ["NaN", "Infinity", "-Infinity", "-NaN", "nan", "inf"]
_STRINGS = [
    '"c"',
    '""',
    '"ü"',
    '"\\u00fc"',
    '"\\ud83d\\ude00"',
    '"😀"',
    '"a\\"b"',
    '"a\\\\b"',
    '"\\n\\t"',
    '"\\u0000"',
    '"日本語"',
]
_BAD_STRINGS = ['"\\ud800"', '"\\udc00x"', '"\\ud800\\u0041"', '"\\uZZZZ"', '"\\x41"', '"a\nb"']


@dataclass(frozen=True)
class Case:
    """One raw message value and whether it is a plainly valid JSON event."""

    value: bytes | None
    plain: bool


def _num(x: float) -> str:
    """A float as JSON text that parses back to exactly ``x``."""
    return repr(float(x))


def _float_tokens(f: Feature, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(plain valid, valid but not plain, invalid) JSON texts for a float feature."""
    lo, hi = f.min, f.max
    a = -1e6 if lo is None else lo
    b = 1e6 if hi is None else hi
    texts = [
        _num(a),
        _num(b),
        _num((a + b) / 2),
        _num(rng.uniform(a, b)),
        _num(rng.uniform(a, b)),
        f"{rng.uniform(a, b):.17e}",
        f"{rng.uniform(a, b):.3E}",
        f"{rng.uniform(a, b):.3e}",
    ]
    if a <= 0 <= b:
        texts += ["-0.0", "0e0", "0.0", "1e-400", "5e-324"]
    if lo is None and hi is None:
        texts += ["1.7976931348623157e308", "-1.7976931348623157e308"]
    plain = [
        t for t in texts if a <= float(t) <= b
    ]  # rounding of the short forms may leave the range
    # Ints are accepted as floats; exact ints beyond int64 (which orjson reads as floats if they
    # need more than 64 bits) are valid but not plain.
    later = []
    for n in (
        math.ceil(a),
        math.floor(b),
        int((a + b) // 2),
        0,
        _INT64_MAX,
        _INT64_MIN,
        2**63,
        2**64 - 1,
        2**64,
        10**30,
        -(10**30),
    ):
        if a <= n <= b:
            (plain if _INT64_MIN <= n <= _INT64_MAX else later).append(str(n))
    if a <= 0 <= b:
        plain.append("-0")
    bad = [
        "1e400",
        "-1e400",
        *_NONFINITE,
        '"1"',
        '"12.5"',
        "true",
        "false",
        *_JUNK,
        "1.",
        ".5",
        "01",
        "+1",
        "0x10",
        "1e",
        "--1",
    ]
    if lo is not None:
        bad += [
            _num(math.nextafter(lo, -math.inf)),
            _num(lo - 1),
            str(math.floor(lo) - 1),
            str(-(2**64)),
            "-1" + "0" * 30,
        ]
    if hi is not None:
        bad += [
            _num(math.nextafter(hi, math.inf)),
            _num(hi + 1),
            str(math.ceil(hi) + 1),
            str(2**64),
            "1" + "0" * 30,
        ]
    return plain, later, bad


def _int_tokens(f: Feature, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(plain valid, valid but not plain, invalid) JSON texts for an int feature."""
    a = _INT64_MIN if f.min is None else max(_INT64_MIN, math.ceil(f.min))
    b = _INT64_MAX if f.max is None else min(_INT64_MAX, math.floor(f.max))
    plain = [str(a), str(b), str((a + b) // 2), str(rng.randint(a, b)), str(rng.randint(a, b))]
    if a <= 0 <= b:
        plain.append("-0")
    bad = [
        str(a - 1),
        str(b + 1),
        str(2**64),
        str(-(2**64)),
        "1" + "0" * 30,
        "3.0",
        "1e2",
        "3.5",
        "-0.0",
        *_NONFINITE,
        "true",
        "false",
        '"3"',
        *_JUNK,
        "1.7e308",
        "1e400",
    ]
    return plain, [], bad


def _string_tokens(f: Feature, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(plain valid, valid but not plain, invalid) JSON texts for a string feature."""
    if f.values is not None:
        plain = [json.dumps(v) for v in f.values] + [
            json.dumps(v, ensure_ascii=False) for v in f.values
        ]
        bad = [json.dumps(v.lower() if v != v.lower() else v.upper()) for v in f.values]
        bad += [json.dumps(f.values[0] + " "), '""', *_STRINGS[2:5]]
    else:
        plain = [*list(_STRINGS),
                 json.dumps("".join(rng.choice("aZ09 -_ü€") for _ in range(rng.randint(1, 20))),
                            ensure_ascii=rng.random() < 0.5)]
        bad = []
    bad += ["5", "0", "1.5", "true", "false", *_JUNK[:6], *_BAD_STRINGS, *_NONFINITE[:2]]
    return plain, [], bad


def _bool_tokens(f: Feature, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(plain valid, valid but not plain, invalid) JSON texts for a bool feature."""
    return (
        ["true", "false"],
        [],
        ["0", "1", "0.0", '"true"', '"false"', "True", "FALSE", *_JUNK[:4]],
    )


_TOKENS = {
    "float": _float_tokens,
    "int": _int_tokens,
    "string": _string_tokens,
    "bool": _bool_tokens,
}


def _obj(pairs: list[tuple[str, str]], rng: random.Random) -> str:
    """A JSON object from (raw key text, raw value text) pairs, with varying whitespace."""
    sep = rng.choice([",", ", ", " ,\n  ", ","])
    colon = rng.choice([":", ": ", " : ", ":"])
    return "{" + sep.join(f"{k}{colon}{v}" for k, v in pairs) + "}"


def _key(name: str, rng: random.Random, escape_rate: float) -> tuple[str, bool]:
    """A key's JSON text; sometimes with \\u escapes (the same key for a parser, not plain)."""
    if rng.random() < escape_rate:
        i = rng.randrange(len(name))
        return '"' + name[:i] + f"\\u{ord(name[i]):04x}" + name[i + 1 :] + '"', False
    return f'"{name}"', True  # feature names are [A-Za-z0-9_]: nothing to escape


def _features(
    spec: PipelineSpec,
    tokens: dict[str, tuple[list[str], list[str], list[str]]],
    rng: random.Random,
    bad_rate: float,
) -> tuple[str, bool]:
    """The features object's text and whether it is plain."""
    plain = True
    pairs: list[tuple[str, str]] = []
    for f in spec.features:
        good, later, bad = tokens[f.name]
        r = rng.random()
        if r < bad_rate * 0.15:  # missing or null
            if f.required:
                plain = False
            if rng.random() < 0.5:
                continue
            value = "null"
        elif r < bad_rate:
            value = rng.choice(bad)
            plain = False
        elif later and r < bad_rate + 0.03:
            value = rng.choice(later)
            plain = False
        else:
            value = rng.choice(good)
        key, key_plain = _key(f.name, rng, 0.01)
        plain = plain and key_plain
        pairs.append((key, value))
    if rng.random() < 0.04:  # duplicate keys: parsers keep the last one
        name = rng.choice(spec.features).name
        good, _, bad = tokens[name]
        first = rng.choice(good + bad)
        second = rng.choice(good + bad)
        pairs.insert(0, (json.dumps(name), first))
        pairs.append((json.dumps(name), second))
        plain = False
    if rng.random() < 0.05:
        pairs.append(
            (
                rng.choice(['"colour"', '"Amount"', '"features"', '"amount "', '""', '"\\u0000"']),
                rng.choice(['"red"', "1", "null", *_JUNK[:3]]),
            )
        )
        plain = False
    rng.shuffle(pairs) if rng.random() < 0.3 else None
    return _obj(pairs, rng), plain


def _top(
    spec: PipelineSpec,
    tokens: dict[str, tuple[list[str], list[str], list[str]]],
    rng: random.Random,
    bad_rate: float,
    n: int,
) -> tuple[str, bool]:
    """A whole event's text and whether it is plain."""
    features, plain = _features(spec, tokens, rng, bad_rate)
    r = rng.random()
    if r < bad_rate * 0.05:
        features, plain = rng.choice(["null", "[]", '"x"', "5", "{}", "true", *_JUNK[:3]]), False
    pairs = [('"features"', features)]
    if rng.random() < 0.4:
        if rng.random() < bad_rate:
            pairs.append(
                (
                    '"event_id"',
                    rng.choice(['""', "5", "true", "[]", '{"id":1}', "1.5", '"\\ud800"']),
                )
            )
            plain = False
        else:
            pairs.append(
                (
                    '"event_id"',
                    rng.choice(
                        [
                            f'"e-{n}"',
                            f'"ü-{n}"',
                            '"\\u00e9"',
                            "null",
                            json.dumps("x" * rng.randint(1, 200)),
                        ]
                    ),
                )
            )
    if rng.random() < 0.3:
        if rng.random() < bad_rate:
            pairs.append(('"key"', rng.choice(["5", "true", "[]", "{}", "1.5", '"\\udc00"'])))
            plain = False
        else:
            pairs.append(('"key"', rng.choice(['"k"', '""', '"ключ"', "null", f'"k{n % 7}"'])))
    if rng.random() < 0.5:
        r = rng.random()
        if r < bad_rate:
            pairs.append(
                (
                    '"ts"',
                    rng.choice(
                        [
                            "-1",
                            str(_TS_MAX + 1),
                            "1.5",
                            "1.7e12",
                            "1700000000000.0",
                            '"1700000000000"',
                            "true",
                            "[]",
                            '"yesterday"',
                            '"2024-05-01T12:00:00"',
                            '"2024-13-01T00:00:00Z"',
                            '"1969-12-31T23:59:59Z"',
                            str(2**64),
                            "NaN",
                        ]
                    ),
                )
            )
            plain = False
        elif r < bad_rate + 0.1:  # ISO timestamps are valid, but need parsing: not plain
            pairs.append(
                (
                    '"ts"',
                    rng.choice(
                        [
                            '"2024-05-01T12:00:00Z"',
                            '"2024-05-01T12:00:00.250+02:00"',
                            '"1970-01-01T00:00:00+00:00"',
                            '"9999-12-31T23:59:59.999Z"',
                        ]
                    ),
                )
            )
            plain = False
        else:
            pairs.append(
                (
                    '"ts"',
                    rng.choice(
                        [
                            "0",
                            str(_TS_MAX),
                            "1700000000000",
                            str(rng.randint(0, _TS_MAX)),
                            "null",
                            "-0",
                        ]
                    ),
                )
            )
    if rng.random() < 0.03:
        pairs.append(
            (
                rng.choice(['"extra"', '"Features"', '"ts "', '"event_id\\u0000"']),
                rng.choice(["1", "null", '"x"', *_JUNK[:3]]),
            )
        )
        plain = False
    if rng.random() < 0.02:  # a duplicated top-level field
        pairs.append(rng.choice(pairs))
        plain = False
    rng.shuffle(pairs) if rng.random() < 0.3 else None
    return _obj(pairs, rng), plain


def _mangle(text: bytes, rng: random.Random) -> bytes:
    """Whole-document damage: truncation, trailing data, BOM, invalid UTF-8, another type."""
    choice = rng.randrange(10)
    if choice == 0:
        return text[: rng.randrange(len(text))]
    if choice == 1:
        return text + rng.choice([b"x", b"{}", b" ,", b"\x00", text])
    if choice == 2:
        return b"\xef\xbb\xbf" + text
    if choice == 3:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf"]) + text[i:]
    if choice == 4:
        return b"[" + text + b"]"
    if choice == 5:
        return rng.choice([b"", b" ", b"null", b"5", b'"x"', b"true", b"[]", b"{}", b"NaN"])
    if choice == 6:
        return b"[" * 2000 + b"]" * 2000
    if choice == 7:
        return b'{"features":' * 300 + b"{}" + b"}" * 300
    if choice == 8:
        return text.replace(b":", b"=", 1)
    return text.upper()


def corpus(spec: PipelineSpec, n: int, seed: int, bad_rate: float = 0.2) -> list[Case]:
    """``n`` raw messages for ``spec``: plain events, valid ones for the full check, bad input."""
    rng = random.Random(seed)
    codec = avro.Codec(spec.raw_schema())
    tokens = {f.name: _TOKENS[f.type](f, rng) for f in spec.features}
    out: list[Case] = []
    for i in range(n):
        r = rng.random()
        if r < 0.005:
            out.append(Case(None, False))  # a tombstone
            continue
        if r < 0.02:  # Avro: never JSON's fast path
            record = json.loads(
                _top(
                    spec,
                    {
                        f.name: (t[0], [], [])
                        for f, t in ((f, tokens[f.name]) for f in spec.features)
                    },
                    rng,
                    0.0,
                    i,
                )[0]
            )
            record.setdefault("event_id", None)
            record.setdefault("key", None)
            record["ts"] = record.get("ts") if isinstance(record.get("ts"), int) else None
            record["features"] = {
                f.name: _avro_value(f, record["features"].get(f.name)) for f in spec.features
            }
            try:
                data = codec.encode(record)
            except Exception:  # noqa: BLE001 - a corpus value Avro cannot hold: skip it
                continue
            out.append(
                Case(data if rng.random() < 0.8 else data[: rng.randrange(len(data))], False)
            )
            continue
        # Most events are clean or have one problem; some have many.
        text, plain = _top(spec, tokens, rng, bad_rate * rng.choice((0.0, 0.0, 0.1, 0.3, 1.0)), i)
        data = text.encode("utf-8", "surrogatepass")
        if r < 0.08:
            data, plain = _mangle(data, rng), False
        elif r < 0.1:
            data = rng.choice([b" ", b"\n", b"\t", b"\r\n"]) + data + rng.choice([b"", b" ", b"\n"])
        out.append(Case(data, plain and len(data) <= spec.max_message_bytes))
    return out


def _avro_value(f: Feature, value: object) -> object:
    """A corpus value as Avro holds it (floats for float features)."""
    if value is None:
        return None
    if f.type == "float":
        return float(value)  # type: ignore[arg-type]  # a corpus value
    return value


def edge_spec() -> PipelineSpec:
    """A spec with what the example pipelines lack: unbounded and one-sided numbers, fractional
    bounds of an int, a float key, feature names that are Python keywords or start with '_'."""
    from loopline.spec import parse_spec

    return parse_spec(
        {
            "name": "edge",
            "key": "x",
            "unknown_fields": "reject",
            "features": [
                {"name": "x", "type": "float"},
                {"name": "lo_only", "type": "float", "min": -2.5, "required": False},
                {"name": "n", "type": "int"},
                {"name": "frac", "type": "int", "min": 0.5, "max": 10.5, "required": False},
                {"name": "class", "type": "string"},
                {"name": "_private", "type": "bool", "required": False},
                {"name": "tag", "type": "string", "values": ["a", "b", "ü"], "required": False},
                {"name": "big", "type": "float", "min": -1e300, "max": 1e300},
                {"name": "hi_only", "type": "int", "max": -3, "required": False},
            ],
        }
    )
