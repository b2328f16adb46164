"""Replay on the real broker: inference serves, lineage
logs, replay reproduces and compares versions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_inference import feature_events, make_model, make_spec, produce

from loopline import feedback
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion
from loopline.registry import RegistryReader
from loopline.runtime.service import ServiceRuntime
from loopline.services.inference.main import serve
from loopline.services.inference.settings import InferenceSettings
from loopline.services.lineage import query as q
from loopline.services.lineage.replay import replay
from loopline.services.lineage.service import LineageService
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings

pytestmark = pytest.mark.integration


def in_thread(rt: ServiceRuntime, body: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        with rt:
            body()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def running(settings: LooplineSettings, kafka: KafkaConfig, unique: str,
            tmp_path: Path) -> Iterator[tuple]:  # type: ignore[type-arg]  # any records
    spec = make_spec(unique)
    apply_spec(kafka, spec)
    registry = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test")
    registry.register(unique, make_model(1))
    common = {"bootstrap_servers": settings.bootstrap_servers,
              "kafka_profile": settings.kafka_profile,
              "session_timeout_ms": 6000, "home": tmp_path, "pipelines": [unique]}
    inf_settings = InferenceSettings(**common, group_id=f"{unique}-inference", registry_poll_s=0.05)
    lin_settings = LineageSettings(**common, group_id=f"{unique}-lineage", flush_interval_s=0.3)
    inference = ServiceRuntime("inference", inf_settings, install_signals=False)
    lineage = ServiceRuntime("lineage", lin_settings, install_signals=False)
    threads = [in_thread(inference, lambda: serve(inference, inf_settings)),
               in_thread(lineage, lambda: LineageService(lineage, lin_settings).run())]
    yield spec, registry, LineageStore(lin_settings.store_dir())
    for rt in (inference, lineage):
        rt.stop.set()
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def wait_until(condition: Callable[[], bool], timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.25)


def served_rows(store: LineageStore, pipeline: str) -> int:
    if pipeline not in store.pipelines():
        return 0
    return int(q.query_predictions(store, pipeline).summary["served"])


def test_replay_reproduces_the_served_version_and_compares_another(kafka: KafkaConfig, running,
                                                                   unique: str) -> None:  # type: ignore[no-untyped-def]  # pytest fixtures
    spec, registry, store = running
    # v2 scores every event, serves none
    registry.register(unique, make_model(5), NewVersion(stage="shadow"))
    time.sleep(1.0)  # the service picks the shadow up between batches
    produce(kafka, spec.topics.features, feature_events(spec, 600))
    wait_until(lambda: served_rows(store, unique) >= 600)

    labels = AckedProducer(kafka.producer("test-feedback"))
    for i in range(0, 600, 3):  # late labels for a third of the events, by event_id
        record = feedback.make(event_id=f"e{i}", label="1" if i % 2 else "0")
        labels.send(spec.topics.feedback, feedback.encode(record), key=f"e{i}")
    labels.confirm()
    wait_until(lambda: q.connect(store, unique).execute(
        "SELECT count(*) FROM feedback").fetchone()[0] >= 200)

    reader = RegistryReader(kafka)
    state = reader.catch_up()
    reader.close()
    name = state.versions[next(k for k in state.versions if k[0] == unique)]["name"]
    seen: list[int] = []
    report = replay(store, state, unique, (name, 1), against=(name, 2), progress=lambda done,
                    total: seen.append(done))
    assert report.rows == 600 and seen[-1] == 600
    v1, v2 = report.sides
    assert v1.logged == 600 and v1.reproduced == 600 and v1.max_abs_diff == 0.0  # an exact audit
    assert v2.logged == 600 and v2.reproduced == 600  # the shadow's logged scores reproduce too
    assert report.agreement is not None and 0.0 < report.agreement < 1.0
    assert report.labeled == 200
    acc1, acc2 = report.metric(v1), report.metric(v2)
    assert acc1 is not None and acc2 is not None and acc1 != acc2
