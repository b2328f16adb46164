"""``loopline run ingest``: the ingest service as its own process."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime
from loopline.services.ingest.service import IngestService
from loopline.services.ingest.settings import IngestSettings


def serve(rt: ServiceRuntime, settings: IngestSettings) -> None:
    """Run ingest until ``rt.stop`` is set."""
    IngestService(rt, settings).run()


def main() -> None:
    """Run ingest until SIGINT/SIGTERM, with /metrics, /healthz and /readyz."""
    settings = IngestSettings()
    with ServiceRuntime("ingest", settings) as rt:
        serve(rt, settings)
