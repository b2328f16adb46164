"""``loopline run ingest``: the ingest service as its own process."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime

from loopline.services.ingest.service import IngestService
from loopline.services.ingest.settings import IngestSettings


def main() -> None:
    """Run ingest until SIGINT/SIGTERM, with /metrics, /healthz and /readyz."""
    settings = IngestSettings()
    with ServiceRuntime("ingest", settings) as rt:
        IngestService(rt, settings).run()
