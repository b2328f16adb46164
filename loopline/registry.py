"""The event-sourced registry on ``loopline.models``: pipeline specs, model versions, stage changes.

Every service rebuilds its view by reading the topic from the start (:class:`RegistryReader`).
Specs and versions are keyed so compaction keeps the latest of each; stage changes get a key
of their own each, so the full history ("which version served at time T") survives compaction.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from loopline import avro, topics
from loopline.errors import LooplineError, SchemaError
from loopline.kafka import AckedProducer, KafkaConfig, TopicSpec
from loopline.spec import PipelineSpec, spec_from_json

log = logging.getLogger(__name__)

MODELS_TOPIC = TopicSpec(topics.MODELS, partitions=1, config={"cleanup.policy": "compact"})
ALERTS_TOPIC = TopicSpec(topics.ALERTS, partitions=1)


def now_ms() -> int:
    """Current time, epoch milliseconds."""
    return time.time_ns() // 1_000_000


def spec_event(spec: PipelineSpec) -> tuple[bytes, dict[str, Any]]:
    """The registry key and event that publish a pipeline spec."""
    event = {
        "kind": "pipeline_spec",
        "pipeline": spec.name,
        "at": now_ms(),
        "spec": {
            "spec_json": spec.canonical_json().decode(),
            "spec_sha256": spec.sha256(),
            "features_schema_json": orjson.dumps(spec.features_schema(), option=orjson.OPT_SORT_KEYS).decode(),
        },
        "model": None,
        "stage_change": None,
    }
    # One key per spec version: compaction keeps every version, so readers can still decode
    # events written under an older features schema.
    return f"pipeline/{spec.name}/spec/{spec.sha256()}".encode(), event


def stage_change_key(pipeline: str, name: str, version: int) -> bytes:
    """A unique key, so compaction never drops a stage change."""
    return f"pipeline/{pipeline}/stage/{name}/{version}/{now_ms()}-{uuid.uuid4().hex[:8]}".encode()


def model_version_key(pipeline: str, name: str, version: int) -> bytes:
    """The key of one model version record."""
    return f"pipeline/{pipeline}/model/{name}/{version}".encode()


def rebaseline_event(pipeline: str, reason: str = "",
                     actor: str = "cli") -> tuple[bytes, dict[str, Any]]:
    """The registry key and event telling the monitor to take recent live traffic as reference."""
    rid = f"{now_ms()}-{uuid.uuid4().hex[:12]}"
    event = {"kind": "rebaseline", "pipeline": pipeline, "at": now_ms(), "spec": None,
             "model": None, "stage_change": None,
             "rebaseline": {"id": rid, "reason": reason, "actor": actor}}
    # A key of its own, so compaction keeps every rebaseline (a monitor replaying the topic
    # recognises the ones it applied by id).
    return f"pipeline/{pipeline}/rebaseline/{rid}".encode(), event


def publish(producer: AckedProducer, key: bytes, event: dict[str, Any]) -> None:
    """Send one registry event and wait for the broker's acknowledgement."""
    producer.send(topics.MODELS, avro.codec("registry").encode(event), key=key)
    producer.confirm()


