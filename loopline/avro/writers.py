"""Avro writers compiled to Python source: the feature-event encoder on ingest's hot path.

Generated once per features schema as straight-line Python (no per-feature loop, no generic
schema walk), which is what keeps ingest close to the raw consume->produce rate. It writes exactly
the bytes ``Codec(features_schema).encode`` writes (tests compare them);
:func:`features_encoder_source` prints the generated code for debugging.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

from loopline.avro.codecs import MAGIC, Codec

_SMALL = [bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)]
# The low 14 bits of a larger number: two bytes, both with the continuation bit set.
_LOW = [bytes([(n & 0x7F) | 0x80, (n >> 7) | 0x80]) for n in range(1 << 14)]
_pack_double = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    """Avro variable-length encoding of an already zig-zagged (non-negative) integer."""
    if n < 16384:
        return _SMALL[n]
    if n < 268435456:
        return _LOW[n & 0x3FFF] + _SMALL[n >> 14]
    if n < 4398046511104:  # 42 bits: epoch milliseconds until the year 2109
        return _LOW[n & 0x3FFF] + _LOW[(n >> 14) & 0x3FFF] + _SMALL[n >> 28]
    return _LOW[n & 0x3FFF] + _LOW[(n >> 14) & 0x3FFF] + varint(n >> 28)


def long_bytes(value: int) -> bytes:
    """Avro encoding of an int/long."""
    return varint((value << 1) ^ (value >> 63))


def string_bytes(value: str) -> bytes:
    """Avro encoding of a string."""
    data = value.encode()
    return varint(len(data) << 1) + data


_KINDS = {"double": "float", "long": "int", "string": "string", "boolean": "bool"}


def _feature_fields(schema: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(name, kind, required) of every field of the schema's ``features`` record."""
    for f in schema["fields"]:
        if f["name"] == "features":
            out = []
            for field in f["type"]["fields"]:
                t = field["type"]
                required = not isinstance(t, list)
                avro_type = t if required else next(x for x in t if x != "null")
                if avro_type not in _KINDS:
                    raise ValueError(f"feature {field['name']!r} has Avro type {avro_type!r}, which the "
                                     "features encoder does not write")
                out.append((field["name"], _KINDS[avro_type], required))
            return out
    raise ValueError(f"schema {schema.get('name')} has no 'features' record")


def features_encoder_source(schema: dict[str, Any], attributes: Mapping[str, str] | None = None) -> str:
    """Python source of the generated ``encode_features(f)`` of a features (or raw) schema.

    ``f`` is a dict by feature name, or with ``attributes`` (feature name -> attribute) an object
    such as the fast path's msgspec struct, whose features are read as attributes.
    """
    if attributes is None:
        lines = ["def encode_features(f):", "    g = f.get", "    out = []", "    a = out.append"]
    else:
        lines = ["def encode_features(f):", "    out = []", "    a = out.append"]
    for name, kind, required in _feature_fields(schema):
        if attributes is None:
            lines.append(f"    v = g({name!r})")
        else:
            attr = attributes[name]
            if not attr.isidentifier():
                raise ValueError(f"attribute {attr!r} of feature {name!r} is not an identifier")
            lines.append(f"    v = f.{attr}")
        indent = "    "
        if not required:
            lines += ["    if v is None:", "        a(b'\\x00')", "    else:", "        a(b'\\x02')"]
            indent = "        "
        if kind == "float":
            lines.append(f"{indent}a(_double(v))")
        elif kind == "int":
            lines.append(f"{indent}a(_varint((v << 1) ^ (v >> 63)))")
        elif kind == "string":
            lines += [f"{indent}v = v.encode()", f"{indent}a(_varint(len(v) << 1))", f"{indent}a(v)"]
        else:
            lines.append(f"{indent}a(b'\\x01' if v else b'\\x00')")
    lines.append("    return _join(out)")
    return "\n".join(lines)


def _compile(schema: dict[str, Any], attributes: Mapping[str, str] | None) -> Callable[[Any], bytes]:
    env: dict[str, Any] = {"_varint": varint, "_double": _pack_double, "_join": b"".join}
    source = features_encoder_source(schema, attributes)
    exec(compile(source, "<encode_features>", "exec"), env)  # noqa: S102 - generated above
    return env["encode_features"]  # type: ignore[no-any-return]


class FeaturesEncoder:
    """Writes ``FeatureEvent`` records of one features schema in single-object encoding, fast."""

    def __init__(self, schema: dict[str, Any], attributes: Mapping[str, str] | None = None) -> None:
        self.header = MAGIC + Codec(schema).fingerprint
        #: Features by name (a dict) to their Avro body.
        self.encode_features: Callable[[dict[str, Any]], bytes] = _compile(schema, None)
        #: The same from an object with the features as ``attributes`` (the fast path's struct).
        self.encode_struct: Callable[[Any], bytes] | None = (
            _compile(schema, attributes) if attributes is not None else None)
        self._topics: dict[str, bytes] = {}

    def source_prefix(self, topic: str) -> bytes:
        """The encoded source topic (cached: one per raw topic)."""
        cached = self._topics.get(topic)
        if cached is None:
            cached = self._topics[topic] = string_bytes(topic)
        return cached

    def encode(self, event_id: str, key: str | None, ts: int, ingested_at: bytes, topic: bytes,
               partition: int, offset: int, features: bytes, content_hash: str) -> bytes:
        """One record from its parts; ``ingested_at``, ``topic`` and ``features`` come pre-encoded."""
        eid = event_id.encode()
        if key is None:
            key_part = b"\x00"
        else:
            k = key.encode()
            key_part = b"\x02" + varint(len(k) << 1) + k
        content = content_hash.encode()
        return b"".join((self.header, varint(len(eid) << 1), eid, key_part, varint((ts << 1) ^ (ts >> 63)),
                         ingested_at, topic, varint(partition << 1), varint(offset << 1), features,
                         b"\x02", varint(len(content) << 1), content))
