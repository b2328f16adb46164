"""What every service process shares: logging, metrics/health server, signals, Kafka config."""

from __future__ import annotations

import logging
import signal
from types import TracebackType

from prometheus_client import CollectorRegistry, Gauge

from loopline.kafka import KafkaConfig, StopFlag
from loopline.observability import Health, MetricsServer, configure_logging
from loopline.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVICES = ("ingest", "inference", "monitor", "trainer", "lineage")


class ServiceRuntime:
    """Set up a service process; use as a context manager around its main loop.

    Provides ``kafka`` (client factory), ``registry`` (Prometheus, private to this process),
    ``health`` (liveness/readiness), ``stop`` (set by SIGINT/SIGTERM) and ``group_id``.
    """

    def __init__(self, name: str, settings: ServiceSettings, install_signals: bool = True) -> None:
        self.name = name
        self.settings = settings
        configure_logging(settings.log_level, settings.log_format)
        self.log = logging.getLogger(f"loopline.{name}")
        self.kafka = KafkaConfig.from_settings(settings)
        self.registry = CollectorRegistry()
        self.health = Health()
        self.stop = StopFlag()
        if install_signals:
            signal.signal(signal.SIGINT, self.stop.set)
            signal.signal(signal.SIGTERM, self.stop.set)
        Gauge("loopline_service_up", "1 while the service process runs", ["service"],
              registry=self.registry).labels(name).set(1)
        self.metrics = MetricsServer(self.registry, self.health, settings.metrics_host, settings.metrics_port)

    @property
    def group_id(self) -> str:
        """The consumer group of this service (replicas share it)."""
        return self.settings.group_id or f"loopline-{self.name}"

    def __enter__(self) -> ServiceRuntime:
        self.metrics.start()
        self.log.info("service_started", extra={
            "service": self.name, "metrics": self.metrics.address,
            "bootstrap_servers": self.kafka.broker.bootstrap_servers, "group_id": self.group_id})
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.log.error("service_failed", exc_info=(exc_type, exc, tb),  # type: ignore[arg-type]
                           extra={"service": self.name})
        self.metrics.stop()
        self.log.info("service_stopped", extra={"service": self.name})
