"""Helpers for crash tests: service processes that can be killed -9 and restarted, raw traffic,
checks.

A plain module, not a test file: the integration tests import it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from loopline import avro
from loopline.broker import die_with_parent, free_port
from loopline.errors import DeliveryError
from loopline.kafka import KafkaConfig, StopFlag
from loopline.runtime.delivery import AtLeastOnce, Delivery, ExactlyOnce
from loopline.runtime.service import ServiceRuntime
from loopline.services.lineage import query as q
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` every 0.25 s until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout_s:.0f}s"
        time.sleep(0.25)


def make_spec(name: str, partitions: int) -> PipelineSpec:
    """A small classification pipeline (the same features as test_inference's)."""
    return parse_spec({"name": name, "key": "customer", "partitions": partitions,
                       "features": [{"name": "customer", "type": "string"},
                                    {"name": "x1", "type": "float", "min": 0, "max": 1},
                                    {"name": "x2", "type": "float", "min": 0, "max": 1},
                                    {"name": "flag", "type": "bool"},
                                    {"name": "x3", "type": "float", "required": False}],
                       "label": {"task": "classification", "classes": ["0", "1"], "positive": "1"}})


def service_env(settings: LooplineSettings, home: Path, pipeline: str,
                **extra: str) -> dict[str, str]:
    """Environment of a `loopline run <service>` child: this test's broker, home and pipeline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env.update(LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
               LOOPLINE_KAFKA_PROFILE=settings.kafka_profile, LOOPLINE_HOME=str(home),
               LOOPLINE_PIPELINES=pipeline, LOOPLINE_SESSION_TIMEOUT_MS="6000",
               LOOPLINE_REGISTRY_POLL_S="0.2", LOOPLINE_FLUSH_ROWS="200",
               LOOPLINE_FLUSH_INTERVAL_S="0.5", LOOPLINE_CHECKPOINT_INTERVAL_S="1")
    env.update(extra)
    return env


class ServiceProcess:
    """One `python -m loopline.app.cli run <service>` child
    with a fixed metrics port (kept across restarts)."""

    def __init__(self, service: str, env: dict[str, str], log_path: Path,
                 label: str | None = None) -> None:
        self.service = service
        self.label = label or service
        self.port = free_port()
        # Replicas on one host need their own instance ids (their transactional ids), as in the
        # README: the default, the host name, is the same for all of them here.
        self.env = dict(env, LOOPLINE_METRICS_PORT=str(self.port))
        self.env.setdefault("LOOPLINE_INSTANCE_ID", self.label)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.kills = 0

    def start(self) -> None:
        """Spawn the process (call from the test's main thread: the child dies with that thread)."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "loopline.app.cli", "run", self.service], env=self.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Whether /readyz answers 200 (fails fast if the process died)."""
        assert self.alive(), f"{self.label} exited ({self.process and self.process.returncode}); " \
                             f"log tail:\n{self.log_tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll /readyz until the service says it is ready."""
        wait_until(self.ready, timeout_s, f"{self.label} ready")

    def kill9(self) -> None:
        """SIGKILL: no flush, no offset commit, no clean group leave."""
        assert self.process is not None and self.alive(), f"{self.label} is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.kills += 1

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        # Generous: a service busy on a loaded 2-core machine may take seconds to answer.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=15) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.process is None or not self.alive():
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the process's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def errors(self) -> list[dict[str, Any]]:
        """Error-level JSON log lines (a killed process leaves none; a crashed one does)."""
        return self.log_lines("error", "critical")

    def log_lines(self, *levels: str) -> list[dict[str, Any]]:
        """The JSON log lines of these levels."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("level") in levels:
                out.append(doc)
        return out


def raw_event(i: int, prefix: str, rng: np.random.Generator) -> tuple[bytes, bytes, bool]:
    """(key, value, valid) of the i-th raw event:
    about one in six is bad, in five different ways."""
    key = f"c{i % 97}"
    features: dict[str, Any] = {"customer": key, "x1": float(rng.random()),
                                "x2": float(rng.random()),
                                "flag": bool(i % 2), "x3": None if i % 3 else float(rng.random())}
    doc: dict[str, Any] = {"event_id": f"{prefix}-e{i}", "features": features}
    kind = i % 6
    if kind != 5:
        return key.encode(), json.dumps(doc).encode(), True
    bad = (i // 6) % 5
    if bad == 0:
        features["x1"] = 7.5  # out of range
    elif bad == 1:
        del features["x2"]  # required
    elif bad == 2:
        features["flag"] = "yes"  # type
    elif bad == 3:
        # not JSON
        return key.encode(), f'{{"event_id": "{prefix}-e{i}", "features": {{'.encode(), False
    else:
        # not finite
        return key.encode(), (f'{{"event_id": "{prefix}-e{i}", "features": '
                              f'{{"customer": "{key}", "x1": NaN, '
                              f'"x2": 0.5, "flag": true}}}}').encode(), False
    return key.encode(), json.dumps(doc).encode(), False


@dataclass
class RawTraffic:
    """Produces raw events on a thread, in chunks, and records every event's delivered offset."""

    kafka: KafkaConfig
    topic: str
    prefix: str
    chunk: int = 25
    pause_s: float = 0.1
    limit: int = 2000
    # event_id -> (partition, offset)
    valid: dict[str, tuple[int, int]] = field(default_factory=dict)
    bad: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset)
    failures: list[str] = field(default_factory=list)
    sent: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> RawTraffic:
        """Start producing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop producing after the current chunk."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)

    def finish(self) -> None:
        """Stop producing after the current chunk and wait until everything sent is acknowledged."""
        self.stop()
        assert not self._thread.is_alive(), "the traffic thread did not finish"
        assert not self.failures, self.failures[:3]

    def delivered(self) -> int:
        """Events acknowledged so far."""
        with self._lock:
            return len(self.valid) + len(self.bad)

    def _run(self) -> None:
        producer = self.kafka.producer(f"test-raw-{self.prefix}")
        rng = np.random.default_rng(7)
        i = 0
        while not self._stop.is_set() and i < self.limit:
            for _ in range(min(self.chunk, self.limit - i)):
                key, value, valid = raw_event(i, self.prefix, rng)
                producer.produce(self.topic, value, key=key,
                                 on_delivery=self._callback(f"{self.prefix}-e{i}", valid))
                i += 1
            producer.flush(30)
            self.sent = i
            self._stop.wait(self.pause_s)
        if producer.flush(30):
            self.failures.append("raw events not acknowledged")

    def _callback(self, event_id: str, valid: bool) -> Callable[[Any, Any], None]:
        def done(err: Any, msg: Any) -> None:
            if err is not None:
                self.failures.append(f"{event_id}: {err}")
                return
            with self._lock:
                if valid:
                    self.valid[event_id] = (msg.partition(), msg.offset())
                else:
                    self.bad.add((msg.partition(), msg.offset()))
        return done


def served(store: LineageStore, pipeline: str) -> dict[str, int]:
    """Served predictions per event_id, as users read them (the lineage store's DuckDB views)."""
    if pipeline not in store.pipelines():
        return {}
    con = q.connect(store, pipeline)
    try:
        return dict(con.execute("SELECT event_id, count(*) FROM predictions WHERE served GROUP BY "
                                "event_id")
                    .fetchall())
    finally:
        con.close()


def stored_rows(store: LineageStore, pipeline: str, table: str) -> int:
    """Rows physically stored in a table's files, duplicates included."""
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(p).num_rows for p in store.files(pipeline, table))


class DeadLetters:
    """Reads a dead-letter topic from the start; counts letters per raw source offset."""

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int) -> None:
        self.consumer = kafka.reader(f"test-deadletters-{topic}")
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.codec = avro.codec("deadletter")
        self.letters: list[dict[str, Any]] = []

    def poll(self) -> DeadLetters:
        """Read what arrived."""
        while True:
            batch = self.consumer.consume(1000, 0.2)
            for m in batch:
                if m.error() is None:
                    self.letters.append(self.codec.decode(m.value()))
            if not batch:
                return self

    def sources(self, topic: str) -> set[tuple[int, int]]:
        """(partition, offset) of every message of ``topic`` that was dead-lettered."""
        return {(d["source"]["partition"], d["source"]["offset"]) for d in self.letters
                if d["source"]["topic"] == topic}

    def close(self) -> None:
        """Close the consumer."""
        self.consumer.close()


