"""Faust apps on Loopline topics: typed records, Avro codecs and topics, generated from a spec.

Loopline's services are batched confluent-kafka loops; this is for downstream stream apps written
in Faust (``pip install 'loopline[faust]'``; README "Faust apps" and ``examples/faust_app.py``)::

    app = faust.App("billing", **app_settings(settings))
    topics = from_registry(app, settings, "fraud")      # or pipeline_topics(app, spec)

    @app.agent(topics.predictions)
    async def bill(predictions):
        async for p in predictions:                     # a faust.Record: p.label, p.source.offset
            fb = topics.feedback_record(prediction_id=p.prediction_id, verdict="accept")
            await topics.feedback.send(key=p.prediction_id, value=fb)

Records are ``faust.Record`` subclasses generated from ``schemas/`` (features from the spec);
optional Avro fields default to None; a field whose name is no usable attribute (``from``,
``dumps``) is ``from_`` in Python and keeps its name on the wire. ``python -m loopline.faust
SPEC.yaml`` prints them. Topics read Avro single-object encoding through :mod:`loopline.avro`
(features also under older specs: ``features_writers``); feedback is read as Avro or JSON as
:mod:`loopline.feedback` reads it, and written as Avro only if :func:`loopline.feedback.check`
passes. An undecodable message is logged (topic, partition, offset) and skipped, where Faust
would crash and restart the agent.

What Faust needs on Loopline's brokers (:func:`app_settings`):

- ``broker_session_timeout`` from ``LOOPLINE_SESSION_TIMEOUT_MS``: Tansu completes a group join
  after about half of it (Faust's 60 s default: a 30 s wait at every start);
- ``producer_max_batch_size=1`` on the embedded broker: Tansu answers ListOffsets(latest) with its
  last batch's base offset + 1 and Faust recovers a table only up to there, so batched changelog
  writes restore stale values. One record per batch makes it exact (``bench/faust_state.py``
  measures the cost). Apache Kafka keeps Faust's batching;
- ``processing_guarantee="at_least_once"``: Tansu has no transactions. A redelivered event must not
  count twice: keep in a table value the offset it was last updated from (as the example does);
- ``Stream=LooplineStream``: a message that is no record is skipped in its turn, so that Faust's
  commits never pass over a message fetched before it and not processed yet;
- ``TableManager=SeekingTableManager``: Faust's own recovery can skip records fetched while it
  seeks after restoring a table (:class:`SeekingRecovery`);
- tables co-partitioned with a Loopline topic: ``partitions=topics.predictions.partitions``.
  Faust creates its own changelog and assignor topics; Loopline's come from ``loopline apply``.
"""

from __future__ import annotations

import argparse
import asyncio
import keyword
import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, cast

import fastavro
import faust
import orjson
from faust.exceptions import Skip, ValueDecodeError
from faust.models.fields import FieldDescriptor
from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import AppT, CodecT, ModelT
from faust.types.tuples import Message

from loopline import avro, feedback
from loopline import topics as names
from loopline.errors import LooplineError
from loopline.kafka import KafkaConfig
from loopline.observability import JsonFormatter
from loopline.registry import RegistryReader
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, load_spec

__all__ = ["AvroCodec", "LooplineSchema", "LooplineTopic", "Records", "Topics", "app_settings",
           "from_registry", "pipeline_topics", "records", "records_source"]

log = logging.getLogger(__name__)

_PY_TYPES = {"string": str, "long": int, "int": int, "double": float, "float": float,
             "boolean": bool, "bytes": bytes, "enum": str}
Decode = Callable[[Message], dict[str, Any]]


@dataclass(frozen=True)
class _Field:
    attr: str        # Python attribute
    name: str        # Avro field name (on the wire)
    pytype: Any
    has_default: bool
    default: Any


def _attr(name: str, taken: set[str]) -> str:
    """An Avro field's Python attribute: its name, unless a keyword, a Record member or taken."""
    attr = name
    while keyword.iskeyword(attr) or attr.startswith("__") or hasattr(faust.Record, attr) \
            or (attr != name and attr in taken):
        attr += "_"
    taken.add(attr)
    return attr


