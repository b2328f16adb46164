"""`loopline up` supervises services: readiness, restart after a crash, `loopline down` stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from loopline.broker import pid_alive

pytestmark = pytest.mark.integration


def wait_for(condition, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.2)


def ready(state: dict) -> bool:  # type: ignore[type-arg]
    try:
        url = state["services"]["lineage"]["metrics"] + "/readyz"
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_up_restarts_a_killed_service_and_down_stops_everything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env.update(LOOPLINE_HOME=str(tmp_path), LOOPLINE_SESSION_TIMEOUT_MS="6000")
    log = tmp_path / "up.out"
    with log.open("w") as out:
        up = subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "up", "--services", "lineage"], env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    state_file = tmp_path / "up.json"
    try:
        wait_for(lambda: state_file.exists() and ready(json.loads(state_file.read_text())))
        state = json.loads(state_file.read_text())
        first = state["services"]["lineage"]["pid"]
        broker = json.loads((tmp_path / "broker.json").read_text())["pid"]
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: json.loads(state_file.read_text())["services"]["lineage"]["pid"] != first)
        second = json.loads(state_file.read_text())["services"]["lineage"]["pid"]
        assert pid_alive(second)

        down = subprocess.run([sys.executable, "-m", "loopline.app.cli", "down"], env=env, capture_output=True,
                              text=True, timeout=90)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        assert "all services stopped" in log.read_text()
    finally:
        up.kill()
        up.wait()
    assert not pid_alive(second) and not pid_alive(broker)
    assert not state_file.exists() and not (tmp_path / "broker.json").exists()
