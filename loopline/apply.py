"""Apply a pipeline spec: check it against the registry, create its topics, publish it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from loopline import avro
from loopline.errors import LooplineError, SpecError
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
    #: Topic configs changed on existing topics: topic -> {config: new value, None if reverted}.
    altered_configs: dict[str, dict[str, str | None]] = field(default_factory=dict)


def ensure_global_topics(kafka: KafkaConfig) -> list[str]:
    """Create ``loopline.models`` (compacted),
    ``loopline.alerts`` and ``loopline.deadletter`` if missing."""
    return ensure_topics(kafka.admin(), list(GLOBAL_TOPICS), kafka.settings.replication_factor)


def topic_configs(spec: PipelineSpec) -> dict[str, dict[str, str]]:
    """The topic-level configs the spec sets, per topic name (today: ``retention.ms``)."""
    return {getattr(spec.topics, kind): {"retention.ms": str(ms)}
            for kind, ms in spec.retention.ms().items()}


def pipeline_topics(spec: PipelineSpec) -> list[TopicSpec]:
    """The five topics of a pipeline, each with the spec's partition count and topic configs."""
    configs = topic_configs(spec)
    return [TopicSpec(name, spec.partitions, configs.get(name, {})) for name in spec.topics.all()]


def sync_topic_configs(admin: AdminClient, spec: PipelineSpec, previous: PipelineSpec | None,
                       timeout_s: float = 30.0) -> dict[str, dict[str, str | None]]:
    """Make the existing topics' configs what the spec says; return what changed.

    A config the spec sets is SET where the topic differs (someone may have changed it by hand);
    one the previous spec set and this one drops is DELETEd (back to the broker default). Configs
    no spec ever set are left alone: an operator may own them.
    """
    wanted = topic_configs(spec)
    before = topic_configs(previous) if previous is not None else {}
    names = spec.topics.all()
    current = {}
    futures = admin.describe_configs([ConfigResource("topic", n) for n in names],
                                     request_timeout=timeout_s)
    for resource, future in futures.items():
        try:
            current[resource.name] = {k: e.value for k, e in future.result().items()}
        except KafkaException as e:
            raise LooplineError(f"could not read the configs of topic {resource.name}: "
                                f"{e.args[0].str()}") from e
    changes: dict[str, dict[str, str | None]] = {}
    for name in names:
        have, want = current.get(name, {}), wanted.get(name, {})
        change: dict[str, str | None] = {k: v for k, v in want.items() if have.get(k) != v}
        change.update({k: None for k in before.get(name, {}) if k not in want})
        if change:
            changes[name] = change
    if not changes:
        return {}
    resources = [ConfigResource("topic", name, incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET if v is not None
                    else AlterConfigOpType.DELETE) for k, v in change.items()])
        for name, change in changes.items()]
    for resource, future in admin.incremental_alter_configs(resources,
                                                            request_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as e:
            raise LooplineError(f"could not set {changes[resource.name]} on topic {resource.name}: "
                                f"{e.args[0].str()}") from e
    log.info("topic_configs_altered", extra={"pipeline": spec.name, "changes": changes})
    return changes


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
    admin = kafka.admin()
    created += ensure_topics(admin, pipeline_topics(spec), kafka.settings.replication_factor)
    altered = sync_topic_configs(admin, spec, previous)
    publish_needed = previous is None or previous.sha256() != spec.sha256()
    if publish_needed:
        producer = AckedProducer(kafka.producer("loopline-apply"))
        key, event = spec_event(spec)
        publish(producer, key, event)
    log.info("pipeline_applied", extra={"pipeline": spec.name, "created_topics": created,
                                        "published": publish_needed})
    return ApplyResult(spec.name, created, publish_needed, previous.sha256() if previous else None,
                       altered)