class ServiceThread:
    """A service's ``serve(rt, settings[, service])``
    on a thread, with its own runtime (no signals)."""

    def __init__(self, name: str, settings: Any, service: Any = None) -> None:
        import importlib

        self.name = name
        self.settings = settings
        self.rt = ServiceRuntime(name, settings, install_signals=False)
        module = importlib.import_module(f"loopline.services.{name}.main")
        self.service = service if service is not None else (
            module.create(self.rt, settings) if hasattr(module, "create") else None)
        self._serve = module.serve
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"service-{name}")
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.rt:
                if self.service is not None:
                    self._serve(self.rt, self.settings, self.service)
                else:
                    self._serve(self.rt, self.settings)
        except BaseException as e:  # noqa: BLE001 - surfaced to the test
            self.errors.append(e)

    @property
    def stop(self) -> StopFlag:
        """The runtime's stop flag."""
        return self.rt.stop

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        total = 0.0
        for family in self.rt.registry.collect():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until readiness is true (fails fast if the thread died)."""
        def ready() -> bool:
            assert not self.errors, self.errors
            return self.rt.health.ready()[0]
        wait_until(ready, timeout_s, f"{self.name} ready")

    def close(self) -> None:
        """Stop and join; raise what the service raised."""
        self.rt.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{self.name} did not stop"
        assert not self.errors, self.errors


def changelog_state(kafka: KafkaConfig, service: str, unit: str, partitions: int = 12) -> Any:
    """The last checkpointed state of one unit, read from
    the service's changelog topic (None: none yet)."""
    from loopline.runtime.state import Changelog

    changelog = Changelog(kafka, service, partitions)
    try:
        restored = changelog.restore([changelog.partition_of(unit)], timeout_s=20)
    except Exception:  # noqa: BLE001 - the topic may not exist yet
        return None
    envelope = restored.states.get(unit)
    return envelope["state"] if envelope else None


