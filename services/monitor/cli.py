"""``loopline monitor ...``: commands a person gives the running monitor, through the registry."""

from __future__ import annotations

import click

from loopline.errors import LooplineError
from loopline.terminal import make_console

console = make_console(soft_wrap=True)


@click.group()
def monitor() -> None:
    """Tell the running monitor what is normal now."""


@monitor.command()
@click.argument("pipeline")
@click.option(
    "--reason", default="", help="Why: recorded with the command and quoted in the resolved alerts."
)
def rebaseline(pipeline: str, reason: str) -> None:
    """Make PIPELINE's recent live traffic the monitor's reference.

    The monitor takes the last `monitor.window` values of every feature and model output it has
    seen as their new reference (columns with fewer warm up on the next ones), restarts every
    model version's performance baseline from its last window of labels, and resolves the open
    drift and performance episodes, saying so. It applies each rebaseline once, on the registry
    topic loopline.models, wherever it runs.
    """
    from loopline.kafka import AckedProducer, KafkaConfig
    from loopline.observability import configure_logging
    from loopline.registry import RegistryReader, publish, rebaseline_event
    from loopline.settings import LooplineSettings

    settings = LooplineSettings()
    configure_logging("WARNING", "console")  # the CLI speaks through its own output
    kafka = KafkaConfig.from_settings(settings)
    reader = RegistryReader(kafka, client_id="loopline-monitor-cli")
    try:
        known = reader.catch_up().specs
    finally:
        reader.close()
    if pipeline not in known:
        raise LooplineError(
            f"pipeline {pipeline!r} is not in the registry "
            f"(known: {', '.join(sorted(known)) or 'none'}); nothing to rebaseline"
        )
    key, event = rebaseline_event(pipeline, reason=reason)
    publish(AckedProducer(kafka.producer("loopline-monitor-cli")), key, event)
    console.print(
        f"{pipeline}: rebaseline {event['rebaseline']['id']} sent; the monitor takes its recent "
        "traffic as the reference when it reads it, and resolves open drift alerts."
    )
