"""The ``loopline`` command line."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopline.errors import LooplineError
from loopline.service import SERVICES
from loopline.settings import LooplineSettings

console = Console(stderr=False, highlight=False)
errors = Console(stderr=True, highlight=False)


class LooplineGroup(click.Group):
    """A click group that turns Loopline errors from any subcommand into one clear message (exit 2)."""

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


@main.command()
@click.option("--port", type=int, default=0, show_default=True, help="Port to listen on (0: a free one).")
def broker(port: int) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) until Ctrl-C."""
    from loopline.apply import ensure_global_topics
    from loopline.broker import STATE_FILE, EmbeddedBroker
    from loopline.kafka import KafkaConfig, StopFlag

    settings = _settings()
    stop = StopFlag()
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGTERM, stop.set)
    with console.status("starting the embedded broker..."):
        embedded = EmbeddedBroker(home=settings.home, port=port)
        address = embedded.start()
    try:
        ensure_global_topics(KafkaConfig.from_settings(settings))
        console.print(f"Kafka-protocol broker ready at [bold]{address}[/] (pid {embedded.pid}, memory storage)")
        console.print(f"state: {settings.home / STATE_FILE} — other loopline commands use it; "
                      f"try: kcat -b {address} -L")
        console.print("Ctrl-C stops it (all data is in memory and goes with it).", style="dim")
        sys.stdout.flush()
        while not stop.wait(0.5):
            if not embedded.running():
                raise LooplineError(f"the broker exited unexpectedly; see {settings.home / 'broker.log'}")
    finally:
        embedded.stop()
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
                      + (f"; created {len(result.created_topics)}" if result.created_topics else ""))


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
    """Run one service in the foreground (what a container runs); settings from LOOPLINE_* variables."""
    import importlib

    try:
        module = importlib.import_module(f"loopline.services.{service}.main")
    except ModuleNotFoundError as e:
        if e.name != f"loopline.services.{service}.main":
            raise
        raise LooplineError(f"the {service} service is not built yet") from None
    module.main()


@main.command()
@click.option("--pipelines", "pipelines_dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Apply every *.yaml pipeline spec in this folder first.")
@click.option("--services", default=None, help="Comma-separated services to run (default: all).")
def up(pipelines_dir: Path | None, services: str | None) -> None:
    """Start the broker (embedded unless LOOPLINE_BOOTSTRAP_SERVERS) and every service; Ctrl-C stops all."""
    from loopline.apply import apply_spec, ensure_global_topics
    from loopline.broker import BrokerAddress
    from loopline.kafka import KafkaConfig, StopFlag
    from loopline.spec import load_spec
    from loopline.up import UP_FILE, Supervisor, available_services, broker_for, install_stop, read_up

    settings = _settings()
    if read_up(settings.home) is not None:
        raise LooplineError(f"`loopline up` already runs (see {settings.home / UP_FILE}); `loopline down` stops it")
    names = tuple(s.strip() for s in services.split(",")) if services else available_services()
    unknown = set(names) - set(SERVICES)
    if unknown:
        raise LooplineError(f"unknown service(s) {sorted(unknown)}; choose from {', '.join(SERVICES)}")
    specs = [load_spec(f) for f in sorted(pipelines_dir.glob("*.yaml"))] if pipelines_dir else []
    stop = StopFlag()
    install_stop(stop)
    with broker_for(settings) as (bootstrap, embedded):
        console.print(f"broker: {bootstrap} ({'embedded' if embedded else 'external'})")
        kafka = KafkaConfig(settings, BrokerAddress(bootstrap, embedded))
        ensure_global_topics(kafka)
        for spec in specs:
            apply_spec(kafka, spec)
            console.print(f"pipeline {spec.name} applied")
        supervisor = Supervisor(settings, bootstrap, embedded, names)
        supervisor.start()
        try:
            with console.status("starting services...") as status:
                ready = supervisor.wait_ready(120, lambda states: status.update(
                    "starting services: " + ", ".join(f"{n} {h}" for n, h in states)))
            table = Table("service", "pid", "metrics and health", "state", title="loopline is up" if ready
                          else "loopline is up, but not every service is ready")
            for s in supervisor.services:
                table.add_row(s.name, str(s.process.pid if s.process else "-"),
                              f"{s.metrics}/metrics  {s.metrics}/readyz", s.health())
            console.print(table)
            console.print(f"logs: {supervisor.home / 'logs'}; Ctrl-C or `loopline down` stops everything")
            while not stop.wait(1.0):
                for name in supervisor.supervise_once():
                    console.print(f"restarted {name} (it had exited; see its log)")
        finally:
            supervisor.stop()
            (supervisor.home / UP_FILE).unlink(missing_ok=True)
            console.print("all services stopped")


@main.command()
def down() -> None:
    """Stop a running `loopline up` (its services and, if it started one, the embedded broker)."""
    from loopline.up import down as stop_up

    pid = stop_up(_settings())
    console.print(f"stopped loopline up (pid {pid})")


@main.command()
@click.option("--pipeline", "pipeline_file", type=click.Path(path_type=Path),
              default=Path("examples/fraud.yaml"), show_default=True, help="Pipeline spec to apply.")
@click.option("--keep", is_flag=True, help="Keep the broker running until Ctrl-C at the end.")
def demo(pipeline_file: Path, keep: bool) -> None:
    """Start the embedded broker, apply an example pipeline and show that it is ready."""
    from loopline.demo import run_demo

    run_demo(_settings(), pipeline_file, keep, console)


def _add_service_commands() -> None:
    from loopline.services.lineage.cli import lineage

    main.add_command(lineage)
    from loopline.cli_models import models

    main.add_command(models)


_add_service_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