@dataclass
class RegistryState:
    """What the registry says now, rebuilt from its events in order."""

    specs: dict[str, PipelineSpec] = field(default_factory=dict)
    spec_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    features_schemas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    versions: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    stage_changes: list[dict[str, Any]] = field(default_factory=list)
    #: (at, pipeline, name, version, stage, traffic) for every registration and stage change, in order.
    stage_history: list[tuple[int, str, str, int, str, float]] = field(default_factory=list)
    #: Monitor rebaselines per pipeline, in order: dicts with id, reason, actor, at.
    rebaselines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    offset: int = -1

    def apply(self, event: dict[str, Any], offset: int) -> None:
        """Fold one event into the state."""
        pipeline = event["pipeline"]
        if event["kind"] == "pipeline_spec" and event["spec"] is not None:
            self.specs[pipeline] = spec_from_json(event["spec"]["spec_json"])
            self.spec_events[pipeline] = event
            self.features_schemas.setdefault(pipeline, []).append(
                orjson.loads(event["spec"]["features_schema_json"]))
        elif event["kind"] == "model_version" and event["model"] is not None:
            m = event["model"]
            self.versions[(pipeline, m["name"], m["version"])] = dict(m, pipeline=pipeline, at=event["at"])
            self.stage_history.append((event["at"], pipeline, m["name"], m["version"], m["stage"], m["traffic"]))
        elif event["kind"] == "stage_change" and event["stage_change"] is not None:
            c = event["stage_change"]
            self.stage_changes.append(dict(c, pipeline=pipeline, at=event["at"]))
            self.stage_history.append((event["at"], pipeline, c["name"], c["version"], c["to_stage"], c["traffic"]))
            version = self.versions.get((pipeline, c["name"], c["version"]))
            if version is not None:
                version["stage"], version["traffic"] = c["to_stage"], c["traffic"]
        elif event["kind"] == "rebaseline" and event.get("rebaseline") is not None:
            command = dict(event["rebaseline"], at=event["at"])
            self.rebaselines.setdefault(pipeline, []).append(command)
        self.offset = offset

    def deployment_at(self, pipeline: str, at_ms: int) -> dict[tuple[str, int], tuple[str, float]]:
        """Stage and traffic of every version of ``pipeline`` as they stood at ``at_ms``."""
        plan: dict[tuple[str, int], tuple[str, float]] = {}
        for at, p, name, version, stage, traffic in self.stage_history:
            if p == pipeline and at <= at_ms:
                plan[(name, version)] = (stage, traffic)
        return plan

    def features_codec(self, pipeline: str) -> avro.Codec:
        """Codec of a pipeline's features topic that also reads events written under older specs."""
        history = self.features_schemas[pipeline]
        return avro.Codec(self.specs[pipeline].features_schema(), writers=history[:-1])


class RegistryReader:
    """Reads ``loopline.models`` from the beginning and keeps following it."""

    def __init__(self, kafka: KafkaConfig, client_id: str = "loopline-registry") -> None:
        self._consumer: Consumer = kafka.reader(client_id, **{"enable.partition.eof": True})
        self._consumer.assign([TopicPartition(topics.MODELS, 0, OFFSET_BEGINNING)])
        self._codec = avro.codec("registry")
        self.state = RegistryState()
        self._position = -1  # last offset read, applied or skipped

    def poll(self, timeout_s: float = 0.0, max_messages: int = 1000) -> int:
        """Apply newly arrived events; return how many."""
        applied = 0
        for m in self._consumer.consume(max_messages, timeout_s):
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("registry_read_error", extra={"error": err.str()})
                continue
            self._position = m.offset()
            try:
                event = self._codec.decode(m.value())
                self.state.apply(event, m.offset())
            except (SchemaError, LooplineError) as e:
                # A bad registry record must not stop a service; it is skipped and reported.
                log.error("registry_bad_event", extra={"offset": m.offset(), "error": str(e)})
                continue
            applied += 1
        return applied

    def catch_up(self, timeout_s: float = 30.0) -> RegistryState:
        """Read until the end of the topic as it was when called; return the state."""
        _, high = self._consumer.get_watermark_offsets(TopicPartition(topics.MODELS, 0), timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        # Tansu reports the high watermark as the last batch's base offset + 1, so reaching it is not
        # the end: read on until a poll brings nothing more (on Kafka that costs one short poll).
        while True:
            before = self._position
            self.poll(0.2)
            if self._position == before and self._position + 1 >= high:
                return self.state
            if time.monotonic() > deadline:
                raise LooplineError(f"registry: read up to offset {self._position} of {high} "
                                    f"within {timeout_s:.0f}s")

    def close(self) -> None:
        """Close the consumer."""
        self._consumer.close()
