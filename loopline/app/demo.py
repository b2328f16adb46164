"""``loopline demo``: the whole loop on the embedded default, told as a story.

A first model learns river's SEA stream; events flow through ingest and inference; labels come back
late; the concept drifts at a known position; the monitor notices, the trainer builds, validates and
shadows a new version and promotes it; the lineage store keeps every prediction. The summary
compares the alert with the true drift and the served accuracy with what the frozen first model
would have scored on the same events.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_END, KafkaError, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loopline import avro, feedback, topics
from loopline.app.up import ServiceProcess, Stopper, StopRequested, Supervisor
from loopline.apply import apply_spec, ensure_global_topics
from loopline.artifacts import ArtifactStore
from loopline.broker import BrokerAddress, EmbeddedBroker, read_state
from loopline.errors import LooplineError
from loopline.kafka import AckedProducer, KafkaConfig, release_producer
from loopline.model_ref import version_id
from loopline.models import ModelRegistry, NewVersion
from loopline.registry import RegistryReader
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, load_spec

LABEL_DELAY = 200  # labels come back this many events after their event


@dataclass
class Plan:
    """The demo's stream: how many events, where the concept drifts, how fast."""

    before: int = 1500
    after: int = 3500
    rate: float = 80.0
    bad_every: int = 250  # one malformed event every this many, to show dead letters
    seed: int = 7

    @property
    def total(self) -> int:
        """Events in the stream."""
        return self.before + self.after


def sea_stream(plan: Plan) -> Iterator[tuple[dict[str, float], str]]:
    """SEA variant 0, then variant 3 from ``plan.before`` on (the drift), as (features, label)."""
    from river.datasets import synth

    for variant, count, seed in ((0, plan.before, plan.seed), (3, plan.after, plan.seed + 1)):
        for x, y in synth.SEA(variant=variant, seed=seed).take(count):
            yield {f"x{i + 1}": float(v) for i, v in x.items()}, str(y).lower()


def first_model(spec: PipelineSpec, seed: int) -> tuple[bytes, list[dict[str, float]]]:
    """A logistic regression learned on 2000 pre-drift
    events, exported to ONNX; and its reference data."""
    from river.datasets import synth

    from loopline.services.trainer.export import to_onnx
    from loopline.services.trainer.learner import Learner

    learner = Learner(spec)
    reference = []
    for x, y in synth.SEA(variant=0, seed=seed + 100).take(2000):
        features = {f"x{i + 1}": float(v) for i, v in x.items()}
        learner.learn(features, str(y).lower())
        reference.append(features)
    return to_onnx(learner), reference[:1000]


@dataclass
class Story:
    """What the demo saw while the stream ran."""

    alerts: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)
    stages: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


class Watcher:
    """Follows loopline.alerts and the registry while the demo produces events."""

    def __init__(self, kafka: KafkaConfig, spec: PipelineSpec, console: Console) -> None:
        self.spec, self.console, self.story = spec, console, Story()
        self.alerts = kafka.reader("loopline-demo-alerts")
        self.alerts.assign([TopicPartition(topics.ALERTS, 0, OFFSET_END)])
        self.registry = RegistryReader(kafka, client_id="loopline-demo-registry")
        self.registry.catch_up()
        self._seen_changes = len(self.registry.state.stage_changes)
        self.supervisor: Supervisor | None = None

    def poll(self, position: int) -> None:
        """Report what happened since the last poll; ``position`` is the events produced so far.

        Also restarts any service that died: the demo survives a service killed at any moment.
        """
        if self.supervisor is not None:
            for name in self.supervisor.supervise_once():
                self.console.print(f"  [red]restarted[/] {name} at event {position} (it had "
                                   "exited; see its log)")
        for m in self.alerts.consume(100, 0):
            if m.error() is not None:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    raise LooplineError(f"reading alerts: {m.error().str()}")
                continue
            alert = avro.codec("alert").decode(m.value())
            if alert["pipeline"] != self.spec.name or alert["state"] != "raised":
                continue
            self.story.alerts.append((position, alert))
            self.console.print(f"  [yellow]alert[/] at event {position}: {alert['message']}")
        self.registry.poll(0)
        state = self.registry.state
        for (p, _, version), record in sorted(state.versions.items()):
            if p == self.spec.name and version not in self.story.versions:
                self.story.versions[version] = record
                if record.get("scorecard_json"):
                    card = orjson.loads(record["scorecard_json"])
                    self.console.print(
                        f"  [cyan]new version[/] {version_id(record['name'], version)} at event "
                        f"{position} (trigger {record['trigger']}): {card.get('reason', '')}")
        for change in state.stage_changes[self._seen_changes:]:
            if change["pipeline"] == self.spec.name:
                self.story.stages.append((position, change))
                self.console.print(
                    f"  [green]stage[/] {version_id(change['name'], change['version'])} -> "
                    f"{change['to_stage']} at event {position}: {change['reason']}")
        self._seen_changes = len(state.stage_changes)

    def promoted(self, first_version: int) -> dict[str, Any] | None:
        """The first later version that became champion, if any."""
        for _, c in self.story.stages:
            if c["to_stage"] == "champion" and c["version"] != first_version:
                return c
        return None

    def close(self) -> None:
        """Release the readers."""
        self.alerts.close()
        self.registry.close()


