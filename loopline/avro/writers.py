"""Avro writers compiled to Python source: the feature-event encoder on ingest's hot path.

Generated once per features schema as straight-line Python (no per-feature loop, no generic
schema walk), which is what keeps ingest close to the raw consume->produce rate. It writes exactly
the bytes ``Codec(features_schema).encode`` writes (tests compare them);
:func:`features_encoder_source` prints the generated code for debugging.
"""

from __future__ import annotations

import hashlib
import struct
from binascii import hexlify
from collections.abc import Callable, Mapping
from typing import Any

from loopline.avro.codecs import MAGIC, Codec, parse_record
from loopline.avro.readers import Unsupported

_SMALL = [bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(1 << 14)]
# The low 14 bits of a larger number: two bytes, both with the continuation bit set.
_LOW = [bytes([(n & 0x7F) | 0x80, (n >> 7) | 0x80]) for n in range(1 << 14)]


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
                    raise ValueError(f"feature {field['name']!r} has Avro type {avro_type!r}, "
                                     "which the features encoder does not write")
                out.append((field["name"], _KINDS[avro_type], required))
            return out
    raise ValueError(f"schema {schema.get('name')} has no 'features' record")


def _varint_expr(n: str) -> str:
    """An expression: the varint of the (zig-zagged) int named ``n``, looked up when small."""
    return f"(_SMALL[{n}] if {n} < 16384 else _varint({n}))"


def _body(schema: dict[str, Any], attributes: Mapping[str, str] | None) -> tuple[list[str], str]:
    """Statements and expression of the ``features`` body (:func:`features_encoder_source`)."""
    lines = [] if attributes is not None else ["    g = f.get"]
    parts: list[str] = []
    doubles: list[str] = []  # a run of required doubles, packed together

    def flush_doubles() -> None:
        if doubles:
            parts.append(f"_pack{len(doubles)}({', '.join(doubles)})")
            doubles.clear()

    for i, (name, kind, required) in enumerate(_feature_fields(schema)):
        if attributes is None:
            read = f"g({name!r})"
        else:
            attr = attributes[name]
            if not attr.isidentifier():
                raise ValueError(f"attribute {attr!r} of feature {name!r} is not an identifier")
            read = f"f.{attr}"
        if kind == "float" and required:
            doubles.append(read)
            continue
        flush_doubles()
        v, z = f"v{i}", f"z{i}"
        if required:
            if kind == "int":
                lines += [f"    {v} = {read}", f"    {z} = ({v} << 1) ^ ({v} >> 63)"]
                parts.append(_varint_expr(z))
            elif kind == "string":
                lines += [f"    {v} = {read}.encode()", f"    {z} = len({v}) << 1"]
                parts += [_varint_expr(z), v]
            else:
                parts.append(f"(b'\\x01' if {read} else b'\\x00')")
            continue
        # Optional: the union's branch (0: null, 1: the value), then the value.
        lines += [f"    {v} = {read}", f"    if {v} is None:", f"        {v} = b'\\x00'",
                  "    else:"]
        if kind == "float":
            lines.append(f"        {v} = b'\\x02' + _pack1({v})")
        elif kind == "int":
            lines += [f"        {z} = ({v} << 1) ^ ({v} >> 63)",
                      f"        {v} = b'\\x02' + {_varint_expr(z)}"]
        elif kind == "string":
            lines += [f"        {v} = {v}.encode()", f"        {z} = len({v}) << 1",
                      f"        {v} = b'\\x02' + {_varint_expr(z)} + {v}"]
        else:
            lines.append(f"        {v} = b'\\x02\\x01' if {v} else b'\\x02\\x00'")
        parts.append(v)
    flush_doubles()
    return lines, f"_join(({', '.join(parts)},))" if parts else "b''"


