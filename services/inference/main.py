"""Entry point of ``loopline run inference``."""

from __future__ import annotations

from loopline.kafka import AckedProducer, run_batches
from loopline.runtime.service import ServiceRuntime
from loopline.services.inference.metrics import InferenceMetrics
from loopline.services.inference.service import InferenceService
from loopline.services.inference.settings import InferenceSettings


def serve(rt: ServiceRuntime, settings: InferenceSettings) -> None:
    """Run the inference loop until ``rt.stop`` is set."""
    producer = AckedProducer(rt.kafka.producer("loopline-inference"))
    consumer = rt.kafka.consumer("loopline-inference", rt.group_id)
    service = InferenceService(settings, rt.kafka, producer, consumer, InferenceMetrics(rt.registry), rt.health)
    try:
        service.start()
        run_batches(consumer, producer, service.handle, rt.stop, settings.batch_size, settings.batch_timeout_s,
                    on_idle=service.idle)
    finally:
        service.reader.close()


def main() -> None:
    """Build the settings from LOOPLINE_* variables and serve until SIGINT/SIGTERM."""
    settings = InferenceSettings()
    with ServiceRuntime("inference", settings) as rt:
        serve(rt, settings)