def _serves(process: ServiceProcess, pipeline: str) -> bool:
    ready, reason = process.readiness()
    return ready and pipeline in reason


def _fresh_state(home: Path, pipeline: str) -> None:
    # The embedded broker starts empty, so state a previous demo left behind would not match it.
    for path in (home / "lineage" / pipeline, home / "state"):
        shutil.rmtree(path, ignore_errors=True)


def run_demo(settings: LooplineSettings, pipeline_file: Path, keep: bool, console: Console,
             plan: Plan | None = None) -> None:
    """Run the whole demo and print its summary; Ctrl-C stops it and all it started at once."""
    plan = plan or Plan()
    spec = load_spec(pipeline_file)
    # Like `loopline up`: the first Ctrl-C interrupts whatever runs (a wait, training, streaming);
    # the services and the broker run in their own sessions, so the terminal's SIGINT reaches
    # only this process, which stops the services while the broker is still there, then the broker.
    stopper = Stopper()
    stopper.install()
    try:
        _run(settings, spec, keep, console, plan, stopper)
    except StopRequested as e:
        console.print(f"demo stopped by {e}; services and broker stopped", style="dim")
    finally:
        stopper.disarm()


def _run(settings: LooplineSettings, spec: PipelineSpec, keep: bool, console: Console,
         plan: Plan, stopper: Stopper) -> None:
    with ExitStack() as stack:
        try:
            _steps(settings, spec, keep, console, plan, stack)
        finally:
            stopper.disarm()  # before the stack unwinds: a second Ctrl-C must not cut it short


def _steps(settings: LooplineSettings, spec: PipelineSpec, keep: bool, console: Console,
           plan: Plan, stack: ExitStack) -> None:
    if settings.bootstrap_servers:
        address = BrokerAddress(settings.bootstrap_servers, settings.kafka_profile == "embedded")
        console.print(f"[1/6] using the Kafka cluster at {address.bootstrap_servers}")
    else:
        if read_state(settings.home) is not None:
            raise LooplineError(f"a broker already runs from {settings.home}; the demo starts its "
                                "own: stop that one or run the demo with another LOOPLINE_HOME")
        _fresh_state(settings.home, spec.name)
        with console.status("[1/6] starting the embedded broker..."):
            broker = stack.enter_context(EmbeddedBroker(home=settings.home))
        address = BrokerAddress(broker.bootstrap_servers, True)
        console.print("[1/6] embedded Kafka-protocol broker at "
                      f"[bold]{address.bootstrap_servers}[/]")
    kafka = KafkaConfig(settings, address)
    ensure_global_topics(kafka)
    apply_spec(kafka, spec)

    supervisor = Supervisor(settings, address.bootstrap_servers, address.embedded)
    stack.callback(supervisor.stop)
    supervisor.start()
    with console.status("[2/6] starting ingest, inference, monitor, trainer and lineage..."):
        if not supervisor.wait_ready(120):
            raise LooplineError("services did not become ready; see "
                                + str(supervisor.home / "logs"))
    console.print(f"[2/6] pipeline [bold]{spec.name}[/] applied; 5 services ready "
                  f"(logs in {supervisor.home / 'logs'})")

    with console.status("[3/6] training the first model on pre-drift data..."):
        onnx_model, reference = first_model(spec, plan.seed)
        registry = ModelRegistry(kafka, ArtifactStore.from_settings(settings), actor="demo")
        first = registry.register(spec.name, onnx_model, NewVersion(reference=reference))
        # Inference subscribes once the pipeline has a champion; wait until it joined its group.
        inference = next(s for s in supervisor.services if s.name == "inference")
        deadline = time.monotonic() + 60
        while not _serves(inference, spec.name):
            if time.monotonic() > deadline:
                raise LooplineError(f"inference did not start serving {spec.name}: "
                                    f"{inference.health()}")
            time.sleep(0.2)
    console.print(f"[3/6] registered {version_id(first['name'], first['version'])} as champion "
                  f"(sha256 {first['sha256'][:12]}, validated in ONNX Runtime); "
                  "inference serves it")

    watcher = Watcher(kafka, spec, console)
    stack.callback(watcher.close)
    events = list(sea_stream(plan))
    console.print(f"[4/6] streaming {plan.total} SEA events at {plan.rate:.0f}/s; the concept "
                  f"drifts at event {plan.before}; labels come back {LABEL_DELAY} events late")
    watcher.supervisor = supervisor
    produced = _stream(kafka, spec, plan, events, watcher, console)
    with console.status("[5/6] waiting for the promotion and for lineage to catch up..."):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and watcher.promoted(first["version"]) is None:
            watcher.poll(produced)
            time.sleep(0.5)
        lineage_done = _wait_lineage(settings, spec, produced, watcher)
    console.print(f"[5/6] lineage store holds {lineage_done} served predictions")
    _summary(settings, spec, plan, events, first, watcher, onnx_model, produced, console, kafka)
    if keep:
        console.print("Ctrl-C stops the demo (services and broker).", style="dim")
        while True:
            time.sleep(0.5)
            supervisor.supervise_once()


