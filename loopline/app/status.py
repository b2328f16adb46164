"""``loopline status``: what runs, how fast, how far behind, and what is wrong, per pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from loopline import avro, topics
from loopline.errors import SchemaError
from loopline.kafka import KafkaConfig, watermarks
from loopline.registry import RegistryState
from loopline.runtime.service import SERVICES

#: Which topic kinds each service consumes (its lag is measured on them).
CONSUMES = {"ingest": ("raw",), "inference": ("features",),
            "monitor": ("features", "predictions", "feedback"),
            "trainer": ("predictions", "feedback"),
            "lineage": ("features", "predictions", "feedback")}
_STAGES = ("champion", "canary", "challenger", "shadow")


@dataclass
class PipelineStatus:
    """One pipeline's numbers."""

    name: str
    versions: list[dict[str, Any]]
    #: Messages per second over the sample, per topic kind (approximate on the embedded broker).
    rates: dict[str, float]
    lag: dict[str, int | None]
    open_alerts: list[dict[str, Any]]
    last_retrain: dict[str, Any] | None


def high_watermarks(kafka: KafkaConfig, names: list[str]) -> dict[str, dict[int, int]]:
    """Per topic, per partition: the next offset to be written."""
    consumer = kafka.reader("loopline-status")
    try:
        metadata = consumer.list_topics(timeout=10).topics
        out: dict[str, dict[int, int]] = {}
        for name in names:
            if name in metadata:
                out[name] = {p: watermarks(consumer, name, p)[1] for p in metadata[name].partitions}
        return out
    finally:
        consumer.close()


def group_lag(kafka: KafkaConfig, group: str, ends: dict[str, dict[int, int]]) -> int | None:
    """Messages the group has not committed yet over the
    given topics (None: the group has committed nothing)."""
    parts = [TopicPartition(t, p) for t, ps in ends.items() for p in ps]
    if not parts:
        return None
    # An OffsetFetch with the group's id; this consumer never subscribes, so it never joins the
    # group.
    probe = Consumer(dict(kafka.common("loopline-status"),
                          **{"group.id": group, "enable.auto.commit": False}))
    try:
        committed = probe.committed(parts, timeout=10)
    finally:
        probe.close()
    if all(tp.offset < 0 for tp in committed):
        return None
    # max(0, ...): a watermark read a moment before the commit must not show as negative lag.
    return sum(max(0, ends[tp.topic][tp.partition] - max(tp.offset, 0)) for tp in committed)


def open_alerts(kafka: KafkaConfig) -> list[dict[str, Any]]:
    """Alert episodes raised and not yet resolved (read from the start of loopline.alerts)."""
    consumer = kafka.reader("loopline-status-alerts", **{"enable.partition.eof": True})
    codec = avro.codec("alert")
    ends = high_watermarks(kafka, [topics.ALERTS]).get(topics.ALERTS, {})
    consumer.assign([TopicPartition(topics.ALERTS, p, 0) for p in ends])
    episodes: dict[tuple[Any, ...], dict[str, Any]] = {}
    done: set[int] = {p for p, end in ends.items() if end == 0}
    deadline = time.monotonic() + 30
    try:
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is not None:
                    done.add(m.partition())
                    continue
                try:
                    a = codec.decode(m.value())
                except SchemaError:
                    continue
                ident = (a["pipeline"], a["signal"], a["model_name"], a["model_version"],
                         a["feature"], a["detector"])
                if a["state"] == "raised":
                    episodes[ident] = a
                else:
                    episodes.pop(ident, None)
                if m.offset() + 1 >= ends[m.partition()]:
                    done.add(m.partition())
    finally:
        consumer.close()
    return sorted(episodes.values(), key=lambda a: a["at"])


def served_shares(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The versions, each with ``share``: the part of the keys it serves, as inference routes them.

    Challengers and canaries serve their ``traffic``; the champion serves the rest (a record says
    1.0 for it whatever the others take); shadows score every event and serve none.
    """
    sliced = sum(v["traffic"] for v in versions if v["stage"] in ("challenger", "canary"))
    shares = {"champion": max(0.0, 1.0 - sliced), "shadow": 0.0}
    return [dict(v, share=shares.get(v["stage"], v["traffic"])) for v in versions]


def collect(kafka: KafkaConfig, state: RegistryState, pipelines: list[str],
            sample_s: float = 1.0) -> list[PipelineStatus]:
    """Gather every pipeline's status; events/s come
    from two watermark samples ``sample_s`` apart."""
    names = [t for p in pipelines for t in state.specs[p].topics.all()]
    first = high_watermarks(kafka, names)
    time.sleep(sample_s)
    second = high_watermarks(kafka, names)
    alerts = open_alerts(kafka)
    out = []
    for p in pipelines:
        spec = state.specs[p]
        rates = {kind: (sum(second.get(t, {}).values()) - sum(first.get(t, {}).values())) / sample_s
                 for kind in ("raw", "features", "predictions", "feedback", "deadletter")
                 for t in [getattr(spec.topics, kind)]}
        lag = {svc: group_lag(kafka, f"loopline-{svc}",
                              {t: second[t] for k in CONSUMES[svc]
                               for t in [getattr(spec.topics, k)] if t in second})
               for svc in SERVICES}
        deployed = (v for (vp, _, _), v in state.versions.items()
                    if vp == p and v["stage"] in _STAGES)
        versions = served_shares(sorted(
            deployed, key=lambda v: (_STAGES.index(v["stage"]), v["name"], v["version"])))
        trained = [v for (vp, _, _), v in state.versions.items() if vp == p and v.get("trigger")]
        last = max(trained, key=lambda v: v["created_at"]) if trained else None
        out.append(PipelineStatus(p, versions, rates, lag,
                                  [a for a in alerts if a["pipeline"] == p], last))
    return out