def features_encoder_source(schema: dict[str, Any],
                            attributes: Mapping[str, str] | None = None) -> str:
    """Python source of the generated ``encode_features(f)`` and ``encode_event(f, ...)``.

    ``f`` is a dict by feature name, or with ``attributes`` (feature name -> attribute) an object
    such as the fast path's msgspec struct, whose features are read as attributes. The body is
    one ``b"".join`` of a tuple: varints of small numbers are table look-ups, runs of required
    doubles one ``struct.pack`` (a call per value would cost as much as the rest).
    ``encode_event`` writes the whole ``FeatureEvent`` (see :meth:`FeaturesEncoder.event`).
    """
    lines, body = _body(schema, attributes)
    return "\n".join([
        "def encode_features(f):", *lines, f"    return {body}", "",
        "def encode_event(f, event_id, key, ts, middle, partition, offset):", *lines,
        f"    body = {body}",
        "    h = _blake()",
        "    h.update((key or b'') + b'\\x00' + body)",
        "    c = _hexlify(h.digest())",
        "    n = len(event_id) << 1",
        "    if key is None:",
        "        key = b'\\x00'",
        "    else:",
        "        k = len(key) << 1",
        f"        key = b'\\x02' + {_varint_expr('k')} + key",
        "    partition <<= 1",
        # Epoch milliseconds (zig-zagged: 29 to 42 bits) and offsets below 2**27: their varints
        # from the tables, without a call; anything else through _varint.
        "    z = (ts << 1) ^ (ts >> 63)",
        "    if 268435456 <= z < 4398046511104:",
        "        z = _LOW[z & 16383] + _LOW[(z >> 14) & 16383] + _SMALL[z >> 28]",
        "    else:",
        "        z = _varint(z)",
        "    offset <<= 1",
        "    if offset < 16384:",
        "        offset = _SMALL[offset]",
        "    elif offset < 268435456:",
        "        offset = _LOW[offset & 16383] + _SMALL[offset >> 14]",
        "    else:",
        "        offset = _varint(offset)",
        # The content hash is 24 hex digits: union branch 1, then the length 24 (0x30).
        "    return _join((_header, " + _varint_expr("n") + ", event_id, key, z, middle, "
        + _varint_expr("partition") + ", offset, body, b'\\x02\\x30', c)), c",
    ])


def content_digest(key: bytes, features: bytes) -> bytes:
    """The ``content_hash`` of a feature event, as ASCII: blake2b-96 of the UTF-8 key (empty if
    none), a zero byte and the encoded features, in hex."""
    h = _BLAKE.copy()
    h.update(key + b"\0" + features)
    return hexlify(h.digest())


# Copying a prepared hash skips blake2b's parameter parsing, a third of its cost on tiny inputs.
_BLAKE = hashlib.blake2b(digest_size=12)


def _compile(schema: dict[str, Any], attributes: Mapping[str, str] | None,
             header: bytes) -> tuple[Callable[..., bytes], Callable[..., tuple[bytes, bytes]]]:
    fields = _feature_fields(schema)
    env: dict[str, Any] = {"_varint": varint, "_SMALL": _SMALL, "_LOW": _LOW, "_join": b"".join,
                           "_header": header, "_blake": _BLAKE.copy, "_hexlify": hexlify}
    env.update({f"_pack{n}": struct.Struct("<" + "d" * n).pack for n in range(1, len(fields) + 1)})
    source = features_encoder_source(schema, attributes)
    exec(compile(source, "<encode_features>", "exec"), env)  # noqa: S102 - generated above
    return env["encode_features"], env["encode_event"]


class FeaturesEncoder:
    """Writes ``FeatureEvent`` records of one features schema in single-object encoding, fast."""

    def __init__(self, schema: dict[str, Any], attributes: Mapping[str, str] | None = None) -> None:
        self.header = MAGIC + Codec(schema).fingerprint
        #: Features by name (a dict) to their Avro body.
        self.encode_features: Callable[[dict[str, Any]], bytes]
        #: ``event(features, event_id, key, ts, middle, partition, offset) -> (record,
        #: content_hash)``: the whole record, and its content hash (:func:`content_digest` of the
        #: key and the encoded features). ``event_id`` and ``key`` (or None) are UTF-8 bytes,
        #: ``middle`` is ``ingested_at`` and the source topic pre-encoded (:meth:`source_prefix`).
        self.event: Callable[..., tuple[bytes, bytes]]
        self.encode_features, self.event = _compile(schema, None, self.header)
        #: The same two from an object with the features as ``attributes`` (msgspec's struct).
        self.encode_struct: Callable[[Any], bytes] | None = None
        self.struct_event: Callable[..., tuple[bytes, bytes]] | None = None
        if attributes is not None:
            self.encode_struct, self.struct_event = _compile(schema, attributes, self.header)
        self._topics: dict[str, bytes] = {}

    def source_prefix(self, topic: str) -> bytes:
        """The encoded source topic (cached: one per raw topic)."""
        cached = self._topics.get(topic)
        if cached is None:
            cached = self._topics[topic] = string_bytes(topic)
        return cached

    def encode(self, event_id: str, key: str | None, ts: int, ingested_at: bytes, topic: bytes,
               partition: int, offset: int, features: bytes, content_hash: str) -> bytes:
        """One record from its parts; ``ingested_at``, ``topic`` and ``features`` pre-encoded.

        (Ingest writes records with :attr:`event` or :attr:`struct_event`, which also encode the
        features and hash them; this is the plain form, for tools and tests.)
        """
        eid = event_id.encode()
        key_part = b"\x00" if key is None else b"\x02" + string_bytes(key)
        return b"".join((self.header, varint(len(eid) << 1), eid, key_part, long_bytes(ts),
                         ingested_at, topic, long_bytes(partition), long_bytes(offset), features,
                         b"\x02", string_bytes(content_hash)))


