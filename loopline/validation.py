"""Pure validation of raw producer messages against a pipeline spec: bytes in, verdict out.

A message is accepted (:class:`Accepted`) or rejected (:class:`Rejection`) with the first
failing field in spec order (top-level fields, then features in the spec's order, then unknown
fields), the rule it breaks and a message for a person that also counts the other problems.
Nothing here touches Kafka, so every rule is unit-tested without a broker.

The common case, a plainly valid JSON event, is decided by msgspec alone: :func:`event_type`
derives a typed ``Event`` struct from the spec and :attr:`Validator.decode_fast` parses the raw
bytes straight into it. It accepts only what :meth:`Validator.validate` accepts unchanged (no
dropped fields, ``ts`` already epoch milliseconds); everything else, including whatever msgspec
cannot express exactly, goes to :meth:`Validator.validate`, which judges and explains.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
import orjson

from loopline import avro
from loopline.errors import SchemaError
from loopline.spec import Feature, PipelineSpec

#: Top-level fields of a raw JSON event; anything else is an unknown field.
TOP_LEVEL = ("event_id", "key", "ts", "features")
#: Rules a rejection can name (the ``rule`` label of the rejected-events metric).
RULES = ("size", "json", "avro", "schema", "type", "required", "range", "values", "finite",
         "unknown_field", "timestamp", "tombstone", "internal")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: anything later is not epoch milliseconds
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_NONFINITE = re.compile(rb"NaN|Infinity")
_FLOAT_MAX = sys.float_info.max
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
               dict: "object", type(None): "null"}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused: the failing field (None: the whole message), rule and reason."""

    field: str | None
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid event: the producer's id/key/ts (None when absent), its features (unknown ones
    dropped) and how many unknown fields were dropped."""

    event_id: str | None
    key: str | None
    ts: int | None
    features: dict[str, Any]
    dropped: int = 0


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _show(value: Any, limit: int = 40) -> str:
    """A short rendering of a value for messages."""
    try:
        text = json.dumps(value)  # as the producer wrote it: true, null, NaN, "12"
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_ts(value: Any) -> int | str:
    """Epoch milliseconds from an int or an ISO-8601 string with a UTC offset; else why not."""
    t = type(value)
    if t is int:
        if 0 <= value <= _TS_MAX:
            return int(value)
        return f"ts {value} is not epoch milliseconds between 0 and {_TS_MAX} (year 9999)"
    if t is str:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return f"ts {_show(value)} is not an ISO-8601 date-time (e.g. 2024-05-01T12:00:00Z)"
        if parsed.tzinfo is None:
            return (f"ts {_show(value)} has no UTC offset; add 'Z' or '+HH:MM' so the instant is "
                    "unambiguous")
        ms = (parsed - _EPOCH) // _MS
        if not 0 <= ms <= _TS_MAX:
            return f"ts {_show(value)} is before 1970-01-01T00:00:00Z"
        return ms
    return (f"ts must be epoch milliseconds (an integer) or an ISO-8601 string, "
            f"got {json_type(value)} {_show(value)}")


class Validator:
    """Validates raw messages of one pipeline; built once per spec, used for every message."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.max_bytes = spec.max_message_bytes
        self.reject_unknown = spec.unknown_fields == "reject"
        self.names = frozenset(f.name for f in spec.features)
        # One tuple per feature: the loop below reads locals, not pydantic attributes (hot path).
        self._checks = [
            (f.name, f"features.{f.name}", f.type, f.required, f.min, f.max,
             frozenset(f.values) if f.values is not None else None, f.values)
            for f in spec.features
        ]
        self.raw_codec = avro.Codec(spec.raw_schema())
        self.event_type = event_type(spec)
        #: Attribute of each feature (by name) on the ``features`` struct of :attr:`event_type`.
        self.attributes = feature_attributes(spec)
        #: msgspec's decoder into :attr:`event_type`: raises :class:`msgspec.MsgspecError` for
        #: anything but a plainly valid JSON event (then call :meth:`validate`). It does not check
        #: the size: a message over ``max_bytes`` must go to :meth:`validate` even if it decodes.
        self.decode_fast: Callable[[bytes], Any] = msgspec.json.Decoder(self.event_type).decode

    def fast(self, value: bytes | None) -> Any | None:
        """The event struct if ``value`` is a plainly valid JSON event, else None (validate it)."""
        if value is None or len(value) > self.max_bytes:
            return None
        try:
            return self.decode_fast(value)
        except msgspec.MsgspecError:
            return None

    def validate(self, value: bytes | None) -> Accepted | Rejection:
        """Accept or reject one raw message value (JSON object or Avro single-object encoding)."""
        if value is None:
            return Rejection(None, "tombstone", "null message value (a tombstone): there is "
                             "no event to validate; send a JSON object or the pipeline's Avro "
                             "encoding")
        size = len(value)
        if size > self.max_bytes:
            return Rejection(None, "size", f"message is {size} bytes; pipeline {self.spec.name} "
                             f"accepts at most {self.max_bytes} (max_message_bytes)")
        if value[:2] == avro.MAGIC:
            return self._avro(value)
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError as e:
            return self._bad_json(value, e)
        if type(doc) is not dict:
            return Rejection(None, "type", "expected a JSON object like {\"features\": {...}}, "
                             f"got a JSON {json_type(doc)}")
        return self.check(doc)

    def _avro(self, value: bytes) -> Accepted | Rejection:
        fp = value[2:avro.HEADER_LEN]
        if fp != self.raw_codec.fingerprint:
            return Rejection(None, "schema", f"Avro message with writer schema fingerprint "
                             f"{fp.hex()}, but pipeline {self.spec.name} reads only its current "
                             f"raw schema (fingerprint {self.raw_codec.fingerprint.hex()}); encode "
                             "with spec.raw_schema() of the registered spec")
        try:
            record = self.raw_codec.decode(value)
        except SchemaError as e:
            return Rejection(None, "avro", f"unreadable Avro message: {e}")
        # Avro guarantees the types; ranges, values, NaN and timestamps still need checking.
        return self.check(record)

    def _bad_json(self, value: bytes, error: orjson.JSONDecodeError) -> Rejection:
        if _NONFINITE.search(value):
            # orjson follows RFC 8259, which has no NaN/Infinity; the stdlib parser accepts them,
            # so a re-parse can name the field that carries one instead of a bare syntax error.
            try:
                doc = json.loads(value)
            except (ValueError, RecursionError):
                doc = None
            if type(doc) is dict:
                verdict = self.check(doc)
                if type(verdict) is Rejection:
                    return Rejection(verdict.field, verdict.rule,
                                     verdict.message + " (NaN/Infinity are not valid JSON either)")
                return Rejection(None, "json", f"not valid JSON: {error}; NaN and Infinity are not "
                                 "JSON values (send null for an absent optional feature)")
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as e:
            first = f"first invalid byte 0x{value[e.start]:02x} at offset {e.start}"
            return Rejection(None, "json", f"not valid JSON: the {len(value)} bytes are not UTF-8 "
                             f"text ({first})")
        return Rejection(None, "json", f"not valid JSON ({len(value)} bytes): {error}")

    def check(self, doc: dict[str, Any]) -> Accepted | Rejection:
        """Validate a parsed event object (JSON or decoded Avro)."""
        problems: list[tuple[str | None, str, str]] = []
        event_id = doc.get("event_id")
        if event_id is not None and (type(event_id) is not str or not event_id):
            problems.append(("event_id", "type", ("event_id must be a non-empty string, got "
                                                  f"{json_type(event_id)} {_show(event_id)}")))
        key = doc.get("key")
        if key is not None and type(key) is not str:
            problems.append(("key", "type",
                             f"key must be a string, got {json_type(key)} {_show(key)}"))
        ts = doc.get("ts")
        if ts is not None:
            parsed_ts = parse_ts(ts)
            if type(parsed_ts) is str:
                problems.append(("ts", "timestamp", parsed_ts))
            else:
                ts = parsed_ts
        features = doc.get("features")
        dropped = 0
        if features is None:
            problems.append(("features", "required", "the 'features' object is missing"))
        elif type(features) is not dict:
            problems.append(("features", "type", ("features must be a JSON object, got "
                                                  f"{json_type(features)} {_show(features)}")))
        else:
            self._check_features(features, problems)
            if not self.names.issuperset(features):
                unknown = [k for k in features if k not in self.names]
                if self.reject_unknown:
                    for k in unknown:
                        problems.append((f"features.{k}", "unknown_field", "" if problems else
                                         self._unknown_message(f"features.{k}")))
                else:
                    dropped += len(unknown)
                    features = {k: v for k, v in features.items() if k in self.names}
        if len(doc) > 4 or not all(k in TOP_LEVEL for k in doc):
            unknown = [k for k in doc if k not in TOP_LEVEL]
            if self.reject_unknown:
                for k in unknown:
                    problems.append((k, "unknown_field", "" if problems else
                                     self._unknown_message(k)))
            else:
                dropped += len(unknown)
        if problems:
            field, rule, message = problems[0]
            if len(problems) > 1:
                message += f" (and {len(problems) - 1} more problem(s))"
            return Rejection(field, rule, message)
        return Accepted(event_id, key, ts, features, dropped)  # type: ignore[arg-type]  # msgspec checked the types

    def _unknown_message(self, field: str) -> str:
        return (f"{field} is not declared in pipeline {self.spec.name} (unknown_fields: reject); "
                f"declared features: {', '.join(sorted(self.names))}")

    def _check_features(self, features: dict[str, Any],
                        problems: list[tuple[str | None, str, str]]) -> None:
        # Only the first problem's message is shown (the others are counted), so only the first
        # is written: rejections with many problems are common, and their messages cost the most.
        for name, path, kind, required, lo, hi, allowed, listed in self._checks:
            v = features.get(name)
            if v is None:
                if required:
                    problems.append((path, "required", "" if problems else
                                     f"required feature {name!r} is missing or null"))
                continue
            t = type(v)
            if kind == "float":
                if t is float:
                    if not math.isfinite(v):
                        problems.append((path, "finite", "" if problems else _not_finite(name, v)))
                        continue
                elif t is not int:
                    problems.append((path, "type", "" if problems else
                                     self._type_message(name, kind, v)))
                    continue
            elif kind == "int":
                if t is not int:
                    if t is float and not math.isfinite(v):
                        problems.append((path, "finite", "" if problems else _not_finite(name, v)))
                    else:
                        problems.append((path, "type", "" if problems else
                                         self._type_message(name, kind, v)))
                    continue
                if not _INT64_MIN <= v <= _INT64_MAX:
                    problems.append((path, "range", "" if problems else
                                     f"{name} = {v} does not fit a 64-bit integer"))
                    continue
            elif kind == "string":
                if t is not str:
                    problems.append((path, "type", "" if problems else
                                     self._type_message(name, kind, v)))
                elif allowed is not None and v not in allowed:
                    problems.append((path, "values", "" if problems else
                                     f"{name} = {_show(v)} is not one of {listed}"))
                continue
            else:  # bool
                if t is not bool:
                    problems.append((path, "type", "" if problems else
                                     self._type_message(name, kind, v)))
                continue
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                problems.append((path, "range", "" if problems else (
                    f"{name} = {v} is outside the declared range "
                    f"[min {_bound(lo)}, max {_bound(hi)}]")))

    @staticmethod
    def _type_message(name: str, kind: str, value: Any) -> str:
        hint = ""
        if type(value) is str and kind in ("float", "int"):
            hint = " (strings are never converted to numbers; send the number itself)"
        elif type(value) is bool:
            hint = " (true/false are booleans, not numbers)"
        return f"{name} must be {_KIND_NAMES[kind]}, got {json_type(value)} {_show(value)}{hint}"


