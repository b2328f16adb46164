"""ServiceRuntime: metrics/health server up for the service's lifetime, stop flag on SIGTERM."""

from __future__ import annotations

import os
import signal
import urllib.request

from loopline.runtime.service import ServiceRuntime
from loopline.settings import ServiceSettings


def test_runtime_serves_metrics_and_stops_on_sigterm() -> None:
    settings = ServiceSettings(bootstrap_servers="127.0.0.1:1", log_format="console")
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with ServiceRuntime("ingest", settings) as rt:
            assert rt.group_id == "loopline-ingest"
            with urllib.request.urlopen(rt.metrics.address + "/metrics", timeout=5) as r:
                assert 'loopline_service_up{service="ingest"} 1.0' in r.read().decode()
            assert not rt.stop.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            assert rt.stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