# --- compiled writers of whole records (dead letters) -----------------------------------------

_ZERO, _ONE = b"\x00", b"\x02"
_WRITABLE = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


def writer_source(schema: dict[str, Any]) -> str:
    """Python source of ``write(r) -> bytes``: the Avro body of a record of ``schema``, as fastavro
    writes it. ``schema`` is expanded (named types inlined, fastavro.parse_schema(expand=True));
    primitives, records and unions of null with one other type only, else :class:`Unsupported`."""
    lines = ["def write(r):", "    out = []", "    a = out.append"]
    count = 0

    def value(depth: int, kind: Any, read: str) -> None:
        nonlocal count, lines
        pad = "    " * depth
        if isinstance(kind, dict) and kind.get("logicalType"):
            raise Unsupported(f"logical type {kind['logicalType']}")
        if isinstance(kind, dict) and kind["type"] in _WRITABLE:
            kind = kind["type"]
        if isinstance(kind, list):
            if len(kind) != 2 or "null" not in kind:
                raise Unsupported(f"union {kind}")
            count += 1
            v, null_first = f"u{count}", kind[0] == "null"
            other = kind[1] if null_first else kind[0]
            # the branch index, zig-zagged
            null, some = (_ZERO, _ONE) if null_first else (_ONE, _ZERO)
            lines.extend([f"{pad}{v} = {read}", f"{pad}if {v} is None:", f"{pad}    a({null!r})",
                          f"{pad}else:", f"{pad}    a({some!r})"])
            value(depth + 1, other, v)
        elif kind == "null":
            pass
        elif kind == "boolean":
            lines.append(f"{pad}a(b'\\x01' if {read} else b'\\x00')")
        elif kind in ("int", "long"):
            count += 1
            n = f"n{count}"
            # fastavro refuses what does not fit 64 bits: let it say so
            lines += [f"{pad}{n} = {read}",
                      f"{pad}if not -9223372036854775808 <= {n} <= 9223372036854775807:",
                      f"{pad}    raise OverflowError",
                      f"{pad}a(_varint(({n} << 1) ^ ({n} >> 63)))"]
        elif kind in ("float", "double"):
            lines.append(f"{pad}a(_pack{'F' if kind == 'float' else '1'}({read}))")
        elif kind in ("bytes", "string"):
            count += 1
            b = f"b{count}"
            lines += [f"{pad}{b} = {read}" + (".encode()" if kind == "string" else ""),
                      f"{pad}a(_varint(len({b}) << 1))", f"{pad}a({b})"]
        elif isinstance(kind, dict) and kind["type"] == "record":
            count += 1
            r = f"r{count}"
            lines.append(f"{pad}{r} = {read}")
            for f in kind["fields"]:
                value(depth, f["type"], f"{r}[{f['name']!r}]")
        else:
            raise Unsupported(f"type {kind if isinstance(kind, str) else kind.get('type')}")

    value(1, schema, "r")
    lines.append("    return _join(out)")
    return "\n".join(lines)


def compile_writer(schema: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    """The generated ``write(r)`` of an expanded schema (see :func:`writer_source`)."""
    env: dict[str, Any] = {"_varint": varint, "_join": b"".join, "_pack1": struct.Struct("<d").pack,
                           "_packF": struct.Struct("<f").pack}
    exec(compile(writer_source(schema), "<avro writer>", "exec"), env)  # noqa: S102 - generated above
    return env["write"]  # type: ignore[no-any-return]  # generated code


def record_encoder(codec: Codec) -> Callable[[dict[str, Any]], bytes]:
    """``codec.encode`` through a compiled writer, which fastavro backs up: a record the writer
    cannot take (a wrong type, a missing field) goes to ``codec.encode``, which judges it."""
    try:
        expanded = parse_record(codec.schema, expand=True)
        write = compile_writer(expanded)
    except Unsupported:
        return codec.encode
    header = MAGIC + codec.fingerprint

    def encode(record: dict[str, Any]) -> bytes:
        try:
            return header + write(record)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError, struct.error):
            return codec.encode(record)

    return encode