def failing_delivery(fail_on: int) -> Callable[[ServiceRuntime], Delivery]:
    """The runtime's delivery, crashing after its ``fail_on``-th batch went out, before its commit.

    The test double of a service killed between producing a batch and committing it.
    """

    def make(rt: ServiceRuntime) -> Delivery:
        delivery = rt.delivery()
        if isinstance(delivery, AtLeastOnce):
            # Batches are sent, then confirmed (several at once under load): the confirmation
            # that covers the fail_on-th batch fails.
            send, confirm, sends = delivery.send, delivery.confirm, [0]

            def counting_send(outs: Any) -> None:
                sends[0] += 1
                send(outs)

            def failing_confirm(offsets: Any, consumer: Any, sent: bool = True) -> None:
                if sends[0] >= fail_on:
                    delivery.producer.flush(10)  # the outputs went out, the offsets never stored
                    raise DeliveryError("injected: crash after the batch was produced, before "
                                        "the commit")
                confirm(offsets, consumer, sent)

            delivery.send = counting_send  # type: ignore[method-assign]  # a test double
            delivery.confirm = failing_confirm  # type: ignore[method-assign]  # a test double
            return delivery
        commit, calls = delivery.commit, [0]

        def failing(outs: Any, offsets: Any, consumer: Any) -> None:
            calls[0] += 1
            if calls[0] == fail_on:
                # produced inside a transaction never committed
                if isinstance(delivery, ExactlyOnce):
                    delivery.producer.begin_transaction()
                    delivery._open = True  # so that closing aborts it
                delivery._produce(outs)  # the outputs go out, the commit never happens
                delivery.producer.flush(10)
                raise DeliveryError("injected: crash after the batch was produced, before the "
                                    "commit")
            commit(outs, offsets, consumer)

        delivery.commit = failing  # type: ignore[method-assign]  # a test double
        return delivery

    return make
