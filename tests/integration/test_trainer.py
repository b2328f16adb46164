"""The trainer on the real broker: late labels, unknown predictions, duplicates, crash and restart,
registration with lineage and scorecards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from river import datasets
from services_harness import ServiceThread, changelog_state

from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.broker import free_port
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion, versions_of
from loopline.services.trainer.settings import TrainerSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration


def sea_spec(name: str, **trainer: Any) -> PipelineSpec:
    return parse_spec({
        "name": name, "partitions": 2,
        "features": [{"name": f"x{i}", "type": "float", "min": 0, "max": 10} for i in range(3)],
        "label": {"name": "y", "classes": ["false", "true"], "positive": "true"},
        "deployment": {"promotion": "auto"},
        "trainer": {"holdout": 20, "label_ttl_s": 3600, "retrain": {"on_drift": False}, **trainer}})


def wait_for(condition: Callable[[], bool], timeout_s: float = 180.0,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met within {timeout_s:.0f}s"
        time.sleep(0.05)


def sea(n: int, seed: int = 1, variant: int = 0) -> list[tuple[dict[str, float], str]]:
    return [({f"x{i}": float(v) for i, v in x.items()}, str(y).lower())
            for x, y in datasets.synth.SEA(variant=variant, seed=seed).take(n)]


class Feeder:
    """Writes features, predictions and feedback the way ingest, inference and users would."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec) -> None:
        self.spec = spec
        self.producer = AckedProducer(kafka.producer("test-feeder"))
        self.features = avro.Codec(spec.features_schema())

    def events(self, rows: list[dict[str, float]], start: int = 0) -> None:
        for i, x in enumerate(rows, start):
            key = f"k{i}".encode()
            event = {"event_id": f"e{i}", "key": f"k{i}", "ts": 1, "ingested_at": 1,
                     "source": {"topic": "raw", "partition": 0, "offset": i}, "features": x}
            self.producer.send(self.spec.topics.features, self.features.encode(event), key=key)
            pred = {"prediction_id": f"p{i}", "event_id": f"e{i}", "key": f"k{i}",
                    "pipeline": self.spec.name,
                    "model_name": "m", "model_version": 1, "model_sha256": "0" * 64,
                    "variant": "champion",
                    "served": True, "label": "true", "value": 0.9, "scores": {},
                    "source": {"topic": self.spec.topics.features, "partition": 0, "offset": i},
                    "event_ts": 1, "scored_at": 2}
            self.producer.send(self.spec.topics.predictions, avro.codec("prediction").encode(pred),
                               key=key)
        self.producer.confirm()

    def feedback(self, items: list[dict[str, Any]]) -> None:
        for fb in items:
            record = {"prediction_id": None, "event_id": None, "label": None, "value": None,
                      "verdict": None, "ts": 1, **fb}
            self.producer.send(self.spec.topics.feedback, avro.codec("feedback").encode(record),
                               key=(record["event_id"] or record["prediction_id"] or "").encode())
        self.producer.confirm()


