"""``loopline run monitor``: the monitor service process."""

from __future__ import annotations

from loopline.kafka import AckedProducer, ensure_topics
from loopline.registry import ALERTS_TOPIC, MODELS_TOPIC, RegistryReader
from loopline.runtime.service import ServiceRuntime
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.readers import ReaderOffsets
from loopline.services.monitor.service import MonitorService, checkpoint_path
from loopline.services.monitor.settings import MonitorSettings
from loopline.services.monitor.state import Checkpoint


def create(rt: ServiceRuntime, settings: MonitorSettings) -> MonitorService:
    """Build the monitor (restoring its checkpoint, if any) inside a service runtime."""
    ensure_topics(rt.kafka.admin(), [MODELS_TOPIC, ALERTS_TOPIC], settings.replication_factor)
    producer = AckedProducer(rt.kafka.producer("loopline-monitor"))
    return MonitorService(settings, MonitorMetrics(rt.registry), producer,
                          Checkpoint(checkpoint_path(settings, rt.group_id)),
                          readers=ReaderOffsets(rt.kafka.admin("loopline-monitor"), rt.group_id))


def serve(rt: ServiceRuntime, service: MonitorService) -> None:
    """Run ``service`` until the runtime's stop flag is set; the state is checkpointed on the way out."""
    registry = RegistryReader(rt.kafka, f"{rt.group_id}-registry")
    consumer = rt.kafka.consumer("loopline-monitor", rt.group_id)
    try:
        service.run(consumer, registry, rt.stop, rt.health)
    finally:
        registry.close()


def main() -> None:
    """Run the monitor until SIGINT/SIGTERM."""
    settings = MonitorSettings()
    with ServiceRuntime("monitor", settings) as rt:
        serve(rt, create(rt, settings))


if __name__ == "__main__":
    main()