def _pytype(schema: Any, build: Callable[[dict[str, Any]], type[faust.Record]]) -> Any:
    if isinstance(schema, list):  # unions: Loopline's are ["null", T]
        rest = [s for s in schema if s != "null"]
        inner = _pytype(rest[0], build) if len(rest) == 1 else Any
        return inner | None if "null" in schema else inner
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "record":
            return build(schema)
        if kind == "map":
            return dict[str, _pytype(schema["values"], build)]  # type: ignore[misc]  # a type built at run time
        if kind == "array":
            return list[_pytype(schema["items"], build)]  # type: ignore[misc]  # a type built at run time
        return _pytype(kind, build) if kind not in _PY_TYPES else _PY_TYPES[kind]
    return _PY_TYPES.get(schema, Any)


def _fields(schema: dict[str, Any], build: Callable[[dict[str, Any]], type[faust.Record]]
            ) -> list[_Field]:
    """A record's fields, required ones first (Faust, like dataclasses, wants them so)."""
    out, taken = [], {f["name"] for f in schema["fields"]}
    for f in schema["fields"]:
        # A shared mutable default ({} for scores) would be one dict for every record: required.
        immutable = "default" in f and not isinstance(f["default"], dict | list)
        out.append(_Field(_attr(f["name"], taken), f["name"], _pytype(f["type"], build), immutable,
                          f.get("default")))
    return sorted(out, key=lambda f: f.has_default)


class _Builder:
    """Generates the faust.Record classes of one expanded Avro schema (nested records included)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.classes: dict[str, type[faust.Record]] = {}

    def build(self, schema: dict[str, Any]) -> type[faust.Record]:
        name = schema["name"].rsplit(".", 1)[-1]
        if name not in self.classes:
            body: dict[str, Any] = {"__annotations__": {}, "__doc__": schema.get("doc", name)}
            for f in _fields(schema, self.build):
                body["__annotations__"][f.attr] = f.pytype
                if f.attr != f.name:
                    body[f.attr] = FieldDescriptor(input_name=f.name, output_name=f.name,
                                                   required=not f.has_default, default=f.default)
                elif f.has_default:
                    body[f.attr] = f.default
            self.classes[name] = type(name, (faust.Record,), body,
                                      namespace=f"{self.namespace}.{name}")
        return self.classes[name]


def _expanded(schema: dict[str, Any]) -> dict[str, Any]:
    parsed = fastavro.parse_schema(schema, named_schemas=avro.named_types(), expand=True)
    return cast("dict[str, Any]", parsed)


@dataclass(frozen=True)
class Records:
    """The faust.Record classes of one pipeline's topics."""

    FeatureEvent: type[faust.Record]
    Features: type[faust.Record]
    Prediction: type[faust.Record]
    Feedback: type[faust.Record]
    Alert: type[faust.Record]
    SourceOffset: type[faust.Record]


@cache
def _fixed_records() -> dict[str, type[faust.Record]]:
    builder = _Builder("loopline")  # shared by every pipeline: one class per schema and process
    for kind in ("prediction", "feedback", "alert"):
        builder.build(_expanded(avro.load_schema(kind)))
    return builder.classes


@lru_cache(maxsize=64)
def _feature_records(pipeline: str, sha256: str, schema_json: str) -> dict[str, type[faust.Record]]:
    builder = _Builder(f"loopline.{pipeline}")
    builder.classes["SourceOffset"] = _fixed_records()["SourceOffset"]  # one class for every topic
    builder.build(_expanded(orjson.loads(schema_json)))
    return builder.classes


def records(spec: PipelineSpec) -> Records:
    """The faust.Record classes of a pipeline (cached: one class per schema and process)."""
    fixed = _fixed_records()
    schema_json = orjson.dumps(spec.features_schema()).decode()
    feats = _feature_records(spec.name, spec.sha256(), schema_json)
    return Records(feats["FeatureEvent"], feats["Features"], fixed["Prediction"], fixed["Feedback"],
                   fixed["Alert"], fixed["SourceOffset"])


