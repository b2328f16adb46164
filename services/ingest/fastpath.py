"""The hot path of ingest, specialised per pipeline spec: an Avro encoder for feature events.

Generated once per spec as straight-line Python (no per-feature loop, no generic schema walk),
which is what keeps ingest close to the raw consume->produce rate. It writes exactly the bytes
``avro.Codec(spec.features_schema()).encode`` writes (tests compare them). Its twin, the fast
accept check, lives with the validator in :mod:`loopline.validation_fastpath`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

from loopline import avro
from loopline.spec import PipelineSpec

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


_VARIANT = {c: "89ab"[int(c, 16) & 0x3] for c in "0123456789abcdef"}
_sha1 = hashlib.sha1


def fast_uuid5(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(UUID(bytes=namespace), name))`` without building UUID objects."""
    x = _sha1(namespace + name.encode()).hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


def _encoder_source(spec: PipelineSpec) -> tuple[str, dict[str, Any]]:
    env: dict[str, Any] = {"_varint": varint, "_long": long_bytes, "_double": _pack_double,
                           "_join": b"".join}
    lines = ["def encode_features(f):", "    g = f.get", "    out = []", "    a = out.append"]
    for feat in spec.features:
        lines.append(f"    v = g({feat.name!r})")
        indent = "    "
        if not feat.required:
            lines += ["    if v is None:", "        a(b'\\x00')", "    else:", "        a(b'\\x02')"]
            indent = "        "
        if feat.type == "float":
            lines.append(f"{indent}a(_double(v))")
        elif feat.type == "int":
            lines.append(f"{indent}a(_varint((v << 1) ^ (v >> 63)))")
        elif feat.type == "string":
            lines += [f"{indent}v = v.encode()", f"{indent}a(_varint(len(v) << 1))", f"{indent}a(v)"]
        else:
            lines.append(f"{indent}a(b'\\x01' if v else b'\\x00')")
    lines.append("    return _join(out)")
    return "\n".join(lines), env


class FeaturesEncoder:
    """Writes ``FeatureEvent`` records of one spec in single-object encoding, fast."""

    def __init__(self, spec: PipelineSpec) -> None:
        codec = avro.Codec(spec.features_schema())
        self.header = avro.MAGIC + codec.fingerprint
        source, env = _encoder_source(spec)
        exec(compile(source, f"<encode_features {spec.name}>", "exec"), env)  # noqa: S102
        self.encode_features: Callable[[dict[str, Any]], bytes] = env["encode_features"]
        self._topics: dict[str, bytes] = {}

    def source_prefix(self, topic: str) -> bytes:
        """The encoded source topic (cached: one per raw topic)."""
        cached = self._topics.get(topic)
        if cached is None:
            cached = self._topics[topic] = string_bytes(topic)
        return cached

    def encode(self, event_id: str, key: str | None, ts: int, ingested_at: bytes, topic: bytes,
               partition: int, offset: int, features: dict[str, Any]) -> bytes:
        """One record; ``ingested_at`` and ``topic`` come pre-encoded (they repeat across a batch)."""
        eid = event_id.encode()
        if key is None:
            key_part = b"\x00"
        else:
            k = key.encode()
            key_part = b"\x02" + varint(len(k) << 1) + k
        return b"".join((self.header, varint(len(eid) << 1), eid, key_part, varint((ts << 1) ^ (ts >> 63)),
                         ingested_at, topic, varint(partition << 1), varint(offset << 1),
                         self.encode_features(features)))
