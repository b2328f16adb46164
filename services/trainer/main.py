"""Entry point of ``loopline run trainer``."""

from __future__ import annotations

from loopline.runtime.service import ServiceRuntime
from loopline.services.trainer.metrics import TrainerMetrics
from loopline.services.trainer.service import TrainerService
from loopline.services.trainer.settings import TrainerSettings


def serve(rt: ServiceRuntime, settings: TrainerSettings) -> None:
    """Run the trainer until ``rt.stop`` is set."""
    service = TrainerService(settings, rt.kafka, rt.health, TrainerMetrics(rt.registry), rt.group_id)
    try:
        service.start()
        service.run(rt.stop)
    finally:
        service.close()


def main() -> None:
    """Build the settings from LOOPLINE_* variables and train until SIGINT/SIGTERM."""
    settings = TrainerSettings()
    with ServiceRuntime("trainer", settings) as rt:
        serve(rt, settings)
