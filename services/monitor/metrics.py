"""The monitor's Prometheus metrics, registered on the service's private registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

SEVERITY_VALUE = {"warning": 1.0, "alert": 2.0}


class MonitorMetrics:
    """Gauges and counters the monitor exposes on /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("loopline_monitor_events", "Messages consumed", ["pipeline", "kind"],
                              registry=registry)
        self.psi = Gauge("loopline_monitor_psi",
                         "PSI of the recent window against the reference profile",
                         ["pipeline", "subject", "name", "model"], registry=registry)
        self.detections = Counter("loopline_monitor_detections",
                                  "Early warnings of the online detectors (each "
                                  "one tested against the reference before any alert)",
                                  ["pipeline", "subject", "name", "detector"], registry=registry)
        self.alert_active = Gauge(
            "loopline_monitor_alert_active", "Open alert episode: 0 none, 1 warning, 2 alert",
            ["pipeline", "signal", "name", "detector", "model"], registry=registry)
        self.alerts = Counter("loopline_monitor_alerts", "Alert events sent",
                              ["pipeline", "signal", "state", "severity"], registry=registry)
        self.quality = Gauge("loopline_monitor_quality_rate",
                             "Share of the last window with a problem",
                             ["pipeline", "feature", "kind"], registry=registry)
        self.model_metric = Gauge("loopline_monitor_model_metric",
                                  "Rolling accuracy or MAE from feedback",
                                  ["pipeline", "model", "version", "variant", "metric"],
                                  registry=registry)
        self.labeled = Gauge("loopline_monitor_labeled", "Predictions joined with feedback",
                             ["pipeline", "model", "version", "variant"], registry=registry)
        self.idle = Gauge("loopline_monitor_model_idle_seconds",
                          "Seconds since a deployed version's last prediction",
                          ["pipeline", "model", "version", "stage"], registry=registry)
        self.unread = Gauge("loopline_monitor_model_unread_seconds",
                            "Age of a deployed version's oldest prediction no reader group has "
                            "consumed",
                            ["pipeline", "model", "version", "stage"], registry=registry)
        self.stalled = Gauge("loopline_monitor_stalled",
                             "1 while feature events arrive and no prediction has "
                             "come for spec.monitor.stalled_after_s", ["pipeline"],
                             registry=registry)
        self.zombie = Gauge("loopline_monitor_zombie",
                            "1 if a deployed version has had no traffic or no readers "
                            "too long",
                            ["pipeline", "model", "version", "stage"], registry=registry)

    def on_alert(self, event: dict[str, Any]) -> None:
        """Reflect one alert event in the counters and the open-episode gauge."""
        model = f"{event['model_name']}:{event['model_version']}" if event.get("model_name") else ""
        self.alerts.labels(event["pipeline"], event["signal"], event["state"],
                           event["severity"]).inc()
        value = SEVERITY_VALUE[event["severity"]] if event["state"] == "raised" else 0.0
        self.alert_active.labels(event["pipeline"], event["signal"], event.get("feature") or "",
                                 event.get("detector") or "", model).set(value)