_KIND_NAMES = {"float": "a number (float)", "int": "an integer", "string": "a string",
               "bool": "a boolean"}


def _not_finite(name: str, value: float) -> str:
    return f"{name} is {_show(value)}; features must be finite numbers"


# --- the fast path: a msgspec struct per spec -------------------------------------------------

def feature_attributes(spec: PipelineSpec) -> dict[str, str]:
    """The attribute of each feature on the generated features struct (``f0``, ``f1``, ... in spec
    order): feature names may be Python keywords or dunders, which a struct cannot use as such."""
    return {f.name: f"f{i}" for i, f in enumerate(spec.features)}


def _ints(lo: float | None, hi: float | None) -> Any:
    """Integers the full check accepts for bounds [lo, hi], limited to int64.

    Beyond 64 bits orjson reads an integer as a float (and msgspec exactly), so those take the
    full path, which sees what orjson sees.
    """
    ge = _INT64_MIN if lo is None else max(_INT64_MIN, math.ceil(lo))
    le = _INT64_MAX if hi is None else min(_INT64_MAX, math.floor(hi))
    return Annotated[int, msgspec.Meta(ge=ge, le=le)]


def _fast_type(f: Feature) -> Any:
    """The msgspec type of one feature's value (before optionality)."""
    if f.type == "float":
        # An int stays an int (as orjson reads it), so values, and a key made of one, are exactly
        # those of the full path. Floats: the bounds, or the largest finite double (no inf; JSON
        # has no NaN, and msgspec refuses 1e400 rather than reading it as inf).
        lo = -_FLOAT_MAX if f.min is None else f.min
        hi = _FLOAT_MAX if f.max is None else f.max
        return Union[_ints(f.min, f.max), Annotated[float, msgspec.Meta(ge=lo, le=hi)]]  # noqa: UP007 - types built at run time for msgspec
    if f.type == "int":
        return _ints(f.min, f.max)
    if f.type == "string":
        return str if f.values is None else Literal[tuple(f.values)]
    return bool


