"""The ``loopline`` command line."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from loopline.errors import BrokerError, LooplineError
from loopline.runtime.service import SERVICES
from loopline.settings import LooplineSettings
from loopline.terminal import make_console

console = make_console()
errors = make_console(stderr=True)


class LooplineGroup(click.Group):
    """A click group that turns Loopline errors from
    any subcommand into one clear message (exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; print a LooplineError as one message instead of a traceback."""
        try:
            return super().invoke(ctx)
        except LooplineError as e:
            errors.print(Text("error: ", style="bold red") + Text(str(e)), soft_wrap=True)
            sys.exit(2)


def _settings(**overrides: Any) -> LooplineSettings:
    from loopline.observability import configure_logging

    settings = LooplineSettings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging("WARNING", "console")  # the CLI speaks through its own output
    return settings


@click.group(cls=LooplineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loopline")
def main() -> None:
    """Loopline: streaming MLOps on Kafka (ingest, inference, monitor, trainer, lineage)."""


_ENGINE = click.option(
    "--engine", type=click.Choice(["tansu", "kafka"]), default=None,
    help="Broker engine (default: LOOPLINE_ENGINE, else tansu): tansu keeps everything in memory "
         "and needs nothing installed; kafka is Apache Kafka, durable in LOOPLINE_HOME/kafka "
         "(needs Java 17+, and Maven for its first start).")


@main.command()
@click.option("--port", type=int, default=0, show_default=True,
              help="Port to listen on (0: a free one; the kafka engine reuses its last one).")
@_ENGINE
def broker(port: int, engine: str | None) -> None:
    """Run a broker (Tansu in memory, or Apache Kafka on disk) until Ctrl-C."""
    from loopline.app.up import Stopper, StopRequested, progress_to
    from loopline.apply import ensure_global_topics
    from loopline.brokers import STATE_FILE, KafkaBroker, make_broker
    from loopline.kafka import KafkaConfig

    settings = _settings(engine=engine)
    stopper = Stopper()
    stopper.install()
    process = None
    try:
        with console.status(f"starting the {settings.engine} broker...") as status:
            process = make_broker(settings.engine, settings.home, port,
                                  progress=progress_to(console, status))
            address = process.start()
        ensure_global_topics(KafkaConfig.from_settings(settings))
        if isinstance(process, KafkaBroker):
            console.print(f"Apache Kafka {process.version} broker ready at [bold]{address}[/] "
                          f"(pid {process.pid}, cluster id {process.cluster_id}, "
                          f"data in {process.dir})")
            kept = f"its data stays in {process.data_dir} for the next start"
        else:
            console.print(f"Kafka-protocol broker ready at [bold]{address}[/] "
                          f"(pid {process.pid}, tansu, memory storage)")
            kept = "all data is in memory and goes with it"
        console.print(f"state: {settings.home / STATE_FILE} — other loopline commands use it; "
                      f"try: kcat -b {address} -L")
        console.print(f"Ctrl-C stops it ({kept}).", style="dim")
        sys.stdout.flush()
        while True:
            time.sleep(0.5)
            if not process.running():
                raise LooplineError(f"the broker exited unexpectedly (exit code "
                                    f"{process.returncode()}); see {process.log_path}")
    except StopRequested:
        pass
    finally:
        stopper.disarm()
        if process is not None:
            started = process.pid is not None
            process.stop()
            if started:
                console.print("broker stopped")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def apply(files: tuple[Path, ...]) -> None:
    """Validate pipeline spec FILES, create their topics and publish them to the registry."""
    from loopline.apply import apply_spec
    from loopline.kafka import KafkaConfig
    from loopline.spec import load_spec

    settings = _settings()
    specs = [load_spec(f) for f in files]  # validate all before changing anything
    kafka = KafkaConfig.from_settings(settings)
    for spec in specs:
        with console.status(f"applying {spec.name}..."):
            result = apply_spec(kafka, spec)
        change = "published" if result.published else "unchanged"
        console.print(f"pipeline [bold]{spec.name}[/]: spec {change} "
                      f"(sha256 {spec.sha256()[:12]}), topics: {', '.join(spec.topics.all())}"
                      + (f"; created {len(result.created_topics)}" if result.created_topics
                         else ""))


@main.command()
def topics() -> None:
    """List the broker's topics with their partitions."""
    from loopline.kafka import KafkaConfig

    kafka = KafkaConfig.from_settings(_settings())
    metadata = kafka.admin().list_topics(timeout=10)
    table = Table("topic", "partitions", title=f"topics on {kafka.broker.bootstrap_servers}")
    for name in sorted(metadata.topics):
        table.add_row(name, str(len(metadata.topics[name].partitions)))
    console.print(table)


@main.command()
@click.argument("service", type=click.Choice(SERVICES))
def run(service: str) -> None:
    """Run one service in the foreground (what a container
    runs); settings from LOOPLINE_* variables."""
    import importlib

    try:
        module = importlib.import_module(f"loopline.services.{service}.main")
    except ModuleNotFoundError as e:
        if e.name != f"loopline.services.{service}.main":
            raise
        raise LooplineError(f"the {service} service is not built yet") from None
    module.main()


@main.command()
@click.option("--pipelines", "pipelines_dir",
              type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Apply every *.yaml pipeline spec in this folder first.")
@click.option("--services", default=None, help="Comma-separated services to run (default: all).")
@_ENGINE
def up(pipelines_dir: Path | None, services: str | None, engine: str | None) -> None:
    """Start the broker (unless LOOPLINE_BOOTSTRAP_SERVERS) and every service, all supervised.

    Ctrl-C or `loopline down` stops everything. If the broker dies, a Kafka-engine broker is
    restarted (nothing is lost); a Tansu one lost every topic, so `up` stops and exits with 3.
    """
    from loopline.app.up import UP_FILE, available_services, read_up, run_up
    from loopline.spec import load_spec

    settings = _settings(engine=engine)
    if read_up(settings.home) is not None:
        raise LooplineError(f"`loopline up` already runs (see {settings.home / UP_FILE}); "
                            "`loopline down` stops it")
    names = tuple(s.strip() for s in services.split(",")) if services else available_services()
    unknown = set(names) - set(SERVICES)
    if unknown:
        raise LooplineError(f"unknown service(s) {sorted(unknown)}; "
                            f"choose from {', '.join(SERVICES)}")
    specs = [load_spec(f) for f in sorted(pipelines_dir.glob("*.yaml"))] if pipelines_dir else []
    code = run_up(settings, names, specs, console)
    if code:
        sys.exit(code)


@main.command()
def down() -> None:
    """Stop a running `loopline up` (its services and, if it started one, its broker)."""
    from loopline.app.up import down as stop_up

    pid = stop_up(_settings())
    console.print(f"stopped loopline up (pid {pid})")


@main.command()
@click.option("--pipeline", "pipeline_file",
              type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=Path("examples/sea.yaml"), show_default=True,
              help="The SEA pipeline spec to stream.")
@click.option("--rate", type=float, default=100.0, show_default=True, help="Events per second.")
@click.option("--before", type=click.IntRange(500), default=1500, show_default=True,
              help="Events before the concept drifts.")
@click.option("--after", type=click.IntRange(500), default=3500, show_default=True,
              help="Events after it.")
@click.option("--keep", is_flag=True,
              help="Keep the services and broker running at the end until Ctrl-C.")
def demo(pipeline_file: Path, rate: float, before: int, after: int, keep: bool) -> None:
    """The whole loop on the embedded broker: drift, alert, retraining, promotion, lineage."""
    from loopline.app.demo import Plan, run_demo

    run_demo(_settings(), pipeline_file, keep, console, Plan(before=before, after=after, rate=rate))


@main.command()
@click.argument("pipeline")
@click.option("--since", help="Start: ISO-8601, epoch ms, or a duration back from now (1h).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="The HTML file to write (default: loopline-report-PIPELINE.html here).")
def report(pipeline: str, since: str | None, until: str | None, output: Path | None) -> None:
    """Write one self-contained HTML report of PIPELINE:
    what happened, drift, accuracy, versions."""
    from loopline.app.report import write_report
    from loopline.kafka import KafkaConfig
    from loopline.services.lineage.query import parse_time
    from loopline.services.lineage.settings import LineageSettings
    from loopline.services.lineage.store import LineageStore

    settings = _settings()
    start, end = (parse_time(since) if since else None), (parse_time(until) if until else None)
    output = output or Path(f"loopline-report-{pipeline}.html")
    store = LineageStore(LineageSettings().store_dir())
    with console.status("report: starting...") as status:
        built = write_report(KafkaConfig.from_settings(settings), store, pipeline, output, start,
                             end, step=lambda what: status.update(f"report: {what}..."))
    for line in built.story.lines:
        console.print(f"  {line}", soft_wrap=True)
    console.print(f"report written to [bold]{output.resolve()}[/] ({len(built.charts)} charts, "
                  f"{output.stat().st_size / 1e6:.1f} MB, opens offline)")


def _reachable(settings: LooplineSettings) -> Any:
    """Client settings for the broker, once it answered a metadata request; else say it is down."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from loopline.app.up import read_up
    from loopline.brokers import read_state, state_engine
    from loopline.kafka import KafkaConfig

    up = read_up(settings.home) if not settings.bootstrap_servers else None
    try:
        kafka = KafkaConfig.from_settings(settings)
    except BrokerError as e:
        state = read_state(settings.home, check_alive=False)
        if up is None or state is None:
            raise
        # `up` is still running, so its own supervision decides what happens next.
        then = ("it is restarting it (nothing is lost)" if state_engine(state) == "kafka" else
                "the broker kept everything in memory, so its topics and registry are gone and "
                "`up` is stopping")
        raise BrokerError(f"the broker at {state['bootstrap_servers']} is unreachable: its "
                          f"process (pid {state['pid']}) is not running; `loopline up` (pid "
                          f"{up['pid']}) supervises it: {then}") from e
    # log_level 0: a refused connection is reported once, below, not as librdkafka lines.
    admin = AdminClient(dict(kafka.common("loopline-status"), log_level=0))
    try:
        admin.list_topics(timeout=5)
        return kafka
    except KafkaException as e:
        state = read_state(settings.home) if not settings.bootstrap_servers else None
        pid = f" (pid {state['pid']} runs but does not answer)" if state else ""
        raise BrokerError(f"the broker at {kafka.broker.bootstrap_servers} is unreachable{pid}: "
                          f"{e.args[0].str()}") from None


def _registry_state(kafka: Any) -> Any:
    from loopline.registry import RegistryReader

    reader = RegistryReader(kafka, client_id="loopline-cli")
    try:
        return reader.catch_up()
    finally:
        reader.close()


def _pipeline(state: Any, name: str) -> Any:
    from loopline.topics import check_pipeline_name

    check_pipeline_name(name)
    if name not in state.specs:
        raise LooplineError(f"pipeline {name!r} is not in the registry (known: "
                            f"{', '.join(sorted(state.specs)) or 'none'})")
    return state.specs[name]


@main.command()
@click.argument("pipeline")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--rate", type=float, default=None,
              help="Events per second (default: as fast as possible).")
def produce(pipeline: str, file: Path, rate: float | None) -> None:
    """Send the events of a CSV or JSON-lines FILE to
    the pipeline's raw topic (ingest validates them)."""
    import orjson
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from loopline.app.tools import Pacer, count_lines, read_events
    from loopline.kafka import AckedProducer, KafkaConfig

    kafka = KafkaConfig.from_settings(_settings())
    spec = _pipeline(_registry_state(kafka), pipeline)
    producer = AckedProducer(kafka.producer("loopline-produce"))
    pacer, sent = Pacer(rate), 0
    columns = (TextColumn("producing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} ev/s"), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("produce", total=count_lines(file), rate="-")
        for event in read_events(file, spec):
            key = event.get("key") or (
                str(event["features"].get(spec.key))
                if spec.key and isinstance(event.get("features"), dict)
                and spec.key in event["features"] else None)
            producer.send(spec.topics.raw, orjson.dumps(event), key=key)
            sent += 1
            pacer.wait(sent)
            if sent % 500 == 0:
                elapsed = max(time.monotonic() - pacer.start, 1e-9)
                progress.update(task, completed=sent, rate=f"{sent / elapsed:,.0f}")
        producer.confirm()
        progress.update(task, completed=sent,
                        rate=f"{sent / max(time.monotonic() - pacer.start, 1e-9):,.0f}")
    console.print(f"{sent} events sent to {spec.topics.raw} and acknowledged")


@main.command()
@click.argument("pipeline", required=False)
@click.option("--topic", "kind", type=click.Choice(["predictions", "features", "raw", "feedback",
                                                    "deadletter", "alerts"]), default="predictions",
              show_default=True)
@click.option("--from-beginning", is_flag=True,
              help="Start at the oldest message instead of new ones.")
@click.option("-n", "--max", "limit", type=int, default=None, help="Stop after this many messages.")
def tail(pipeline: str | None, kind: str, from_beginning: bool, limit: int | None) -> None:
    """Print a pipeline's topic as JSON lines (decoded); Ctrl-C stops."""
    import orjson

    from loopline.app.tools import decoder, topic_of
    from loopline.app.tools import tail as tail_topic
    from loopline.kafka import KafkaConfig, StopFlag

    kafka = KafkaConfig.from_settings(_settings())
    state = _registry_state(kafka)
    spec = _pipeline(state, pipeline) if pipeline else None
    stop = StopFlag()
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGTERM, stop.set)

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(orjson.dumps(record, default=str).decode() + "\n")
        sys.stdout.flush()

    tail_topic(kafka, topic_of(spec, kind), decoder(kind, spec, state), from_beginning, limit,
               stop.is_set, emit)


@main.command()
@click.argument("pipeline")
@click.option("--prediction-id", help="The prediction this feedback is about.")
@click.option("--event-id", help="Or the event it is about.")
@click.option("--label", help="The true class (classification).")
@click.option("--value", type=float, help="The true value (regression).")
@click.option("--verdict", type=click.Choice(["accept", "reject", "correct"]),
              help="A verdict on the prediction.")
@click.option("--file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="CSV or JSON-lines, one feedback per row: prediction_id or event_id, the true "
                   "label in a column named like the spec's label (or 'label'), value, verdict.")
def feedback(pipeline: str, prediction_id: str | None, event_id: str | None, label: str | None,
             value: float | None, verdict: str | None, file: Path | None) -> None:
    """Send labels or verdicts for predictions to the pipeline's feedback topic."""
    from loopline.app.tools import read_feedback
    from loopline.sdk import FeedbackSender

    with FeedbackSender(pipeline, _settings()) as sender:
        rows: list[dict[str, Any]] = (
            read_feedback(file, sender.spec) if file is not None else
            [{"prediction_id": prediction_id, "event_id": event_id, "label": label, "value": value,
              "verdict": verdict}])
        for number, row in enumerate(rows, 1):
            try:
                sender.send(**row)
            except LooplineError as e:
                raise LooplineError(f"feedback {number}: {e}") from None
    console.print(f"{len(rows)} feedback message(s) sent to {sender.spec.topics.feedback}")


@main.command()
@click.argument("pipeline", required=False)
def status(pipeline: str | None) -> None:
    """Versions and stages, traffic split, events/s,
    consumer lag per service, open alerts, last retrain."""
    from datetime import UTC, datetime

    from loopline.app.cli_models import origin, print_rejected
    from loopline.app.status import collect
    from loopline.model_ref import version_id

    kafka = _reachable(_settings())
    state = _registry_state(kafka)
    print_rejected(console, state)  # invalid records were skipped; say so, never fail on them
    names = [_pipeline(state, pipeline).name] if pipeline else sorted(state.specs)
    if not names:
        console.print("no pipelines in the registry yet; `loopline apply FILE.yaml` adds one")
        return
    with console.status("measuring rates and lag..."):
        report = collect(kafka, state, names)
    # Tansu reports a partition's end as its last batch's base offset + 1, so rates and lag move
    # in steps of a producer batch there; Apache Kafka reports them exactly.
    approximate = (" (approximate: the embedded broker reports offsets per batch; exact on Kafka)"
                   if kafka.embedded else "")
    for p in report:
        table = Table("version", "origin", "stage", "traffic served", "sha256",
                      title=f"pipeline {p.name}")
        for v in p.versions:
            served = f"{v['share']:.0%}" + (" (scores every event)" if v["stage"] == "shadow"
                                            else "")
            table.add_row(version_id(v["name"], v["version"]), origin(v), v["stage"], served,
                          v["sha256"][:12])
        if not p.versions:
            table.add_row("(no model deployed)", "", "", "", "")
        console.print(table)
        console.print(f"events/s over the last second{approximate}: "
                      + ", ".join(f"{k} {r:,.0f}" for k, r in p.rates.items()), soft_wrap=True)
        console.print("consumer lag: " + ", ".join(f"{s} {'-' if lag is None else f'{lag:,}'}"
                                                   for s, lag in p.lag.items()))
        if p.open_alerts:
            for a in p.open_alerts:
                when = datetime.fromtimestamp(a["at"] / 1000, UTC).isoformat(timespec="seconds")
                console.print(Text(f"open alert ({a['severity']}, {when}): {a['message']}",
                                   style="yellow"))
        else:
            console.print("open alerts: none")
        if p.last_retrain:
            r = p.last_retrain
            when = datetime.fromtimestamp(r["created_at"] / 1000, UTC).isoformat(timespec="seconds")
            console.print(f"last retrain: {version_id(r['name'], r['version'])} at {when} "
                          f"(trigger: {r['trigger']}, "
                          f"stage now {r['stage']})")
        else:
            console.print("last retrain: none yet")


def _add_service_commands() -> None:
    from loopline.app.cli_models import models
    from loopline.services.lineage.cli import lineage, replay_cmd
    from loopline.services.monitor.cli import monitor

    main.add_command(models)
    main.add_command(monitor)
    main.add_command(lineage)
    main.add_command(replay_cmd)


_add_service_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