class Running(ServiceThread):
    """The trainer on a thread, as `loopline run trainer` builds it."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec, home: Path, group: str,
                 **settings: Any) -> None:
        super().__init__("trainer", TrainerSettings(
            bootstrap_servers=kafka.settings.bootstrap_servers,
            kafka_profile=kafka.settings.kafka_profile,
            session_timeout_ms=6000, home=home, pipelines=[spec.name], batch_size=200,
            registry_poll_s=0.1, group_id=group, instance_id=group, **settings))
        self.pipeline = spec.name
        deadline = time.monotonic() + 60
        while self.pipeline not in self.service.states:  # the group assigned the pipeline to it
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "the trainer never took its pipeline over"
            time.sleep(0.1)

    def state(self) -> Any:
        assert not self.errors, self.errors
        return self.service.states[self.pipeline]


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        r.stop.set()
    for r in started:
        r.thread.join(30)


def test_late_labels_unknown_predictions_and_duplicates(kafka: KafkaConfig, unique: str,
                                                        tmp_path: Path,
                                                        running: list[Running]) -> None:
    spec = sea_spec(unique, label_ttl_s=2.0)
    apply_spec(kafka, spec)
    feed = Feeder(kafka, spec)
    data = sea(60)
    r = Running(kafka, spec, tmp_path, f"{unique}-trainer")
    running.append(r)
    # Labels that arrive before their prediction and features (the trainer must keep them waiting).
    feed.feedback([{"feedback_id": f"early{i}", "prediction_id": f"p{i}", "label": data[i][1]}
                   for i in range(50, 60)])
    feed.events([x for x, _ in data[:50]])
    wait_for(lambda: r.state().join.counts.features == 50
             and r.state().join.counts.predictions == 50, what="50 events and predictions joined")
    # Late labels by prediction id and by event id, each sent twice (a retried send keeps the id).
    labels = [{"feedback_id": f"f{i}", "prediction_id": f"p{i}", "label": data[i][1]}
              for i in range(0, 25)]
    labels += [{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": data[i][1]}
               for i in range(25, 40)]
    feed.feedback(labels + labels[:10])
    # Accept verdicts take the served prediction's label ("true").
    feed.feedback([{"feedback_id": f"v{i}", "event_id": f"e{i}", "verdict": "accept"}
                   for i in range(40, 45)])
    # Labels for predictions nobody made.
    feed.feedback([{"feedback_id": f"ghost{i}", "prediction_id": f"nope{i}", "label": "true"}
                   for i in range(3)])
    feed.events([x for x, _ in data[50:]], start=50)
    wait_for(lambda: r.state().join.counts.joined == 55, what="55 labels joined")
    counts = r.state().join.counts
    assert (counts.duplicates, counts.orphans) == (10, 0)
    assert len(r.state().join.pending) == 3  # the ghosts wait, within the TTL
    wait_for(lambda: r.state().join.counts.orphans == 3,
             what="ghost labels become orphans after the TTL")
    st = r.state()
    assert not st.join.pending and st.join.counts.joined == 55 and st.join.counts.relabels == 0
    # 20 held out, 35 learned, each once: river's own scaler counts agree.
    assert (len(st.holdout.items), st.learner.learned) == (20, 35)
    assert st.learner.model["StandardScaler"].counts["x0"] == 35
    assert st.trained.count == 35 and {rg["topic"]
                                       for rg in st.trained.records()} == {spec.topics.features}
    held = {e.event_id: e.target for e in st.holdout.items}
    assert all(held[f"e{i}"] == "true" for i in range(40, 45) if f"e{i}" in held)
    r.close()


def learned_in(kafka: KafkaConfig, pipeline: str) -> int:
    st = changelog_state(kafka, "trainer", pipeline)
    return st.learner.learned if st else -1


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_crash_mid_training_learns_every_example_exactly_once(kafka: KafkaConfig, unique: str,
                                                              tmp_path: Path,
                                                              running: list[Running]) -> None:
    spec = sea_spec(unique)
    apply_spec(kafka, spec)
    feed = Feeder(kafka, spec)
    data = sea(600, seed=5)
    feed.events([x for x, _ in data])
    group = f"{unique}-trainer"
    port = free_port()
    env = {**os.environ, "LOOPLINE_BOOTSTRAP_SERVERS": kafka.settings.bootstrap_servers or "",
           "LOOPLINE_KAFKA_PROFILE": kafka.settings.kafka_profile, "LOOPLINE_PIPELINES": spec.name,
           "LOOPLINE_METRICS_PORT": str(port), "LOOPLINE_GROUP_ID": group,
           "LOOPLINE_HOME": str(tmp_path),
           "LOOPLINE_SESSION_TIMEOUT_MS": "6000", "LOOPLINE_INSTANCE_ID": group,
           "LOOPLINE_CHECKPOINT_INTERVAL_S": "3", "LOOPLINE_BATCH_SIZE": "50"}
    proc = subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "run", "trainer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                       enumerate(data[:300])])
        wait_for(lambda: learned_in(kafka, spec.name) == 280, what="first 300 labels checkpointed")
        feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                       enumerate(data[300:450], 300)])
        name = 'loopline_trainer_examples_learned_total'
        # Kill once the new labels are learned in memory but before they are checkpointed.
        wait_for(lambda: metric(port, name) > 280, what="second chunk learned in memory")
        assert learned_in(kafka, spec.name) == 280
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                   enumerate(data[450:], 450)])
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                   enumerate(data[:20])])  # duplicates of old labels, after the restart
    r = Running(kafka, spec, tmp_path, group, checkpoint_interval_s=0.2)
    running.append(r)
    wait_for(lambda: r.state().join.counts.joined == 600,
             what="all 600 labels joined after the restart")
    time.sleep(0.5)  # let anything re-delivered show up in the counters
    st = r.state()
    assert st.learner.learned == 580 and len(st.holdout.items) == 20
    # the learner itself saw each once
    assert st.learner.model["StandardScaler"].counts["x0"] == 580
    assert st.trained.count == 580 and st.join.counts.duplicates == 20
    learned_offsets = sum(rg["count"] for rg in st.trained.records())
    assert learned_offsets + st.holdout.ranges(spec.topics.features).count == 600
    r.close()


def test_versions_registered_with_lineage_scorecard_and_rejection(kafka: KafkaConfig, unique: str,
                                                                   tmp_path: Path,
                                                                   running: list[Running]) -> None:
    spec = sea_spec(unique, holdout=100, margin=0.5,
                    retrain={"on_drift": False, "every_n_labels": 400})
    apply_spec(kafka, spec)
    feed = Feeder(kafka, spec)
    data = sea(800, seed=11)
    feed.events([x for x, _ in data])
    r = Running(kafka, spec, tmp_path, f"{unique}-trainer")
    running.append(r)
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                   enumerate(data[:400])])
    models = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")))
    wait_for(lambda: len(versions_of(models.state(), spec.name)) == 1,
             what="first version registered")
    [first] = versions_of(models.state(), spec.name)
    assert first["stage"] == "champion"  # no champion yet and promotion auto
    assert first["trigger"] == "every_n_labels(400)"
    ranges = first["training_ranges"]
    assert {rg["topic"] for rg in ranges} == {spec.topics.features}
    # 400 labels, 100 held out to pick the winner, which is then refitted on all 400.
    assert sum(rg["count"] for rg in ranges) == 400
    card = orjson.loads(first["scorecard_json"])
    assert card["accepted"] and card["champion"] is None and card["holdout"]["count"] == 100
    assert card["candidate"]["n"] == 100 and card["training"]["count"] == 400
    assert {c["learner"] for c in card["contenders"]} >= {"river.logistic_regression",
                                                          "sklearn.linear"}
    assert first["library_versions"]["trainer.river"] and first["reference_profile_json"]
    assert first["input_features"] == ["x0", "x1", "x2"]
    # The same concept again: the candidate cannot beat the champion by 0.5 and is recorded as
    # rejected.
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y} for i, (_, y) in
                   enumerate(data[400:], 400)])
    wait_for(lambda: len(versions_of(models.state(), spec.name)) == 2,
             what="second version recorded")
    second = versions_of(models.state(), spec.name)[1]
    card2 = orjson.loads(second["scorecard_json"])
    assert second["stage"] == "rejected" and not card2["accepted"]
    assert card2["champion_version"] == f"{first['name']}:{first['version']}"
    assert card2["champion"]["n"] == 100 and "does not beat" in card2["reason"]
    # The winner is refitted on its training labels plus the 100 held out: all 800, or, when the
    # contender trained on the newest part of the 700 training labels wins (it competes in case the
    # concept creeps), that part and the holdout.
    learner = second["library_versions"]["trainer.learner"]
    newest = re.search(r"@newest(\d+)$", learner)
    expected = int(newest.group(1)) + 100 if newest else 800
    assert sum(rg["count"] for rg in second["training_ranges"]) == expected, learner
    assert second["parent"] == f"{first['name']}:{first['version']}"
    r.close()


# ---- the whole loop: drift -> alert -> candidate -> shadow -> promotion -> better served accuracy
# ----
def start_inference(kafka: KafkaConfig, spec: PipelineSpec, home: Path,
                    group: str) -> ServiceThread:
    from loopline.services.inference.settings import InferenceSettings

    return ServiceThread("inference", InferenceSettings(
        bootstrap_servers=kafka.settings.bootstrap_servers, home=home,
        kafka_profile=kafka.settings.kafka_profile,
        session_timeout_ms=6000, pipelines=[spec.name], registry_poll_s=0.1, group_id=group,
        instance_id=group))


def start_monitor(kafka: KafkaConfig, spec: PipelineSpec, home: Path, group: str) -> ServiceThread:
    from loopline.services.monitor.settings import MonitorSettings

    return ServiceThread("monitor", MonitorSettings(
        bootstrap_servers=kafka.settings.bootstrap_servers, home=home,
        kafka_profile=kafka.settings.kafka_profile,
        session_timeout_ms=6000, pipelines=[spec.name], registry_poll_s=0.2, group_id=group,
        instance_id=group))


def test_concept_drift_is_learned_promoted_and_served_better(
        kafka: KafkaConfig, unique: str, tmp_path: Path, running: list[Running],
        record_property: Callable[[str, Any], None]) -> None:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from loopline.scoring import Scorer
    from loopline.services.trainer.export import to_onnx
    from loopline.services.trainer.learner import Learner

    spec = parse_spec({
        "name": unique, "partitions": 1,
        "features": [{"name": f"x{i}", "type": "float", "min": 0, "max": 10} for i in range(3)],
        "label": {"name": "y", "classes": ["false", "true"], "positive": "true"},
        "deployment": {"promotion": "auto"},
        "monitor": {"error_detectors": ["ddm"], "detectors": ["adwin"]},
        "trainer": {"holdout": 200, "margin": 0.02, "min_live_samples": 200, "learning_rate": 0.05,
                    "retrain": {"on_drift": True, "drift_settle_labels": 400}}})
    apply_spec(kafka, spec)
    # The first champion: trained before the drift, registered the way a user would.
    first = Learner(spec)
    train = sea(2000, seed=1, variant=0)
    for x, y in train:
        first.learn(x, y)
    first_onnx = to_onnx(first)
    models = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")))
    v1 = models.register(spec.name, first_onnx, NewVersion(reference=[x for x, _ in train[:500]]))
    threads = [start_inference(kafka, spec, tmp_path, f"{unique}-inference"),
               start_monitor(kafka, spec, tmp_path, f"{unique}-monitor")]
    try:
        trainer = Running(kafka, spec, tmp_path, f"{unique}-trainer")
        running.append(trainer)
        # concept drift at event 1000
        stream = sea(1000, seed=2, variant=0) + sea(5000, seed=3, variant=3)
        feed = Feeder(kafka, spec)
        reader = kafka.reader(f"{unique}-downstream")
        reader.assign([TopicPartition(spec.topics.predictions, 0, OFFSET_BEGINNING)])
        served: dict[int, dict[str, Any]] = {}
        labeled = 0
        delay = 200  # labels come back 200 events late
        for start in range(0, len(stream), 100):
            chunk = stream[start:start + 100]
            for i, (x, _) in enumerate(chunk, start):
                event = {"event_id": f"e{i}", "key": f"k{i}", "ts": int(time.time() * 1000),
                         "ingested_at": 1,
                         "source": {"topic": "raw", "partition": 0, "offset": i}, "features": x}
                feed.producer.send(spec.topics.features, feed.features.encode(event),
                                   key=f"k{i}".encode())
            feed.producer.confirm()
            deadline = time.monotonic() + 60
            while len(served) < start + len(chunk):
                assert time.monotonic() < deadline, (
                    f"no predictions for events up to {start + len(chunk)}")
                for t in threads:
                    assert not t.errors, t.errors
                for m in reader.consume(1000, 0.2):
                    if m.error() is None:
                        p = avro.codec("prediction").decode(m.value())
                        if p["served"]:
                            served[int(p["event_id"][1:])] = p
            upto = start + len(chunk) - delay
            feed.feedback([{"feedback_id": f"f{i}", "prediction_id": served[i]["prediction_id"],
                            "label": stream[i][1]} for i in range(labeled, max(labeled, upto))])
            labeled = max(labeled, upto)
        reader.close()
        history = versions_of(models.state(), spec.name)
        mine = [v for v in history if v["version"] > v1["version"]]
        assert mine, "the trainer registered no version after the drift"
        promoted = [v for v in mine if v["stage"] == "champion" or any(
            c["to_stage"] == "champion" and c["version"] == v["version"]
            for c in models.state().stage_changes
            if c["pipeline"] == spec.name)]
        assert promoted, (
            f"no trainer version was promoted: {[(v['version'], v['stage']) for v in mine]}")
        new = promoted[0]
        assert new["trigger"].startswith("drift_alert(")
        card = orjson.loads(new["scorecard_json"])
        assert card["accepted"] and card["champion_version"] == f"{v1['name']}:{v1['version']}"
        assert 50 <= card["holdout"]["count"] <= 200 and card["training"]["ranges"]
        assert new["training_ranges"] and new["parent"] == f"{v1['name']}:{v1['version']}"
        # Served accuracy of the promoted version vs the frozen first champion on the same events.
        events = sorted(i for i, p in served.items() if p["model_version"] == new["version"])
        assert len(events) >= 500, f"only {len(events)} events served by the promoted version"
        frozen = Scorer(first_onnx, spec).score([stream[i][0] for i in events]).labels or []
        acc_new = sum(served[i]["label"] == stream[i][1] for i in events) / len(events)
        acc_frozen = sum(f == stream[i][1] for f, i in zip(frozen, events)) / len(events)
        stages = [(c["version"], c["to_stage"], c["reason"][:120])
                  for c in models.state().stage_changes
                  if c["pipeline"] == spec.name]
        record_property("summary", orjson.dumps({
            "served_by_new": len(events), "acc_new": acc_new, "acc_frozen": acc_frozen,
            "versions": [(v["version"], v["stage"], v["trigger"],
                          v["scorecard_json"] and orjson.loads(v["scorecard_json"])["reason"])
                         for v in history],
            "stages": stages,
            "scorecard": card}).decode())
        assert acc_new > acc_frozen + 0.02, (acc_new, acc_frozen)
        trainer.close()
    finally:
        for t in threads:
            t.stop.set()
        for t in threads:
            t.thread.join(30)


def test_live_trial_promotes_then_probation_rolls_back(kafka: KafkaConfig, unique: str,
                                                       tmp_path: Path,
                                                       running: list[Running]) -> None:
    """Predictions are written by the test (as inference would), so live performance is chosen."""
    from loopline.services.trainer.export import to_onnx
    from loopline.services.trainer.learner import Learner

    # No promotion on holdout evidence alone: this test is about the live trial.
    spec = sea_spec(unique, holdout=50, margin=0.01, learning_rate=0.05, min_live_samples=30,
                    direct_promotion_p=None, retrain={"on_drift": False, "every_n_labels": 200})
    apply_spec(kafka, spec)
    # A poor first champion (trained on another concept), registered the way a user would.
    old = Learner(spec)
    for x, y in sea(1000, seed=7, variant=3):
        old.learn(x, y)
    models = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")))
    v1 = models.register(spec.name, to_onnx(old), NewVersion())
    feed = Feeder(kafka, spec)
    data = sea(600, seed=8, variant=0)
    feed.events([x for x, _ in data[:200]])
    r = Running(kafka, spec, tmp_path, f"{unique}-trainer")
    running.append(r)
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y}
                   for i, (_, y) in enumerate(data[:200])])
    wait_for(lambda: r.state().trial is not None, what="a candidate in a live trial")
    [v2] = [v for v in versions_of(models.state(), spec.name) if v["version"] > v1["version"]]
    assert v2["stage"] == "shadow" and orjson.loads(v2["scorecard_json"])["accepted"]

    def live(start: int, n: int, right: dict[str, int]) -> None:
        """Events start..start+n with champion/shadow predictions; ``right`` names who is right."""
        now = int(time.time() * 1000) + 1000
        rows = data[start:start + n]
        feed.events([x for x, _ in rows], start=start)
        for i, (_, y) in enumerate(rows, start):
            wrong = "true" if y == "false" else "false"
            for variant, version in (("champion", right["champion"]), ("shadow", right["shadow"])):
                label = y if version == right["right"] else wrong
                pred = {"prediction_id": f"p{i}-{variant}", "event_id": f"e{i}", "key": None,
                        "pipeline": spec.name, "model_name": v1["name"], "model_version": version,
                        "model_sha256": "0" * 64,
                        "variant": variant, "served": variant == "champion", "label": label,
                        "value": None, "scores": {},
                        "source": {"topic": spec.topics.features, "partition": 0, "offset": i},
                        "event_ts": now, "scored_at": now}
                # keyed by the event, as inference writes both variants
                feed.producer.send(spec.topics.predictions, avro.codec("prediction").encode(pred),
                                   key=f"k{i}".encode())
        feed.producer.confirm()
        feed.feedback([{"feedback_id": f"f{i}", "prediction_id": f"p{i}-champion", "label": y}
                       for i, (_, y) in enumerate(rows, start)])

    # Trial: the shadow (v2) is right, the champion (v1) wrong -> v2 promoted, v1 kept as a shadow.
    live(200, 40, {"champion": v1["version"], "shadow": v2["version"], "right": v2["version"]})
    wait_for(lambda: r.state().trial is not None and r.state().trial.phase == "probation",
             what="promotion")
    state = models.state()
    assert state.versions[(spec.name, v1["name"], v2["version"])]["stage"] == "champion"
    assert state.versions[(spec.name, v1["name"], v1["version"])]["stage"] == "shadow"
    # Probation: the new champion (v2) is now wrong and its predecessor right -> automatic rollback.
    live(240, 40, {"champion": v2["version"], "shadow": v1["version"], "right": v1["version"]})
    wait_for(lambda: r.state().trial is None, what="probation decided")
    state = models.state()
    assert state.versions[(spec.name, v1["name"], v1["version"])]["stage"] == "champion"
    assert state.versions[(spec.name, v1["name"], v2["version"])]["stage"] == "rejected"
    reasons = [c["reason"] for c in state.stage_changes if c["pipeline"] == spec.name
               and c["actor"] == "trainer"]
    assert any(x.startswith("promoted: live trial") for x in reasons)
    assert any(x.startswith("automatic rollback: live probation") for x in reasons)
    r.close()


def test_manual_policy_waits_for_a_person(kafka: KafkaConfig, unique: str, tmp_path: Path,
                                          running: list[Running]) -> None:
    from loopline.services.trainer.export import to_onnx
    from loopline.services.trainer.learner import Learner

    spec = sea_spec(unique, holdout=50, margin=0.01, learning_rate=0.05, min_live_samples=10,
                    retrain={"on_drift": False, "every_n_labels": 200})
    manual = spec.deployment.model_copy(update={"promotion": "manual"})
    spec = spec.model_copy(update={"deployment": manual})
    apply_spec(kafka, spec)
    old = Learner(spec)
    for x, y in sea(1000, seed=7, variant=3):
        old.learn(x, y)
    models = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")))
    v1 = models.register(spec.name, to_onnx(old), NewVersion())
    feed = Feeder(kafka, spec)
    data = sea(300, seed=8, variant=0)
    feed.events([x for x, _ in data])  # every prediction says "true" (Feeder), from model "m" v1
    r = Running(kafka, spec, tmp_path, f"{unique}-trainer")
    running.append(r)
    feed.feedback([{"feedback_id": f"f{i}", "event_id": f"e{i}", "label": y}
                   for i, (_, y) in enumerate(data[:200])])
    wait_for(lambda: r.state().trial is not None, what="a candidate waiting as a shadow")
    [v2] = [v for v in versions_of(models.state(), spec.name) if v["version"] > v1["version"]]
    assert v2["stage"] == "shadow"
    # Plenty of live feedback: a manual pipeline still does not promote on its own.
    now = int(time.time() * 1000) + 1000
    for i, (_, y) in enumerate(data[200:], 200):
        for variant, version, label in (("champion", v1["version"],
                                         "false" if y == "true" else "true"),
                                        ("shadow", v2["version"], y)):
            pred = {"prediction_id": f"q{i}-{variant}", "event_id": f"e{i}", "key": None,
                    "pipeline": spec.name,
                    "model_name": v1["name"], "model_version": version, "model_sha256": "0" * 64,
                    "variant": variant, "served": variant == "champion", "label": label,
                    "value": None, "scores": {},
                    "source": {"topic": spec.topics.features, "partition": 0, "offset": i},
                    "event_ts": now, "scored_at": now}
            feed.producer.send(spec.topics.predictions, avro.codec("prediction").encode(pred),
                               key=f"k{i}".encode())  # by the event, as inference writes them
    feed.producer.confirm()
    feed.feedback([{"feedback_id": f"f{i}", "prediction_id": f"q{i}-champion", "label": y}
                   for i, (_, y) in enumerate(data[200:], 200)])
    wait_for(lambda: r.state().trial.summary()["challenger"]["n"] >= 50,
             what="live samples counted")
    assert models.state().versions[(spec.name, v1["name"], v2["version"])]["stage"] == "shadow"
    models.promote(spec.name, v2["version"], name=v1["name"], reason="a person looked at it")
    wait_for(lambda: r.state().trial is None, what="the trainer notices the manual promotion")
    assert models.state().versions[(spec.name, v1["name"], v1["version"])]["stage"] == "retired"
    r.close()
