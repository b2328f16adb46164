"""Entry point of ``loopline run lineage``."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime
from loopline.services.lineage.service import LineageService
from loopline.services.lineage.settings import LineageSettings


def serve(rt: ServiceRuntime, settings: LineageSettings) -> None:
    """Run lineage until ``rt.stop`` is set."""
    LineageService(rt, settings).run()


def main() -> None:
    """Run the lineage service until SIGINT/SIGTERM."""
    settings = LineageSettings()
    with ServiceRuntime("lineage", settings) as rt:
        serve(rt, settings)
