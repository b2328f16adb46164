"""Stateful services scale out (issue 19): two monitor and two trainer replicas split the pipelines,
and kill -9 of one of each mid-stream moves its pipelines to the other with their state: no alert
lost or raised twice, no label learned twice, no candidate trained twice."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from river.datasets import synth
from services_harness import ServiceProcess, changelog_state, service_env, wait_until

from loopline import avro, feedback, topics
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion, versions_of
from loopline.registry import now_ms
from loopline.runtime.state import partition_of
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration

PIPELINES = 4
EVENTS = 2400
DRIFT = 1200
LABEL_DELAY = 100


def make_spec(name: str) -> PipelineSpec:
    return parse_spec({
        "name": name, "partitions": 1,
        "features": [{"name": f"x{i}", "type": "float"} for i in (1, 2, 3)],
        "label": {"task": "classification", "classes": ["false", "true"], "positive": "true"},
        "deployment": {"promotion": "manual"},
        "monitor": {"window": 400, "zombie_after_s": 3600},
        "trainer": {"holdout": 100, "retrain": {"drift_settle_labels": 200, "warm_start": True}}})


def sea(n: int, variant: int, seed: int) -> list[tuple[dict[str, float], str]]:
    return [({f"x{i + 1}": float(v) for i, v in x.items()}, str(y).lower())
            for x, y in synth.SEA(variant=variant, seed=seed).take(n)]


def first_model(spec: PipelineSpec) -> tuple[bytes, list[dict[str, float]]]:
    from loopline.services.trainer.export import to_onnx
    from loopline.services.trainer.learner import Learner

    learner = Learner(spec)
    data = sea(1500, 0, 99)
    for x, y in data:
        learner.learn(x, y)
    return to_onnx(learner), [x for x, _ in data[:1000]]


def stream(seed: int) -> list[tuple[dict[str, float], str]]:
    """SEA before the drift; after it the concept changes and x1 shifts (both the error stream and
    the feature distributions see it)."""
    before = sea(DRIFT, 0, seed)
    after = [({**x, "x1": x["x1"] * 0.5 + 6.0}, y) for x, y in sea(EVENTS - DRIFT, 3, seed + 1)]
    return before + after


class Feeder:
    """Feature events and late labels of several pipelines, in lockstep."""

    def __init__(self, kafka: KafkaConfig, specs: list[PipelineSpec]) -> None:
        self.specs = specs
        self.producer = AckedProducer(kafka.producer("test-feeder"))
        self.codecs = {s.name: avro.Codec(s.features_schema()) for s in specs}
        self.data = {s.name: stream(seed=7 + i) for i, s in enumerate(specs)}
        self.sent = 0

    def send(self, upto: int) -> None:
        for i in range(self.sent, upto):
            for s in self.specs:
                x, _ = self.data[s.name][i]
                self.producer.send(s.topics.features, self.codecs[s.name].encode({
                    "event_id": f"e{i}", "key": f"k{i % 50}", "ts": now_ms(),
                    "ingested_at": now_ms(),
                    "source": {"topic": s.topics.raw, "partition": 0, "offset": i}, "features": x,
                    "content_hash": None}), key=f"k{i % 50}".encode())
                j = i - LABEL_DELAY
                if j >= 0:
                    label = self.data[s.name][j][1]
                    self.producer.send(s.topics.feedback, feedback.encode(feedback.make(
                        event_id=f"e{j}", label=label, feedback_id=f"f{j}")), key=f"e{j}".encode())
        self.producer.confirm()
        self.sent = upto


def spread_names(prefix: str) -> list[str]:
    """Pipeline names hashing to changelog partitions 0, 1, 6 and 7 of 12: whether the group hands
    out ranges or alternates, each of two replicas owns two of them."""
    wanted, names, i = [0, 1, 6, 7], {}, 0
    while len(names) < len(wanted):
        name = f"{prefix}p{i}"
        p = partition_of(name, 12)
        if p in wanted and p not in names:
            names[p] = name
        i += 1
    return [names[p] for p in wanted]


def alerts_of(kafka: KafkaConfig, names: set[str]) -> list[dict[str, Any]]:
    consumer = kafka.reader(f"test-alerts-{time.monotonic_ns()}")
    consumer.assign([TopicPartition(topics.ALERTS, 0, OFFSET_BEGINNING)])
    out: list[dict[str, Any]] = []
    quiet = 0
    try:
        while True:
            batch = consumer.consume(1000, 0.5)
            quiet = 0 if batch else quiet + 1
            if quiet >= 4:  # two seconds without anything new: read to the end
                return out
            for m in batch:
                if m.error() is None:
                    a = avro.codec("alert").decode(m.value())
                    if a["pipeline"] in names:
                        out.append(a)
    finally:
        consumer.close()


def test_two_replicas_of_each_stateful_service_survive_a_kill(settings: LooplineSettings,
                                                              kafka: KafkaConfig,
                                                              tmp_path: Path, unique: str) -> None:
    specs = [make_spec(name) for name in spread_names(unique)]
    names = {s.name for s in specs}
    registry = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test")
    for s in specs:
        apply_spec(kafka, s)
        model, reference = first_model(s)
        registry.register(s.name, model, NewVersion(reference=reference))
    env = service_env(settings, tmp_path, ",".join(sorted(names)),
                      LOOPLINE_CHECKPOINT_INTERVAL_S="1", LOOPLINE_STATE_PARTITIONS="12")
    procs = {
        "inference": ServiceProcess("inference", dict(env, LOOPLINE_GROUP_ID=f"{unique}-inference"),
                                    tmp_path / "inference.log"),
        **{f"{svc}-{r}": ServiceProcess(svc, dict(env, LOOPLINE_GROUP_ID=f"{unique}-{svc}",
                                                  LOOPLINE_INSTANCE_ID=f"{svc}-{r}"),
                                        tmp_path / f"{svc}-{r}.log", f"{svc}-{r}")
           for svc in ("monitor", "trainer") for r in "ab"},
    }
    feed = Feeder(kafka, specs)
    try:
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_ready(120)

        def owned(svc: str) -> list[float]:
            return [procs[f"{svc}-{r}"].metric("loopline_units_owned", service=svc) for r in "ab"]

        # The monitor has one more unit: the registry (its invalid records are reported once).
        wait_until(lambda: sum(owned("monitor")) == PIPELINES + 1
                   and sum(owned("trainer")) == PIPELINES,
                   120, "every pipeline owned once by each stateful service")
        shares = (owned("monitor"), owned("trainer"))
        for upto in range(200, 800 + 1, 200):
            feed.send(upto)
            time.sleep(0.3)
        # Kill one replica of each while events and labels flow: the other takes its pipelines over.
        procs["monitor-a"].kill9()
        procs["trainer-b"].kill9()
        for upto in range(1000, EVENTS + 1, 200):
            feed.send(upto)
            time.sleep(0.5)
        wait_until(lambda: procs["monitor-b"].metric("loopline_units_owned",
                                                     service="monitor") == PIPELINES + 1
                   and procs["trainer-a"].metric("loopline_units_owned",
                                                 service="trainer") == PIPELINES, 120,
                   "the survivors own every pipeline")

        def labels_learned() -> int:
            total = 0
            for s in specs:
                st = changelog_state(kafka, "trainer", s.name)
                total += st.join.counts.joined if st else 0
            return total

        expected_labels = PIPELINES * (EVENTS - LABEL_DELAY)
        wait_until(lambda: labels_learned() == expected_labels, 180,
                   "every label joined, in the checkpoints")
        wait_until(lambda: len([a for a in alerts_of(kafka, names) if a["signal"] == "drift"
                                and a["state"] == "raised"]) >= PIPELINES, 120,
                   "a drift alert per pipeline")
        for name in ("inference", "monitor-b", "trainer-a"):
            assert procs[name].ready(), name
    finally:
        for p in procs.values():
            p.stop()

    # Both replicas had work before the kill.
    assert all(min(share) >= 1 for share in shares), shares
    alerts = alerts_of(kafka, names)
    raised = [a for a in alerts if a["state"] == "raised"]
    drifted = {a["pipeline"] for a in raised if a["signal"] in ("drift", "performance")}
    assert drifted == names, "an alert was lost"
    per_id = Counter(a["alert_id"] for a in alerts)
    if kafka.exactly_once:
        assert max(per_id.values()) == 1, "an alert was raised twice"
    # An episode is raised once until it is resolved: a second raise with none between is a
    # duplicate (a survivor that did not know its predecessor's alert). A detector may resolve and
    # raise again (CI saw performance/errors raised, resolved and raised within 1.2 s, on a replica
    # that was not killed): that is a new episode. One partition: the topic's order is theirs.
    open_episodes: set[tuple[Any, ...]] = set()
    twice = []
    for a in alerts:
        episode = (a["pipeline"], a["signal"], a["feature"], a["detector"], a["model_version"],
                   a["severity"])
        if a["state"] == "raised":
            if episode in open_episodes:
                twice.append(episode)
            open_episodes.add(episode)
        else:
            open_episodes.discard(episode)
    assert not twice, twice
    for s in specs:
        st = changelog_state(kafka, "trainer", s.name)
        counts = st.join.counts
        assert counts.joined == EVENTS - LABEL_DELAY and counts.duplicates == 0, (s.name, counts)
        assert st.learner.learned + len(st.holdout.items) == counts.joined, (
            "a label learned twice or lost")
        triggers = Counter(v["trigger"] for v in versions_of(registry.state(), s.name)
                           if v["trigger"])
        assert all(n == 1 for n in triggers.values()), f"a candidate trained twice: {triggers}"
    for p in procs.values():
        assert not p.errors(), (p.label, p.errors()[:2])
    print(f"\nreplicas: shares before the kill monitor={shares[0]} trainer={shares[1]}; "
          f"alerts={len(alerts)} raised={len(raised)}; "
          f"versions={[len(versions_of(registry.state(), s.name)) for s in specs]}")
