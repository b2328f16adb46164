"""IngestService.process without a broker: the fast path changes nothing but the speed."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from ingest_corpus import corpus, edge_spec

from loopline import avro
from loopline.runtime import outputs
from loopline.runtime.outputs import Outputs
from loopline.runtime.service import ServiceRuntime
from loopline.services.ingest import IngestService, IngestSettings, derived_event_id
from loopline.services.ingest import service as ingest_service
from loopline.services.ingest.idempotency import EventIndex
from loopline.services.ingest.service import _Pipeline
from loopline.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
GOOD = {
    "customer_id": "c1",
    "amount": 12.5,
    "merchant_risk": 0.2,
    "hour": 3,
    "country": "DE",
    "card_present": True,
}


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[IngestService]:
    # A frozen clock: ingested_at, dead letters' 'at' and the ts of events with none stay equal.
    monkeypatch.setattr(ingest_service, "now_ms", lambda: 1_800_000_000_000)
    monkeypatch.setattr(outputs, "now_ms", lambda: 1_800_000_000_000)
    settings = IngestSettings(
        bootstrap_servers="127.0.0.1:1",
        kafka_profile="embedded",
        home=tmp_path,
        log_level="WARNING",
        deadletter_max_bytes=8192,
    )
    with ServiceRuntime("ingest", settings, install_signals=False) as rt:
        yield IngestService(rt, settings, delivery=object())  # type: ignore[arg-type]  # never used by this test


def serve(service: IngestService, *specs: PipelineSpec) -> None:
    for spec in specs:
        service.pipelines[spec.topics.raw] = _Pipeline.build(spec, EventIndex(100_000))


def messages(spec: PipelineSpec, values: list[bytes | None], seed: int = 0) -> list[Message]:
    """Raw messages as a consumer hands them out: some without key or Kafka timestamp."""
    rng = random.Random(seed)
    out = []
    for i, v in enumerate(values):
        ts = (TIMESTAMP_NOT_AVAILABLE, 0) if rng.random() < 0.1 else (1, 1_700_000_000_000 + i)
        key = None if rng.random() < 0.2 else f"k{i % 13}".encode()
        out.append(
            Message(
                topic=spec.topics.raw,
                partition=i % 3,
                offset=i // 3,
                value=v,
                key=key,
                timestamp=ts,
            )
        )
    return out


_ADDRESS = re.compile(rb" at 0x[0-9a-f]+")


def run(service: IngestService, batches: list[list[Message]]) -> list[tuple[Any, ...]]:
    """Every output of the batches (committed one after the other)."""
    got = []
    for batch in batches:
        out = Outputs("ingest", max_deadletter_bytes=8192)
        service.process(batch, out)
        for o in out.items:
            # fastavro's message for a corrupt Avro input names a BytesIO by its address
            value = _ADDRESS.sub(b"", o.value or b"")
            headers = [(k, _ADDRESS.sub(b"", v)) for k, v in o.headers or ()]
            key = o.key.encode() if isinstance(o.key, str) else o.key  # the same key on the wire
            got.append((o.topic, value, key, headers))
        out.committed()
    return got


def counts(service: IngestService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The service's counters (not the clock-dependent ones)."""
    return {
        (m.name, tuple(sorted(m.labels.items()))): m.value
        for metric in service.rt.registry.collect()
        for m in metric.samples
        if m.name.startswith("loopline_ingest_")
        and not m.name.endswith("_created")
        and "seconds" not in m.name
    }


@pytest.mark.parametrize(
    "spec",
    [
        load_spec(REPO / "examples" / "fraud.yaml"),
        edge_spec(),
        load_spec(REPO / "examples" / "fraud.yaml").model_copy(update={"unknown_fields": "drop"}),
    ],
    ids=["fraud", "edge", "drop"],
)
def test_outputs_are_the_same_with_and_without_the_msgspec_fast_path(
    service: IngestService, spec: PipelineSpec
) -> None:
    cases = corpus(spec, 4000, seed=11)
    values = [c.value for c in cases]
    values += values[:300]  # re-sent: duplicates of events with ids
    batches = [messages(spec, values)[i : i + 500] for i in range(0, len(values), 500)]
    serve(service, spec)
    fast = run(service, batches)
    assert sum(o[0].endswith("features") for o in fast) > 1000
    first = counts(service)

    def refuse(value: bytes) -> Any:
        raise msgspec.ValidationError("the full path for every message")

    service.pipelines.clear()
    serve(service, spec)  # a fresh idempotency index
    service.pipelines[spec.topics.raw].validator.decode_fast = refuse
    assert run(service, batches) == fast
    assert {k: v - first.get(k, 0.0) for k, v in counts(service).items()} == first  # counted alike


def test_a_duplicate_in_a_later_run_of_the_same_batch_is_recognised(service: IngestService) -> None:
    fraud = load_spec(REPO / "examples" / "fraud.yaml")
    other = fraud.model_copy(update={"name": "other"})
    serve(service, fraud, other)
    event = orjson.dumps({"event_id": "e1", "features": GOOD})
    batch = messages(fraud, [event]) + messages(other, [event]) + messages(fraud, [None, event])[1:]
    batch[-1] = Message(
        topic=fraud.topics.raw, partition=1, offset=7, value=event, key=None, timestamp=(1, 5)
    )
    out = Outputs("ingest")
    service.process(batch, out)
    out.committed()
    assert [o.topic for o in out.items] == [fraud.topics.features, other.topics.features]
    assert (
        service.rt.registry.get_sample_value(
            "loopline_ingest_duplicates_total", {"pipeline": "fraud"}
        )
        == 1
    )


def test_a_duplicate_of_a_sent_but_unconfirmed_batch_is_recognised(service: IngestService) -> None:
    # On at-least-once the loop processes the next batch before the last one is acknowledged.
    fraud = load_spec(REPO / "examples" / "fraud.yaml")
    serve(service, fraud)
    event = orjson.dumps({"event_id": "e1", "features": GOOD})
    first, second = Outputs("ingest"), Outputs("ingest")
    service.process(messages(fraud, [event]), first)
    first.sent()  # handed to Kafka, not confirmed (its commit callbacks have not run)
    assert service.rt.registry.get_sample_value(
        "loopline_ingest_accepted_total", {"pipeline": "fraud"}) in (None, 0)
    later = Message(topic=fraud.topics.raw, partition=0, offset=9, value=event, key=None,
                    timestamp=(1, 5))
    service.process([later], second)
    second.committed()
    assert second.items == []
    first.committed()
    duplicates = service.rt.registry.get_sample_value("loopline_ingest_duplicates_total",
                                                      {"pipeline": "fraud"})
    assert duplicates == 1


def test_derived_ids_and_keys(service: IngestService) -> None:
    fraud = load_spec(REPO / "examples" / "fraud.yaml").model_copy(update={"key": None})
    serve(service, fraud)
    values: list[bytes | None] = [orjson.dumps({"features": GOOD})] * 3
    batch = messages(fraud, values)
    out = Outputs("ingest")
    service.process(batch, out)
    codec = avro.Codec(fraud.features_schema())
    for m, o in zip(batch, out.items):
        record = codec.decode(o.value)
        assert record["event_id"] == derived_event_id(m.topic(), m.partition(), m.offset())
        raw_key = m.key()
        expected = raw_key if raw_key is not None else record["event_id"].encode()
        assert (o.key.encode() if isinstance(o.key, str) else o.key) == expected