def _stream(kafka: KafkaConfig, spec: PipelineSpec, plan: Plan,
            events: list[tuple[dict[str, float], str]], watcher: Watcher, console: Console) -> int:
    producer = AckedProducer(kafka.producer("loopline-demo"))
    try:
        return _produce(producer, spec, plan, events, watcher, console)
    finally:
        # Interrupted, nothing queued is worth waiting for: drop it, so closing never blocks and
        # no client outlives the broker (it would log refused connections until it is collected).
        release_producer(producer.producer)


def _produce(producer: AckedProducer, spec: PipelineSpec, plan: Plan,
             events: list[tuple[dict[str, float], str]], watcher: Watcher,
             console: Console) -> int:
    start, bad = time.monotonic(), 0
    columns = (TextColumn("  events"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("stream", total=len(events), note="")
        for i, (x, _) in enumerate(events):
            producer.send(spec.topics.raw, orjson.dumps({"event_id": f"e{i}", "key": f"k{i % 500}",
                                                         "features": x}), key=f"k{i % 500}")
            # malformed input: dead-lettered, never lost
            if i % plan.bad_every == plan.bad_every - 1:
                bad += 1
                producer.send(spec.topics.raw, orjson.dumps({"event_id": f"bad{i}", "features": {
                    "x1": "seven", "x2": 1.0, "x3": 99.0}}))
            j = i - LABEL_DELAY
            if j >= 0:
                record = feedback.make(event_id=f"e{j}", label=events[j][1], feedback_id=f"f{j}")
                producer.send(spec.topics.feedback, feedback.encode(record), key=f"e{j}")
            if i % 25 == 0:
                producer.producer.poll(0)
                watcher.poll(i)
                note = "after the drift" if i >= plan.before else "before the drift"
                progress.update(task, completed=i, note=note)
            delay = start + (i + 1) / plan.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        producer.confirm()
        progress.update(task, completed=len(events), note=f"done; {bad} malformed events sent too")
    return len(events)


def _wait_lineage(settings: LooplineSettings, spec: PipelineSpec, expected: int,
                  watcher: Watcher) -> int:
    from loopline.services.lineage.query import connect
    from loopline.services.lineage.store import LineageStore

    store = LineageStore(settings.home / "lineage")
    deadline, served = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        if spec.name in store.pipelines():
            con = connect(store, spec.name)
            served = con.execute(
                "SELECT count(DISTINCT event_id) FROM predictions WHERE served").fetchall()[0][0]
            con.close()
            if served >= expected:
                break
        watcher.poll(expected)
        time.sleep(1.0)
    return int(served)


def _summary(settings: LooplineSettings, spec: PipelineSpec, plan: Plan,
             events: list[tuple[dict[str, float], str]], first: dict[str, Any], watcher: Watcher,
             onnx_model: bytes, produced: int, console: Console, kafka: KafkaConfig) -> None:
    from loopline.app.report import write_report
    from loopline.scoring import Scorer
    from loopline.services.lineage.query import connect
    from loopline.services.lineage.store import LineageStore

    store = LineageStore(settings.home / "lineage")
    report_file = settings.home / f"report-{spec.name}.html"
    with console.status("[6/6] writing the report...") as status:
        report = write_report(kafka, store, spec.name, report_file,
                              step=lambda what: status.update(f"[6/6] report: {what}..."))
    con = connect(store, spec.name)
    rows = con.execute("SELECT event_id, model_version, label FROM predictions WHERE served"
                       ).fetchall()
    con.close()
    served = {int(e[1:]): (v, label) for e, v, label in rows if e.startswith("e")}
    latency = report.data.latency_total  # the report's numbers, so the two never disagree

    def pct(key: str) -> str:
        return "-" if latency[key] is None else f"{latency[key]:,.0f} ms"

    def accuracy(ids: list[int]) -> str:
        ids = [i for i in ids if i in served]
        if not ids:
            return "-"
        agreement = sum(served[i][1] == events[i][1] for i in ids) / len(ids)
        return f"{agreement:.3f} ({len(ids)} events)"

    promoted = watcher.promoted(first["version"])
    after = list(range(plan.before, produced))
    frozen = Scorer(onnx_model, spec).score([events[i][0] for i in after]).labels or []
    frozen_acc = sum(f == events[i][1]
                     for f, i in zip(frozen, after, strict=True)) / max(len(after), 1)
    after_promotion = [i for i in after if i in served and promoted
                       and served[i][0] == promoted["version"]]
    first_alert = next(((pos, a) for pos, a in watcher.story.alerts
                        if a["signal"] in ("performance", "drift")), None)
    table = Table("", "value", title="[6/6] loopline demo: summary")
    table.add_row("events produced",
                  f"{produced} (+{produced // plan.bad_every} malformed, dead-lettered)")
    table.add_row("served predictions in the lineage store", str(len(served)))
    table.add_row("latency event -> prediction, p50 / p99", f"{pct('p50')} / {pct('p99')}")
    table.add_row("true drift position", f"event {plan.before}")
    table.add_row("first alert (seen while producing)",
                  f"event {first_alert[0]} ({first_alert[1]['signal']}, "
                  f"{first_alert[1]['detector']}; labels arrive {LABEL_DELAY} events late)"
                  if first_alert else "none")
    table.add_row("versions", ", ".join(f"{version_id(r['name'], v)} {r['stage']}"
                                        for v, r in sorted(watcher.story.versions.items())))
    table.add_row("promoted", version_id(promoted["name"], promoted["version"]) if promoted
                  else "no promotion yet")
    table.add_row("accuracy before the drift (served)", accuracy(list(range(plan.before))))
    table.add_row("accuracy after the drift, frozen first model",
                  f"{frozen_acc:.3f} ({len(after)} events)")
    table.add_row("accuracy after the promotion (served)", accuracy(after_promotion))
    if after_promotion:
        chosen = set(after_promotion)
        same = [f == events[i][1] for f, i in zip(frozen, after, strict=True) if i in chosen]
        table.add_row("  the frozen first model on those same events",
                      f"{sum(same) / len(same):.3f}")
    console.print(table)
    console.print(f"report: [bold]{report_file.resolve()}[/] ({len(report.charts)} charts; "
                  "open it in a browser, it needs no network)")
    console.print(f"try: loopline lineage query {spec.name} --model "
                  f"{version_id(first['name'], first['version'])}   "
                  f"(the lineage store stays in {settings.home / 'lineage'})")
    hint = path_hint()
    if hint:
        console.print(hint, style="dim")


def path_hint() -> str | None:
    """How to put ``loopline`` on PATH when the shell would not find it, else None."""
    here = Path(sys.executable).parent
    found = shutil.which("loopline")
    if found is not None and Path(found).resolve().parent == here.resolve():
        return None
    return (f"`loopline` is in {here}, not on your PATH: run `source {here / 'activate'}` "
            "(or `make shell`) first, or call it as " + str(here / "loopline"))