def event_type(spec: PipelineSpec) -> type[msgspec.Struct]:
    """The ``Event`` struct of ``spec``: what the fast path accepts (see the module docstring).

    ``msgspec.json.schema(event_type(spec))`` prints it as JSON Schema, for inspection.
    """
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f, attr in zip(spec.features, feature_attributes(spec).values()):
        t = _fast_type(f)
        fields.append((attr, t) if f.required else (attr, Optional[t], None))  # noqa: UP045 - as Union above
    # gc=False: the structs hold only scalars (and one struct), so the collector can skip them.
    features = msgspec.defstruct(
        f"Features_{spec.name}", fields, kw_only=True, forbid_unknown_fields=True, gc=False,
        rename={attr: name for name, attr in feature_attributes(spec).items()})
    return msgspec.defstruct(f"Event_{spec.name}", [
        ("features", features),
        ("event_id", Optional[Annotated[str, msgspec.Meta(min_length=1)]], None),  # noqa: UP045 - as above
        ("key", Optional[str], None),  # noqa: UP045 - as above
        ("ts", Optional[Annotated[int, msgspec.Meta(ge=0, le=_TS_MAX)]], None),  # noqa: UP045 - as above
    ], kw_only=True, forbid_unknown_fields=True, gc=False)


def _bound(value: float | None) -> str:
    if value is None:
        return "none"
    return str(int(value)) if float(value).is_integer() else str(value)
