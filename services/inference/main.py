"""Entry point of ``loopline run inference``."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime
from loopline.services.inference.service import serve
from loopline.services.inference.settings import InferenceSettings

__all__ = ["main", "serve"]


def main() -> None:
    """Build the settings from LOOPLINE_* variables and serve until SIGINT/SIGTERM."""
    settings = InferenceSettings()
    with ServiceRuntime("inference", settings) as rt:
        serve(rt, settings)