def _type_source(t: Any) -> str:
    if isinstance(t, type) and not getattr(t, "__args__", None):
        return t.__name__
    return str(t).replace(f"{__name__}.", "").replace("typing.", "")


def records_source(spec: PipelineSpec) -> str:
    """The generated records of a pipeline as Python source (for reading; not executed)."""
    recs = records(spec)
    lines = ["import faust", "from faust.models.fields import FieldDescriptor", ""]
    for cls in (recs.SourceOffset, recs.Features, recs.FeatureEvent, recs.Prediction,
                recs.Feedback, recs.Alert):
        opts = cls._options
        lines.append(f"class {cls.__name__}(faust.Record, namespace={opts.namespace!r}):")
        for attr, descr in opts.descriptors.items():
            decl = f"    {attr}: {_type_source(opts.fields[attr])}"
            if attr != descr.input_name:
                default = f", required=False, default={opts.defaults[attr]!r}" \
                    if attr in opts.defaults else ""
                decl += f" = FieldDescriptor(input_name={descr.input_name!r}, " \
                        f"output_name={descr.input_name!r}{default})"
            elif attr in opts.defaults:
                decl += f" = {opts.defaults[attr]!r}"
            lines.append(decl)
        lines.append("")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A record as the plain dicts fastavro writes (nested records too, wire names, no metadata)."""
    if isinstance(value, ModelT):
        value = value.to_representation()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if k != "__faust"}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class AvroCodec(faust.Codec):
    """Faust codec: Avro single-object encoding through a :class:`loopline.avro.Codec`.

    ``check`` (optional) validates a record before it is written (:func:`loopline.feedback.check`).
    """

    def __init__(self, codec: avro.Codec, check: Callable[[dict[str, Any]], Any] | None = None,
                 children: tuple[CodecT, ...] | None = None) -> None:
        # Faust clones codecs as type(self)(children=..., **kwargs): keep them in kwargs.
        super().__init__(children, codec=codec, check=check)
        self.codec, self.check = codec, check

    def _dumps(self, obj: Any) -> bytes:
        record = _plain(obj)
        if self.check is not None:
            self.check(record)
        return self.codec.encode(record)

    def _loads(self, s: bytes) -> Any:
        return self.codec.decode(s)


class LooplineSchema(faust.Schema[str, Any]):
    """Faust schema of a Loopline topic: str keys, records decoded with the message's metadata.

    Decoding here rather than in the codec gives it the topic, partition and timestamp, which JSON
    feedback without a ``feedback_id`` needs (its id is derived from them and its bytes).
    """

    def __init__(self, value_type: type[faust.Record], codec: AvroCodec, decode: Decode) -> None:
        super().__init__(key_type=str, value_type=value_type, key_serializer="raw",
                         value_serializer=codec)
        self._record, self._decode = value_type, decode

    def loads_key(self, app: AppT, message: Message, *, loads: Callable[..., Any] | None = None,
                  serializer: Any = None) -> Any:
        """The message's key as text; bytes that are not UTF-8 replaced, as Loopline's services do.

        A foreign producer's odd key must not cost a valid record (Faust would skip the message).
        """
        key = message.key
        return key.decode("utf-8", "replace") if isinstance(key, bytes) else key

    def loads_value(self, app: AppT, message: Message, *, loads: Callable[..., Any] | None = None,
                    serializer: Any = None) -> Any:
        """Decode ``message`` into this schema's record, or report that it is not one.

        Not one: logged, and :class:`Undecodable` if the app's streams skip it in its turn
        (:class:`LooplineStream`), else ValueDecodeError (Faust skips it at once).
        """
        try:
            return self._record.from_data(self._decode(message), preferred_type=self._record)
        except (LooplineError, TypeError, ValueError) as e:  # TypeError: a record Faust refuses
            where = f"{message.topic}[{message.partition}]@{message.offset}"
            stream: Any = app.conf.Stream  # a class (typed as Type[StreamT] in Faust)
            if not issubclass(stream, LooplineStream):
                raise ValueDecodeError(f"{where}: {e}") from e
            _log_bad_message(message, f"{where}: {e}")
            return Undecodable(where, str(e))


@dataclass(frozen=True)
class Undecodable:
    """The value of a message of a Loopline topic that is no record (:class:`LooplineStream`)."""

    where: str  #: topic[partition]@offset
    error: str


def skip_undecodable(value: Any) -> Any:
    """A stream processor: skip an :class:`Undecodable` value (the stream acknowledges it)."""
    if isinstance(value, Undecodable):
        raise Skip()
    return value


class LooplineStream(faust.Stream):  # type: ignore[type-arg]  # generic in Faust's stubs only
    """Faust's stream, skipping the undecodable messages of Loopline topics in their turn.

    Faust acknowledges a message it cannot decode at once, ahead of the messages fetched before
    it that an agent has not processed yet; its commit can then pass over one of them
    (faust-streaming/faust#606, open), which is lost if the worker stops before processing it.
    Decoded to :class:`Undecodable` instead, the message goes through the stream like the others
    and is skipped and acknowledged after them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if skip_undecodable not in self._processors:  # clones inherit the processors
            self.add_processor(skip_undecodable)


def _log_bad_message(message: Message, error: str) -> None:
    log.warning("faust_bad_message", extra={"topic": message.topic, "offset": message.offset,
                                            "partition": message.partition, "error": error})


class LooplineTopic(faust.Topic):
    """A Faust topic whose undecodable messages are logged and skipped, not thrown at the agent."""

    async def on_value_decode_error(self, exc: Exception, message: Message) -> None:
        """Log a message Faust could not decode (it has acknowledged it already); do not throw."""
        _log_bad_message(message, str(exc))

    on_key_decode_error = on_value_decode_error  # another schema's key (Loopline's never fail)


@dataclass(frozen=True)
class Topics:
    """The Faust topics of one pipeline, their record classes and a feedback builder."""

    spec: PipelineSpec
    records: Records
    features: LooplineTopic
    predictions: LooplineTopic
    feedback: LooplineTopic
    alerts: LooplineTopic  #: ``loopline.alerts``: every pipeline's (``a.pipeline`` says whose)

    def feedback_record(self, **fields: Any) -> faust.Record:
        """A valid Feedback record (:func:`loopline.feedback.make`), its label one of the spec's."""
        record = feedback.make(classes=self.spec.label.classes, **fields)
        return self.records.Feedback.from_data(record, preferred_type=self.records.Feedback)


def pipeline_topics(app: AppT, spec: PipelineSpec,
                    features_writers: Sequence[dict[str, Any]] = ()) -> Topics:
    """Faust topics for a pipeline's features, predictions and feedback, and for loopline.alerts."""
    recs = records(spec)
    classes = spec.label.classes

    def check_feedback(record: dict[str, Any]) -> None:
        feedback.check(record, classes)

    def fixed(kind: str) -> tuple[AvroCodec, Decode]:
        codec = avro.codec(kind)
        return AvroCodec(codec), lambda m: codec.decode(m.value)

    def read_feedback(m: Message) -> dict[str, Any]:
        ts = None if m.timestamp is None else round(m.timestamp * 1000)  # Faust: seconds
        return feedback.decode(m.value, m.topic, m.partition, ts, classes)

    def topic(name: str, schema: LooplineSchema, partitions: int | None = spec.partitions
              ) -> LooplineTopic:
        return LooplineTopic(app, topics=[name], schema=schema, partitions=partitions)

    features = avro.Codec(spec.features_schema(), writers=list(features_writers))
    feedback_codec = AvroCodec(avro.codec("feedback"), check_feedback)
    return Topics(
        spec, recs,
        features=topic(spec.topics.features, LooplineSchema(
            recs.FeatureEvent, AvroCodec(features), lambda m: features.decode(m.value))),
        predictions=topic(spec.topics.predictions,
                          LooplineSchema(recs.Prediction, *fixed("prediction"))),
        feedback=topic(spec.topics.feedback,
                       LooplineSchema(recs.Feedback, feedback_codec, read_feedback)),
        alerts=topic(names.ALERTS, LooplineSchema(recs.Alert, *fixed("alert")), None),
    )


def from_registry(app: AppT, settings: LooplineSettings, pipeline: str) -> Topics:
    """:func:`pipeline_topics` of a registered pipeline, reading events of its older specs too."""
    kafka = KafkaConfig.from_settings(settings)
    reader = RegistryReader(kafka, client_id="loopline-faust")
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    if pipeline not in state.specs:
        known = ", ".join(sorted(state.specs)) or "none"
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry (known: {known})")
    return pipeline_topics(app, state.specs[pipeline], state.features_schemas[pipeline][:-1])


def _credentials(settings: LooplineSettings) -> faust.types.auth.CredentialsT | None:
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl.create_default_context(cafile=settings.ssl_ca_location) if "SSL" in protocol \
        else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    return faust.SASLCredentials(username=settings.sasl_username, password=password,
                                 mechanism=settings.sasl_mechanism or "PLAIN", ssl_context=context)


class SeekingRecovery(Recovery):
    """Faust's table recovery, with the flow stopped before the stream partitions are sought.

    faust-streaming 0.15 (``Recovery.on_recovery_completed``; faust-streaming/faust#596, open)
    resumes the stream partitions and awaits ``consumer.perform_seek()`` while the Fetcher it
    started for the changelogs still hands records to the agents. Those records move the read
    offsets past the committed offset the seek has just restored; ``flow_control.resume()`` then
    clears the agents' queues, and the same records fetched again from the committed offset are
    dropped as read already. The worker never processes them and its commits stop at the first.
    With the flow stopped, the Fetcher drops the rest of its fetch and waits for the flow to
    resume, which Faust does after the seek: everything is fetched again from the committed offset.
    """

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        """Stop the flow, let a record being delivered land, then complete as Faust does."""
        self.app.consumer.stop_flow()
        await asyncio.sleep(0)
        await super().on_recovery_completed(generation_id)


class SeekingTableManager(TableManager):
    """Faust's table manager, recovering with :class:`SeekingRecovery`."""

    @property
    def recovery(self) -> Recovery:
        """The recovery service of these tables."""
        if self._recovery is None:
            self._recovery = SeekingRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


def app_settings(settings: LooplineSettings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App``: broker, security, logs, what Loopline's brokers need."""
    kafka = KafkaConfig.from_settings(settings)
    session_s = settings.session_timeout_ms / 1000
    conf: dict[str, Any] = {
        "broker": [f"kafka://{hp.strip()}" for hp in kafka.broker.bootstrap_servers.split(",")],
        "broker_session_timeout": session_s,
        "broker_heartbeat_interval": max(0.1, session_s / 10),
        "processing_guarantee": "at_least_once",
        "topic_replication_factor": settings.replication_factor,
        "TableManager": SeekingTableManager,
        "Stream": LooplineStream,
    }
    credentials = _credentials(settings)
    if credentials is not None:
        conf["broker_credentials"] = credentials
    if kafka.embedded:
        conf["producer_max_batch_size"] = 1  # one record per batch: see the module docstring
    if settings.log_format == "json":
        # Merged into the worker's logging setup (its -l level stays): one JSON object per line,
        # extra fields included, as Loopline's services log.
        conf["logging_config"] = {
            "merge": True, "version": 1,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json"}},
        }
    return conf


def main(argv: list[str] | None = None) -> None:
    """``python -m loopline.faust SPEC.yaml``: print the records generated for a pipeline spec."""
    parser = argparse.ArgumentParser(prog="python -m loopline.faust", description=main.__doc__)
    parser.add_argument("spec", help="pipeline spec YAML")
    print(records_source(load_spec(parser.parse_args(argv).spec)))


if __name__ == "__main__":
    main()
