"""Avro codecs (fastavro) for the schemas in ``schemas/``, in Avro single-object encoding.

Each message is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint + the Avro body,
so every message names the schema it was written with and a reader can resolve older writers.
"""

from __future__ import annotations

import copy
import importlib.resources
import io
import json
from collections.abc import Sequence
from functools import lru_cache
from itertools import accumulate
from typing import Any, cast

import fastavro
import fastavro.schema
import fastavro.utils

from loopline.errors import SchemaError

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8

# decode_many reads a batch as one object-container block that we write ourselves, so any fixed
# sync marker will do. Opening a container costs about as much as 3 to 4 decodes (fastavro parses
# the header's writer schema again for every reader); it pays off from about 30 messages.
_SYNC = bytes(16)
_MIN_BLOCK = 32

#: Topic kinds with a schema file; features/raw embed a record generated from the pipeline spec.
KINDS = ("raw", "features", "prediction", "feedback", "deadletter", "alert", "registry")
_SHARED = ("source",)


def schema_text(name: str) -> str:
    """Return the text of ``schemas/<name>.avsc``."""
    try:
        return importlib.resources.files("loopline.schemas").joinpath(f"{name}.avsc").read_text()
    except FileNotFoundError as e:
        raise SchemaError(f"no schema file schemas/{name}.avsc") from e


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """Return the JSON of ``schemas/<name>.avsc`` (cached; callers must not mutate it)."""
    return json.loads(schema_text(name))  # type: ignore[no-any-return]


def named_types() -> dict[str, Any]:
    """Parsed shared named types that other schemas reference by name."""
    named: dict[str, Any] = {}
    for name in _SHARED:
        fastavro.parse_schema(load_schema(name), named_schemas=named)
    return named


def fingerprint(parsed: dict[str, Any]) -> bytes:
    """The 8-byte little-endian CRC-64-AVRO fingerprint of a parsed schema."""
    canonical = fastavro.schema.to_parsing_canonical_form(parsed)
    return bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))


