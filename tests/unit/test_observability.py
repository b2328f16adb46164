"""The metrics/health endpoint and the JSON log format."""

from __future__ import annotations

import json
import logging
import socket
import struct
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from loopline.observability import (
    Health,
    JsonFormatter,
    MetricsServer,
    RateCapFilter,
    RebalanceTxnFilter,
    configure_logging,
)


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


def _records(n: int, event: str = "batch_scored",
             level: int = logging.INFO) -> list[logging.LogRecord]:
    return [logging.LogRecord("svc", level, __file__, 1, event, None, None) for _ in range(n)]


def test_info_lines_of_one_kind_are_capped_and_the_next_one_says_how_many_were_left_out() -> None:
    now = [0.0]
    cap = RateCapFilter(burst=3, window_s=60.0, clock=lambda: now[0])
    # 1,000 per-batch lines in one window: a person sees 3 of them, not 1,000.
    assert sum(cap.filter(r) for r in _records(1000)) == 3
    # Another kind has its own budget; warnings and errors always pass.
    assert sum(cap.filter(r) for r in _records(2, "model_loaded")) == 2
    assert all(cap.filter(r) for r in _records(50, level=logging.WARNING))
    now[0] = 61.0
    first, *rest = _records(5)
    assert cap.filter(first) and first.suppressed == 997  # type: ignore[attr-defined]  # set by the code under test
    assert sum(cap.filter(r) for r in rest) == 2
    assert not hasattr(rest[0], "suppressed")


def test_configure_logging_caps_info_lines_per_event(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO", "json")
    try:
        log = logging.getLogger("loopline.test.rate")
        for i in range(500):
            log.info("batch_done", extra={"batch": i})
        log.warning("something_wrong")
    finally:
        root.handlers[:] = [h for h in root.handlers if h.get_name() != "loopline"]
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert sum(line["event"] == "batch_done" for line in lines) <= 10
    assert [line["event"] for line in lines][-1] == "something_wrong"


def test_a_client_hanging_up_early_is_not_a_traceback(capfd: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    server = MetricsServer(CollectorRegistry(), Health()).start()
    try:
        host, port = server.address.removeprefix("http://").split(":")
        for _ in range(20):  # health probes that give up at once: reset before the answer
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
            try:
                raise error
            except OSError:
                server._httpd.handle_error(None, ("127.0.0.1", 1))
        assert get(server.address + "/healthz")[0] == 200  # still serving
        try:
            raise ValueError("a real bug")
        except ValueError:
            server._httpd.handle_error(None, ("127.0.0.1", 1))
    finally:
        server.stop()
    assert capfd.readouterr().err == ""  # socketserver's traceback would be on stderr
    assert [r.getMessage() for r in caplog.records] == ["metrics_request_failed"]


def test_a_transaction_aborted_by_a_rebalance_is_a_warning_other_errors_stay_errors() -> None:
    handled = logging.LogRecord("librdkafka", logging.ERROR, __file__, 1,
                                "TXNERR [p#producer-1] Current transaction failed in state "
                                "InTransaction: t[0](Broker: Specified group generation id is not "
                                "valid) (after 0ms) (ILLEGAL_GENERATION, requires abort)",
                                None, None)
    other = logging.LogRecord("librdkafka", logging.ERROR, __file__, 1,
                              "TXNERR [p#producer-1] Fatal error: PRODUCER_FENCED", None, None)
    f = RebalanceTxnFilter()
    assert f.filter(handled) and f.filter(other)
    assert (handled.levelname, other.levelname) == ("WARNING", "ERROR")
