"""Avro codecs (fastavro) for the schemas in ``schemas/``, in Avro single-object encoding.

Each message is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint + the Avro body,
so every message names the schema it was written with and a reader can resolve older writers.
fastavro encodes and resolves older writers; messages of a codec's own schema are read by a
reader compiled for it (:mod:`loopline.avro.readers`), and fastavro judges whatever that refuses.
"""

from __future__ import annotations

import copy
import importlib.resources
import io
import json
from collections.abc import Sequence
from functools import cache
from typing import Any, cast

import fastavro
import fastavro.schema
import fastavro.utils

from loopline.avro import readers
from loopline.errors import SchemaError

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8

#: Topic kinds with a schema file; features/raw embed a record generated from the pipeline spec.
KINDS = ("raw", "features", "prediction", "feedback", "deadletter", "alert", "registry")
_SHARED = ("source",)


def schema_text(name: str) -> str:
    """Return the text of ``schemas/<name>.avsc``."""
    try:
        return importlib.resources.files("loopline.schemas").joinpath(f"{name}.avsc").read_text()
    except FileNotFoundError as e:
        raise SchemaError(f"no schema file schemas/{name}.avsc") from e


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Return the JSON of ``schemas/<name>.avsc`` (cached; callers must not mutate it)."""
    return json.loads(schema_text(name))  # type: ignore[no-any-return]  # JSON is Any


def parse_record(schema: dict[str, Any], named_schemas: dict[str, Any] | None = None, *,
                 expand: bool = False) -> dict[str, Any]:
    """``fastavro.parse_schema`` of a record schema (default names: :func:`named_types`).

    fastavro types its result as any schema form; a record always parses to a dict.
    """
    named = named_types() if named_schemas is None else named_schemas
    return cast("dict[str, Any]", fastavro.parse_schema(schema, named_schemas=named, expand=expand))


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
    """The ``raw`` or ``features`` schema with its
    ``Features`` record filled with the given fields."""
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
        self.parsed = parse_record(schema)
        self.name: str = self.parsed["name"]
        self.fingerprint = fingerprint(self.parsed)
        self._header = MAGIC + self.fingerprint
        self._writers: dict[bytes, Any] = {self.fingerprint: None}
        self._readers: dict[tuple[str, ...] | None, readers.Reader | None] = {}
        for writer in writers or []:
            self.add_writer(writer)

    def add_writer(self, schema: dict[str, Any]) -> None:
        """Accept messages written with ``schema`` (resolved to this codec's schema on decode)."""
        parsed = parse_record(schema)
        fp = fingerprint(parsed)
        if fp != self.fingerprint:
            self._writers[fp] = parsed

    def encode(self, record: dict[str, Any]) -> bytes:
        """Serialize ``record``; raise :class:`SchemaError` naming the field if it does not fit."""
        out = io.BytesIO()
        out.write(self._header)
        try:
            fastavro.schemaless_writer(out, self.parsed, record)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"record does not match schema {self.name}: {e}") from e
        return out.getvalue()

    def encode_many(self, records: Sequence[dict[str, Any]]) -> list[bytes]:
        """Serialize many records through one buffer (cheaper than :meth:`encode` one by one)."""
        buf = io.BytesIO()
        ends = []
        write, parsed, header = fastavro.schemaless_writer, self.parsed, self._header
        try:
            for r in records:
                buf.write(header)
                write(buf, parsed, r)
                ends.append(buf.tell())
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SchemaError(f"record {len(ends)} does not match schema {self.name}: {e}") from e
        data = buf.getbuffer()
        out, start = [], 0
        for end in ends:
            out.append(bytes(data[start:end]))
            start = end
        return out

    def reader_source(self, fields: Sequence[str] | None = None) -> str:
        """The generated Python source of this codec's compiled reader (for debugging)."""
        expanded = parse_record(self.schema, expand=True)
        return readers.reader_source(expanded, fields)

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Deserialize a single-object encoded message; raise :class:`SchemaError` if unreadable."""
        record = self.decode_each([data])[0]
        if isinstance(record, SchemaError):
            raise record
        return record

    def _decode_fastavro(self, data: bytes | None) -> dict[str, Any]:
        """:meth:`decode` by fastavro: the judge of whatever the compiled reader does not accept."""
        if not data or len(data) < HEADER_LEN or data[:2] != MAGIC:  # None: a Kafka tombstone
            raise SchemaError(
                f"not an Avro single-object message for {self.name} (bad magic bytes)")
        fp = data[2:HEADER_LEN]
        if fp not in self._writers:
            raise SchemaError(f"unknown writer schema fingerprint {fp.hex()} for {self.name}")
        writer = self._writers[fp]
        try:
            if writer is None:
                return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), self.parsed,
                                                  None)  # type: ignore[return-value]  # a record reads as a dict
            return fastavro.schemaless_reader(io.BytesIO(data[HEADER_LEN:]), writer,
                                              self.parsed)  # type: ignore[return-value]  # a record reads as a dict
        except Exception as e:  # fastavro raises many kinds on corrupt input
            raise SchemaError(f"corrupt {self.name} message: {type(e).__name__}: {e}") from e

    def decode_many(self, values: Sequence[bytes | None]) -> list[dict[str, Any]]:
        """``[decode(v) for v in values]``; the first bad message's error names it."""
        records = self.decode_each(values)
        for i, r in enumerate(records):
            if isinstance(r, SchemaError):
                raise SchemaError(f"message {i} of {len(values)}: {r}") from r
        return cast("list[dict[str, Any]]", records)

    def decode_each(self, values: Sequence[bytes | None], fields: Sequence[str] | None = None
                    ) -> list[dict[str, Any] | SchemaError]:
        """Decode a batch (only the top-level ``fields``, if given); a bad message gets its
        error."""
        read = self._reader(fields)
        header = self._header
        out: list[dict[str, Any] | SchemaError] = []
        for v in values:
            if read is not None and v is not None and v.startswith(header):
                try:
                    record, end = read(v, HEADER_LEN)
                    if end <= len(v):  # bytes after the record are ignored, as fastavro does
                        out.append(record)
                        continue
                except Exception:  # noqa: BLE001,S110 - not ours to judge: fastavro is, below
                    pass
            r = self._decode_or_error(v)
            out.append(r if fields is None or isinstance(r, SchemaError)
                       else {k: r[k] for k in fields})
        return out

    def _decode_or_error(self, data: bytes | None) -> dict[str, Any] | SchemaError:
        try:
            return self._decode_fastavro(data)
        except SchemaError as e:
            return e

    def _reader(self, fields: Sequence[str] | None) -> readers.Reader | None:
        """The compiled reader of this schema's own messages (cached); None if it cannot compile."""
        key = None if fields is None else tuple(fields)
        if key not in self._readers:
            unknown = set(key or ()) - {f["name"] for f in self.schema["fields"]}
            if unknown:
                raise SchemaError(f"{self.name} has no field {min(unknown)!r}")
            expanded = parse_record(self.schema, expand=True)
            try:
                self._readers[key] = readers.compile_reader(expanded, key)
            except readers.Unsupported:
                self._readers[key] = None  # fastavro reads it, message by message
        return self._readers[key]


def history(kind: str) -> list[dict[str, Any]]:
    """Earlier released versions of a fixed schema kind
    (``schemas/history/<kind>.<fingerprint>.avsc``).

    Messages written by an earlier release name their writer schema by fingerprint: kept here, they
    stay readable after an upgrade (a compacted registry keeps such records for ever).
    """
    folder = importlib.resources.files("loopline.schemas").joinpath("history")
    if not folder.is_dir():
        return []
    return [json.loads(f.read_text()) for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.startswith(f"{kind}.") and f.name.endswith(".avsc")]


@cache
def codec(kind: str) -> Codec:
    """The codec of a fixed schema kind (prediction, feedback, deadletter, alert, registry).

    It reads messages written with any earlier released version of the schema, too.
    """
    if kind in ("raw", "features"):
        raise SchemaError(
            f"the {kind} schema depends on the pipeline spec; use PipelineSpec codecs")
    return Codec(load_schema(kind), writers=history(kind))


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
