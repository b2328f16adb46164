"""Entry point of ``loopline run trainer``."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime
from loopline.services.trainer.service import create, serve
from loopline.services.trainer.settings import TrainerSettings

__all__ = ["create", "main", "serve"]


def main() -> None:
    """Build the settings from LOOPLINE_* variables and train until SIGINT/SIGTERM."""
    settings = TrainerSettings()
    with ServiceRuntime("trainer", settings) as rt:
        serve(rt, settings)
