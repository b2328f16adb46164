"""Apply a pipeline spec: check it against the registry, create its topics, publish it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loopline import avro
from loopline.errors import SpecError
from loopline.kafka import AckedProducer, KafkaConfig, TopicSpec, ensure_topics
from loopline.registry import GLOBAL_TOPICS, RegistryReader, publish, spec_event
from loopline.spec import PipelineSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyResult:
    """What applying a spec changed."""

    pipeline: str
    created_topics: list[str]
    published: bool
    previous_sha256: str | None


def ensure_global_topics(kafka: KafkaConfig) -> list[str]:
    """Create ``loopline.models`` (compacted), ``loopline.alerts`` and ``loopline.deadletter`` if missing."""
    return ensure_topics(kafka.admin(), list(GLOBAL_TOPICS), kafka.settings.replication_factor)


def pipeline_topics(spec: PipelineSpec) -> list[TopicSpec]:
    """The five topics of a pipeline, each with the spec's partition count."""
    return [TopicSpec(name, spec.partitions) for name in spec.topics.all()]


def check_evolution(old: PipelineSpec, new: PipelineSpec) -> None:
    """Refuse a spec whose features schema cannot read events written under the old one."""
    reason = avro.is_backward_compatible(new.features_schema(), old.features_schema())
    if reason is not None:
        raise SpecError(
            f"pipeline {new.name}",
            [("features", "backward_compatible",
              "the new features cannot read events written under the registered spec "
              f"(add new features as required: false, never change a type): {reason}")],
        )


def apply_spec(kafka: KafkaConfig, spec: PipelineSpec) -> ApplyResult:
    """Validate against the registered spec, create topics, publish if changed. Idempotent."""
    created = ensure_global_topics(kafka)
    reader = RegistryReader(kafka, client_id="loopline-apply")
    try:
        state = reader.catch_up()
    finally:
        reader.close()
    previous = state.specs.get(spec.name)
    if previous is not None:
        check_evolution(previous, spec)
    created += ensure_topics(kafka.admin(), pipeline_topics(spec), kafka.settings.replication_factor)
    publish_needed = previous is None or previous.sha256() != spec.sha256()
    if publish_needed:
        producer = AckedProducer(kafka.producer("loopline-apply"))
        key, event = spec_event(spec)
        publish(producer, key, event)
    log.info("pipeline_applied", extra={"pipeline": spec.name, "created_topics": created,
                                        "published": publish_needed})
    return ApplyResult(spec.name, created, publish_needed, previous.sha256() if previous else None)