def with_features(kind: str, feature_fields: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``raw`` or ``features`` schema with its ``Features`` record filled with the given fields."""
    schema = copy.deepcopy(load_schema(kind))
    for f in schema["fields"]:
        if f["name"] == "features":
            f["type"]["fields"] = feature_fields
            return schema
    raise SchemaError(f"schemas/{kind}.avsc has no 'features' field to fill")


class Codec:
    """Encode and decode one schema; decode also accepts the older writer schemas it was given."""

    def __init__(self, schema: dict[str, Any], writers: list[dict[str, Any]] | None = None) -> None:
        self.schema = schema
        self.parsed = fastavro.parse_schema(schema, named_schemas=named_types())
        self.name: str = self.parsed["name"]
        self.fingerprint = fingerprint(self.parsed)
        self._header = MAGIC + self.fingerprint
        self._writers: dict[bytes, Any] = {self.fingerprint: None}
        self._writer_schemas: dict[bytes, dict[str, Any]] = {self.fingerprint: schema}
        self._containers: dict[bytes, bytes] = {}  # container file header per writer, built on use
        for writer in writers or []:
            self.add_writer(writer)

    def add_writer(self, schema: dict[str, Any]) -> None:
        """Accept messages written with ``schema`` (resolved to this codec's schema on decode)."""
        parsed = fastavro.parse_schema(schema, named_schemas=named_types())
        fp = fingerprint(parsed)
        if fp != self.fingerprint:
            self._writers[fp] = parsed
            self._writer_schemas[fp] = schema

    def encode(self, record: dict[str, Any]) -> bytes:
        """Serialize ``record``; raise :class:`SchemaError` naming the field if it does not fit."""
        out = io.BytesIO()
        out.write(self._header)
        try:
            fastavro.schemaless_writer(out, self.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"record does not match schema {self.name}: {e}") from e
        return out.getvalue()

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Deserialize a single-object encoded message; raise :class:`SchemaError` if unreadable."""
        if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:  # None: a Kafka tombstone
            raise SchemaError(f"not an Avro single-object message for {self.name} (bad magic bytes)")
        fp = data[2:HEADER_LEN]
        if fp not in self._writers:
            raise SchemaError(f"unknown writer schema fingerprint {fp.hex()} for {self.name}")
        writer = self._writers[fp]
        try:
            if writer is None:
                return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), self.parsed, None)  # type: ignore[return-value]
            return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer, self.parsed)  # type: ignore[return-value]
        except Exception as e:  # noqa: BLE001 - fastavro raises many kinds on corrupt input
            raise SchemaError(f"corrupt {self.name} message: {type(e).__name__}: {e}") from e

    def decode_many(self, values: Sequence[bytes | None]) -> list[dict[str, Any]]:
        """``[decode(v) for v in values]``, faster; the first bad message's error names it."""
        records = self.decode_each(values)
        for i, r in enumerate(records):
            if isinstance(r, SchemaError):
                raise SchemaError(f"message {i} of {len(values)}: {r}") from r
        return cast("list[dict[str, Any]]", records)

    def decode_each(self, values: Sequence[bytes | None]) -> list[dict[str, Any] | SchemaError]:
        """Decode a batch; an unreadable message gets the error :meth:`decode` raises instead."""
        if len(values) < _MIN_BLOCK:
            return [self._decode_or_error(v) for v in values]
        header = self._header
        if all(v and v.startswith(header) for v in values):  # usually: one writer, no foreigners
            records = self._read_block(self.fingerprint, cast("Sequence[bytes]", values))
            if records is None:
                return [self._decode_or_error(v) for v in values]
            return cast("list[dict[str, Any] | SchemaError]", records)
        groups: dict[bytes, list[int]] = {}
        for i, v in enumerate(values):
            fp = v[2:HEADER_LEN] if v and len(v) >= HEADER_LEN and v[:2] == MAGIC else None
            if fp in self._writers:
                groups.setdefault(fp, []).append(i)
        out: list[dict[str, Any] | SchemaError | None] = [None] * len(values)
        for fp, where in groups.items():
            if len(where) < _MIN_BLOCK:
                continue
            records = self._read_block(fp, [cast(bytes, values[i]) for i in where])
            if records is not None:
                for i, r in zip(where, records):
                    out[i] = r
        return [self._decode_or_error(v) if r is None else r for v, r in zip(values, out)]

    def _decode_or_error(self, data: bytes | None) -> dict[str, Any] | SchemaError:
        try:
            return self.decode(data)
        except SchemaError as e:
            return e

    def _read_block(self, fp: bytes, values: Sequence[bytes]) -> list[dict[str, Any]] | None:
        """Decode one writer's messages as one object-container block; None if that is unsafe."""
        # Each body must decode to the same record as decode() would give it. In a block a body
        # that decode() reads short (trailing bytes, which schemaless_reader ignores) or long
        # (truncated) shifts the start of every later record, and garbage can decode into valid
        # records with the right count that use up exactly the block, so neither the count nor the
        # total length proves anything. What does: after each record the reader must stand exactly
        # at the end of that message's body. Then record i was decoded from body i's bytes alone,
        # as decode() reads them, by the same deterministic reader. fastavro's Block reads its
        # records lazily from one buffer (``bytes_``), so its position after each record costs
        # one tell(): about 4 % of a decode, half what one block per message would cost (its
        # count, size and sync marker per record) and deterministic, unlike a random marker
        # after each record. Anything unexpected, an exception or a missing attribute in another
        # fastavro version included, returns None: the caller decodes message by message then.
        bodies = [v[HEADER_LEN:] for v in values]
        data = b"".join(bodies)
        blob = b"".join((self._container(fp), _long(len(bodies)), _long(len(data)), data, _SYNC))
        reader_schema = None if self._writers[fp] is None else self.parsed
        try:
            block = next(fastavro.block_reader(io.BytesIO(blob), reader_schema))
            tell = block.bytes_.tell  # type: ignore[attr-defined]  # not in fastavro's stubs
            records, ends = [], []
            for record in block:
                records.append(record)
                ends.append(tell())
        except Exception:  # noqa: BLE001 - fastavro raises many kinds on corrupt input
            return None
        if ends != list(accumulate(map(len, bodies))):
            return None
        return cast("list[dict[str, Any]]", records)

    def _container(self, fp: bytes) -> bytes:
        """The header of an Avro object container file written with writer ``fp`` (cached)."""
        header = self._containers.get(fp)
        if header is None:
            # expand=True inlines the shared named types: the file's schema must stand alone.
            schema = fastavro.parse_schema(self._writer_schemas[fp], named_schemas=named_types(),
                                           expand=True)
            buf = io.BytesIO()
            fastavro.writer(buf, schema, [], sync_marker=_SYNC)
            header = self._containers[fp] = buf.getvalue()
        return header


def _long(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a non-negative long."""
    n <<= 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@lru_cache(maxsize=None)
def codec(kind: str) -> Codec:
    """The codec of a fixed schema kind (prediction, feedback, deadletter, alert, registry)."""
    if kind in ("raw", "features"):
        raise SchemaError(f"the {kind} schema depends on the pipeline spec; use PipelineSpec codecs")
    return Codec(load_schema(kind))


def is_backward_compatible(reader: dict[str, Any], writer: dict[str, Any], samples: int = 50,
                           shared: bool = True) -> str | None:
    """Return None if data written with ``writer`` is readable with ``reader``, else the reason.

    Checks by resolution on generated records (fastavro raises on any unresolvable difference).
    ``shared=False`` checks a schema that is itself one of the shared named types.
    """
    named_w, named_r = (named_types(), named_types()) if shared else ({}, {})
    parsed_w = fastavro.parse_schema(writer, named_schemas=named_w)
    parsed_r = fastavro.parse_schema(reader, named_schemas=named_r)
    for record in fastavro.utils.generate_many(parsed_w, samples):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed_w, record)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, parsed_w, parsed_r)
        except Exception as e:  # noqa: BLE001 - the reason is the answer
            return f"{type(e).__name__}: {e}"
    return None
