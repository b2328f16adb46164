"""loopline.faust without a broker: records from the schemas, codecs, topic schemas, settings."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import faust
import orjson
import pytest
from faust.exceptions import ValueDecodeError
from faust.types.tuples import Message

from loopline import avro, feedback
from loopline import faust as lf
from loopline.feedback import FeedbackError
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec


def _spec(features: list[dict[str, Any]] | None = None) -> PipelineSpec:
    features = features or [{"name": "amount", "type": "float"},
                            {"name": "country", "type": "string", "required": False}]
    return parse_spec({"name": "shop", "partitions": 4, "features": features,
                       "label": {"classes": ["no", "yes"]}})


@pytest.fixture
def app() -> faust.App:
    """An app that is never started (no broker needed)."""
    return faust.App("unit", broker="kafka://127.0.0.1:1")


def _message(value: bytes | None, topic: str = "loopline.shop.predictions", partition: int = 1,
             offset: int = 7, timestamp: float | None = 1700000000.5) -> Message:
    return Message(topic, partition, offset, timestamp,  # type: ignore[arg-type]  # a hand-made message
                   0, [], b"k", value, None)


def _prediction(**overrides: Any) -> dict[str, Any]:
    return {"prediction_id": "p1", "event_id": "e1", "key": "c42", "pipeline": "shop",
            "model_name": "shop", "model_version": 3, "model_sha256": "ab" * 32,
            "variant": "champion",
            "served": True, "label": "yes", "value": 0.8, "scores": {"no": 0.2, "yes": 0.8},
            "source": {"topic": "loopline.shop.features", "partition": 1, "offset": 41},
            "event_ts": 10, "scored_at": 11, **overrides}


def test_records_have_the_schema_fields_typed_with_optional_ones_defaulting_to_none() -> None:
    recs = lf.records(_spec())
    fields = recs.Prediction._options.fields
    assert set(fields) == {f["name"] for f in avro.load_schema("prediction")["fields"]}
    assert fields["model_version"] is int and fields["served"] is bool
    assert fields["source"] is recs.SourceOffset
    assert recs.Prediction._options.defaults == {"key": None, "label": None, "value": None}
    assert recs.FeatureEvent._options.fields["source"] is recs.SourceOffset
    assert recs.Features._options.fields["amount"] is float
    assert recs.Features._options.defaults == {"country": None}
    assert lf.records(_spec()) == recs  # generated once per spec


def test_prediction_decodes_into_nested_records_and_encodes_back(app: faust.App) -> None:
    topics = lf.pipeline_topics(app, _spec())
    data = avro.codec("prediction").encode(_prediction())
    p = topics.predictions.schema.loads_value(app, _message(data))
    assert isinstance(p, topics.records.Prediction)
    assert isinstance(p.source, topics.records.SourceOffset)
    assert (p.label, p.scores["yes"], p.source.offset, p.variant) == ("yes", 0.8, 41, "champion")
    payload, _ = topics.predictions.schema.dumps_value(app, p, headers=None)
    assert avro.codec("prediction").decode(payload) == _prediction()


def test_a_feature_named_like_a_keyword_or_record_member_keeps_its_name_on_the_wire(
        app: faust.App) -> None:
    spec = _spec([{"name": "from", "type": "string"}, {"name": "from_", "type": "int"},
                  {"name": "dumps", "type": "float", "required": False}])
    topics = lf.pipeline_topics(app, spec)
    event = {"event_id": "e1", "key": None, "ts": 1, "ingested_at": 2,
             "source": {"topic": "loopline.shop.raw", "partition": 0, "offset": 3},
             "features": {"from": "DE", "from_": 4, "dumps": None}, "content_hash": "c1"}
    codec = avro.Codec(spec.features_schema())
    record = topics.features.schema.loads_value(app, _message(codec.encode(event)))
    features = record.features
    assert (features.from__, features.from_, features.dumps_) == ("DE", 4, None)
    payload, _ = topics.features.schema.dumps_value(app, record, headers=None)
    assert codec.decode(payload) == event
    source = lf.records_source(spec)
    assert "from__: str = FieldDescriptor(input_name='from', output_name='from')" in source
    assert "dumps_: float | None = FieldDescriptor(input_name='dumps', output_name='dumps', " \
           "required=False, default=None)" in source


def test_features_of_an_older_spec_are_read_when_its_schema_is_given(app: faust.App) -> None:
    old = _spec([{"name": "amount", "type": "float"}])
    new = _spec([{"name": "amount", "type": "float"},
                 {"name": "country", "type": "string", "required": False}])
    event = {"event_id": "e1", "key": None, "ts": 1, "ingested_at": 2,
             "source": {"topic": "loopline.shop.raw", "partition": 0, "offset": 3},
             "features": {"amount": 9.5}}
    message = _message(avro.Codec(old.features_schema()).encode(event))
    with pytest.raises(ValueDecodeError, match="unknown writer schema"):
        lf.pipeline_topics(app, new).features.schema.loads_value(app, message)
    topics = lf.pipeline_topics(app, new, features_writers=[old.features_schema()])
    record = topics.features.schema.loads_value(app, message)
    assert (record.features.amount, record.features.country) == (9.5, None)


def test_json_feedback_without_an_id_gets_the_id_loopline_derives_from_the_message(
        app: faust.App) -> None:
    topics = lf.pipeline_topics(app, _spec())
    value = b'{"prediction_id": "p1", "label": "yes"}'
    message = _message(value, "loopline.shop.feedback", 2, 40)
    record = topics.feedback.schema.loads_value(app, message)
    assert record.feedback_id == feedback.derived_id("loopline.shop.feedback", 2, 1700000000500,
                                                     value)
    assert (record.prediction_id, record.label, record.ts) == ("p1", "yes", 1700000000500)
    avro_message = _message(feedback.encode(dict(record.asdict())), "loopline.shop.feedback", 2, 41)
    assert topics.feedback.schema.loads_value(app, avro_message) == record


def test_feedback_is_written_as_avro_only_when_loopline_would_accept_it(app: faust.App) -> None:
    topics = lf.pipeline_topics(app, _spec())
    good = topics.feedback_record(prediction_id="p1", verdict="reject")
    payload, _ = topics.feedback.schema.dumps_value(app, good, headers=None)
    assert payload[:2] == avro.MAGIC
    assert feedback.decode(payload, "t", 0, classes=["no", "yes"]) == good.asdict()
    with pytest.raises(FeedbackError, match="not one of the classes"):
        topics.feedback_record(prediction_id="p1", label="maybe")
    unchecked = topics.records.Feedback(feedback_id="f", ts=1, prediction_id="p1", label="maybe")
    with pytest.raises(FeedbackError, match="not one of the classes"):
        topics.feedback.schema.dumps_value(app, unchecked, headers=None)


@pytest.mark.parametrize(("value", "error"), [
    (b"not avro", "bad magic bytes"),
    (None, "bad magic bytes"),
    (orjson.dumps(_prediction()), "bad magic bytes"),
    (avro.codec("prediction").encode(_prediction())[:-12], "corrupt"),
    (avro.codec("alert").encode({"alert_id": "a", "pipeline": "shop", "state": "raised",
                                 "severity": "alert", "signal": "drift", "message": "m", "at": 1,
                                 **dict.fromkeys(("model_name", "model_version", "feature",
                                                  "detector", "statistic", "threshold", "window",
                                                  "first_offset", "last_offset"))}),
     "unknown writer schema"),
])
def test_a_message_that_is_not_a_prediction_is_a_decode_error_naming_where_it_is(
        app: faust.App, value: bytes | None, error: str) -> None:
    topics = lf.pipeline_topics(app, _spec())
    with pytest.raises(ValueDecodeError, match=rf"loopline\.shop\.predictions\[1\]@7: .*{error}"):
        topics.predictions.schema.loads_value(app, _message(value))


def test_an_undecodable_message_is_logged_and_not_thrown_at_the_agent(
        app: faust.App, caplog: pytest.LogCaptureFixture) -> None:
    topic = lf.pipeline_topics(app, _spec()).predictions
    thrown: list[BaseException] = []

    async def throw(exc: BaseException) -> None:  # what Faust's default handler calls
        thrown.append(exc)

    topic.throw = throw  # type: ignore[method-assign]  # a test double

    async def fail_twice() -> None:
        await topic.on_value_decode_error(ValueDecodeError("bad"), _message(b"x"))
        await topic.on_key_decode_error(ValueDecodeError("bad key"), _message(b"x"))

    with caplog.at_level(logging.WARNING, logger="loopline.faust"):
        asyncio.run(fail_twice())
    assert thrown == []
    logged = [r for r in caplog.records if r.getMessage() == "faust_bad_message"]
    assert [(r.topic, r.partition, r.offset) for r in logged] == [  # type: ignore[attr-defined]  # set by the code under test
        ("loopline.shop.predictions", 1, 7)] * 2



def test_with_loopline_streams_an_undecodable_message_is_skipped_in_its_turn(
        caplog: pytest.LogCaptureFixture) -> None:
    # Faust acknowledges a message it cannot decode at once, ahead of those fetched before it;
    # with app_settings the message becomes an Undecodable value that the stream skips (and
    # acknowledges) after them.
    settings = lf.app_settings(LooplineSettings(bootstrap_servers="127.0.0.1:1"))

    async def run() -> tuple[Any, list[Any], list[Any], bool]:
        app = faust.App("unit-skip", loop=asyncio.get_running_loop(), **settings)
        topic = lf.pipeline_topics(app, _spec()).predictions
        value = topic.schema.loads_value(app, _message(b"not avro"))
        stream = app.stream([1, value, 2])
        derived = app.stream([value, 3]).filter(lambda v: True)
        try:
            return (value, [v async for v in stream], [v async for v in derived],
                    isinstance(stream, lf.LooplineStream))
        finally:  # a stream acknowledges through the app's consumer: never started, loop unused
            app.consumer._thread.thread_loop.close()  # type: ignore[attr-defined]  # Faust's own

    with caplog.at_level(logging.WARNING, logger="loopline.faust"):
        value, read, read_derived, ours = asyncio.run(run())
    assert isinstance(value, lf.Undecodable)
    assert value.where == "loopline.shop.predictions[1]@7" and "bad magic bytes" in value.error
    logged = [r for r in caplog.records if r.getMessage() == "faust_bad_message"]
    assert [(r.topic, r.partition, r.offset) for r in logged] == [  # type: ignore[attr-defined]  # set by the code under test
        ("loopline.shop.predictions", 1, 7)]
    assert ours and read == [1, 2] and read_derived == [3]


def test_a_key_that_is_not_utf8_does_not_cost_the_record(app: faust.App) -> None:
    # Loopline's services read such keys with replacement characters; Faust would skip the message.
    schema = lf.pipeline_topics(app, _spec()).predictions.schema
    message = _message(avro.codec("prediction").encode(_prediction()))
    for key, text in ((b"k1", "k1"), (None, None), (b"\xff\xfek", "\ufffd\ufffdk")):
        message.key = key
        assert schema.loads_key(app, message) == text
    assert schema.loads_value(app, message).prediction_id == _prediction()["prediction_id"]

def test_topics_carry_the_pipeline_partitions_for_co_partitioned_tables(app: faust.App) -> None:
    topics = lf.pipeline_topics(app, _spec())
    assert topics.predictions.get_topic_name() == "loopline.shop.predictions"
    assert topics.predictions.partitions == topics.features.partitions == 4
    assert topics.alerts.get_topic_name() == "loopline.alerts"


def test_app_settings_tune_faust_for_the_embedded_broker_only() -> None:
    embedded = lf.app_settings(LooplineSettings(bootstrap_servers="a:1, b:2",
                                                kafka_profile="embedded", session_timeout_ms=6000))
    assert embedded["broker"] == ["kafka://a:1", "kafka://b:2"]
    assert (embedded["broker_session_timeout"], embedded["broker_heartbeat_interval"]) == (6.0, 0.6)
    assert embedded["producer_max_batch_size"] == 1
    assert "broker_credentials" not in embedded
    kafka = lf.app_settings(LooplineSettings(bootstrap_servers="a:1", kafka_profile="kafka"))
    assert "producer_max_batch_size" not in kafka
    assert faust.App("unit-kafka", **kafka).conf.broker_session_timeout == 10.0


def test_app_settings_make_the_worker_log_json_lines_unless_console_is_asked() -> None:
    json_logs = lf.app_settings(LooplineSettings(bootstrap_servers="a:1"))["logging_config"]
    assert json_logs["handlers"]["default"]["formatter"] == "json" and json_logs["merge"]
    console = LooplineSettings(bootstrap_servers="a:1", log_format="console")
    assert "logging_config" not in lf.app_settings(console)


@pytest.mark.parametrize(("protocol", "kind", "ssl_context"), [
    ("SASL_SSL", faust.SASLCredentials, True),
    ("SASL_PLAINTEXT", faust.SASLCredentials, False),
    ("SSL", faust.SSLCredentials, True),
])
def test_app_settings_carry_the_security_settings(protocol: str, kind: type, ssl_context: bool
                                                  ) -> None:
    settings = LooplineSettings(bootstrap_servers="a:1", kafka_profile="kafka",
                                security_protocol=protocol, sasl_mechanism="SCRAM-SHA-512",
                                sasl_username="u", sasl_password="pw")
    credentials: Any = lf.app_settings(settings)["broker_credentials"]
    assert isinstance(credentials, kind)
    context = getattr(credentials, "context", None) or getattr(credentials, "ssl_context", None)
    assert isinstance(context, ssl.SSLContext) is ssl_context
    if kind is faust.SASLCredentials:
        assert (credentials.username, credentials.password) == ("u", "pw")
        assert credentials.mechanism.value == "SCRAM-SHA-512"
        assert credentials.protocol.value == protocol
