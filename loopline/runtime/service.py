"""What every service process shares: logging,
metrics/health server, signals, Kafka clients, loop."""

from __future__ import annotations

import logging
import os
import signal
import socket
from types import TracebackType

from confluent_kafka import Consumer
from prometheus_client import CollectorRegistry, Gauge

from loopline.errors import ClientStuck
from loopline.kafka import KafkaConfig, StopFlag
from loopline.observability import Health, MetricsServer, configure_logging
from loopline.runtime.delivery import AtLeastOnce, Delivery, ExactlyOnce, Failures
from loopline.runtime.loop import Checkpointer, Handler, Loop, LoopMetrics, LoopSettings
from loopline.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVICES = ("ingest", "inference", "monitor", "trainer", "lineage")
#: Set by the supervisor (`loopline up`) on every start: how often it restarted this service.
RESTARTS_ENV = "LOOPLINE_SERVICE_RESTARTS"
#: Exit code of a service whose Kafka client hung (see :class:`loopline.errors.ClientStuck`).
EXIT_STUCK = 75


class ServiceRuntime:
    """Set up a service process; use as a context manager around its main loop.

    Provides ``kafka`` (client factory whose errors reach ``health``), ``registry`` (Prometheus,
    private to this process), ``health`` (liveness/readiness), ``stop`` (set by SIGINT/SIGTERM),
    ``group_id``, and builds the service's :meth:`delivery` and :meth:`loop`.
    """

    def __init__(self, name: str, settings: ServiceSettings, install_signals: bool = True) -> None:
        self.name = name
        self.settings = settings
        configure_logging(settings.log_level, settings.log_format)
        self.log = logging.getLogger(f"loopline.{name}")
        self.health = Health()
        self.kafka = KafkaConfig.from_settings(settings).with_error_callback(
            self.health.broker_error)
        self.registry = CollectorRegistry()
        self.stop = StopFlag()
        # a process of its own (not a service on a test thread)
        self._owns_process = install_signals
        if install_signals:
            signal.signal(signal.SIGINT, self.stop.set)
            signal.signal(signal.SIGTERM, self.stop.set)
        Gauge("loopline_service_up", "1 while the service process runs", ["service"],
              registry=self.registry).labels(name).set(1)
        restarts = os.environ.get(RESTARTS_ENV, "0")
        Gauge("loopline_service_restarts", "Times the supervisor restarted this service",
              ["service"],
              registry=self.registry).labels(name).set(int(restarts) if restarts.isdigit() else 0)
        self.loop_metrics = LoopMetrics(self.registry, name)
        self.metrics = MetricsServer(self.registry, self.health, settings.metrics_host,
                                     settings.metrics_port)

    @property
    def group_id(self) -> str:
        """The consumer group of this service (replicas share it)."""
        return self.settings.group_id or f"loopline-{self.name}"

    @property
    def transactional_id(self) -> str:
        """This replica's transactional id: stable across
        its restarts, distinct between replicas."""
        return f"{self.group_id}.{self.settings.instance_id or socket.gethostname()}"

    def delivery(self, **producer_overrides: object) -> Delivery:
        """Exactly-once (transactions) on Kafka, at-least-once
        on the embedded broker (LOOPLINE_DELIVERY)."""
        # Failures only, to one callback in the producer's configuration (see Failures).
        failures = Failures()
        conf = {"on_delivery": failures, "delivery.report.only.error": True, **producer_overrides}
        if self.kafka.exactly_once:
            # Two producers taking turns (see ExactlyOnce): ids "<id>" and "<id>.2".
            ids = (self.transactional_id, f"{self.transactional_id}.2")
            return ExactlyOnce([self.kafka.transactional_producer(t, **conf) for t in ids],
                               failures=failures)
        return AtLeastOnce(self.kafka.producer(f"loopline-{self.name}", **conf), failures=failures)

    def loop(self, consumer: Consumer, delivery: Delivery, handler: Handler, *, bisect: bool = True,
             checkpointer: Checkpointer | None = None, group: Consumer | None = None,
             max_deadletter_bytes: int | None = None) -> Loop:
        """The service's consume loop with its settings, health and metrics."""
        s = self.settings
        return Loop(self.name, consumer, delivery, handler, self.stop, self.health,
                    self.loop_metrics,
                    LoopSettings(s.batch_size, s.batch_timeout_s, bisect=bisect,
                                 tune_gc=self._owns_process), checkpointer,
                    max_deadletter_bytes, group)

    def __enter__(self) -> ServiceRuntime:
        self.metrics.start()
        self.log.info("service_started", extra={
            "service": self.name, "metrics": self.metrics.address, "delivery":
            "exactly-once" if self.kafka.exactly_once else "at-least-once",
            "bootstrap_servers": self.kafka.broker.bootstrap_servers, "group_id": self.group_id})
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.log.error("service_failed", exc_info=(exc_type, exc,
                                                       tb),  # type: ignore[arg-type]  # logging's stubs want a live traceback
                           extra={"service": self.name})
        if isinstance(exc, ClientStuck) and self._owns_process:
            # Its clients' threads may never return: exit at once, the supervisor starts it again.
            logging.shutdown()
            os._exit(EXIT_STUCK)
        self.metrics.stop()
        self.log.info("service_stopped", extra={"service": self.name})
