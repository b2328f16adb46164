"""The metrics/health endpoint and the JSON log format."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from loopline.observability import Health, JsonFormatter, MetricsServer


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_health_and_readiness() -> None:
    registry = CollectorRegistry()
    Counter("loopline_test_events", "events", ["pipeline"], registry=registry).labels("p").inc(3)
    health = Health(stale_after_s=60)
    server = MetricsServer(registry, health).start()
    try:
        status, body = get(server.address + "/metrics")
        assert status == 200 and 'loopline_test_events_total{pipeline="p"} 3.0' in body
        assert get(server.address + "/healthz")[0] == 200
        status, body = get(server.address + "/readyz")
        assert status == 503 and json.loads(body)["reason"] == "starting"
        health.set_ready(True)
        assert get(server.address + "/readyz")[0] == 200
        health.stale_after_s = 0.0
        status, body = get(server.address + "/healthz")
        assert status == 503 and "silent" in json.loads(body)["reason"]
        assert get(server.address + "/nope")[0] == 404
    finally:
        server.stop()


def test_readiness_waits_for_the_group_assignment() -> None:
    health = Health()
    health.set_ready(True, "serving")
    assert health.ready() == (True, "serving")
    health.expect_assignment()
    assert health.ready() == (False, "joining the consumer group")
    health.assigned(object(), [])  # the on_assign callback, even with no partitions for this member
    assert health.ready() == (True, "serving")


def test_json_log_line_carries_extras() -> None:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "batch_done", None, None)
    record.pipeline = "fraud"
    record.count = 7
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["event"] == "batch_done" and out["pipeline"] == "fraud" and out["count"] == 7
    assert out["level"] == "info"
