"""``loopline demo``: the main job on the embedded default."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loopline.apply import apply_spec
from loopline.broker import EmbeddedBroker, read_state
from loopline.errors import LooplineError
from loopline.kafka import KafkaConfig, StopFlag
from loopline.registry import RegistryReader
from loopline.settings import LooplineSettings
from loopline.spec import load_spec


def run_demo(settings: LooplineSettings, pipeline_file: Path, keep: bool, console: Console) -> None:
    """Start (or reuse) a broker, apply the example pipeline, and show the registry and topics."""
    spec = load_spec(pipeline_file)
    with contextlib.ExitStack() as stack:
        if settings.bootstrap_servers or read_state(settings.home) is not None:
            console.print("[1/3] using the running broker")
        else:
            with console.status("[1/3] starting the embedded broker..."):
                embedded = stack.enter_context(EmbeddedBroker(home=settings.home))
            console.print(f"[1/3] embedded broker ready at [bold]{embedded.bootstrap_servers}[/]")
        kafka = KafkaConfig.from_settings(settings)

        with console.status(f"[2/3] applying {pipeline_file}..."):
            result = apply_spec(kafka, spec)
        console.print(f"[2/3] pipeline [bold]{spec.name}[/] applied "
                      f"({'published to the registry' if result.published else 'already registered'})")

        with console.status("[3/3] reading the registry back..."):
            reader = RegistryReader(kafka, client_id="loopline-demo")
            try:
                state = reader.catch_up()
            finally:
                reader.close()
            metadata = kafka.admin().list_topics(timeout=10).topics
        registered = state.specs.get(spec.name)
        if registered is None or registered.sha256() != spec.sha256():
            raise LooplineError(f"the registry does not hold pipeline {spec.name} as applied")
        table = Table("topic", "partitions", title=f"pipeline {spec.name} is ready")
        for name in [*spec.topics.all(), "loopline.models", "loopline.alerts"]:
            table.add_row(name, str(len(metadata[name].partitions)) if name in metadata else "MISSING")
        console.print(table)
        features = ", ".join(f"{f.name}:{f.type}" for f in spec.features)
        console.print(f"[3/3] registry holds {len(state.specs)} pipeline(s); "
                      f"{spec.name} features: {features}")
        console.print(f"ready: produce JSON events to {spec.topics.raw} "
                      f"(bootstrap {kafka.broker.bootstrap_servers})")
        if keep:
            stop = StopFlag()
            signal.signal(signal.SIGINT, stop.set)
            signal.signal(signal.SIGTERM, stop.set)
            console.print("Ctrl-C stops the demo.", style="dim")
            while not stop.wait(0.5):
                pass
