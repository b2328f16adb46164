"""`loopline up` supervises the services and the broker; `loopline down` stops it at any moment;
`loopline status` says plainly when the broker is gone."""

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
from confluent_kafka.admin import AdminClient

from loopline.app.up import down as stop_up
from loopline.brokers import Engine, pid_alive, write_state
from loopline.settings import LooplineSettings

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "loopline.app.cli"]


def wait_for(condition, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:  # type: ignore[no-untyped-def]  # any predicate
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(poll_s)


def read_json(path: Path) -> dict:  # type: ignore[type-arg]  # any records
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]  # JSON is Any
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def ready(state: dict) -> bool:  # type: ignore[type-arg]  # any records
    try:
        url = state["services"]["lineage"]["metrics"] + "/readyz"
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (OSError, KeyError):
        return False


def cli_env(home: Path, engine: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env.update(LOOPLINE_HOME=str(home), LOOPLINE_SESSION_TIMEOUT_MS="6000")
    if engine is not None:
        env["LOOPLINE_ENGINE"] = engine
    return env


def start_up(home: Path, engine: str) -> subprocess.Popen[bytes]:
    with (home / "up.out").open("w") as out:
        return subprocess.Popen([*CLI, "up", "--services", "lineage"], env=cli_env(home, engine),
                                stdout=out, stderr=subprocess.STDOUT)


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [g for c in children for g in descendants(c)]


def run_down(home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "down"], env=cli_env(home), capture_output=True, text=True,
                          timeout=180)


def test_up_restarts_a_killed_service_and_down_stops_everything(tmp_path: Path,
                                                                 engine: Engine) -> None:
    up = start_up(tmp_path, engine)
    state_file = tmp_path / "up.json"
    try:
        wait_for(lambda: ready(read_json(state_file)))
        first = read_json(state_file)["services"]["lineage"]["pid"]
        broker = read_json(tmp_path / "broker.json")
        assert broker["engine"] == engine
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: read_json(state_file)["services"]["lineage"]["pid"] != first)
        second = read_json(state_file)["services"]["lineage"]["pid"]
        assert pid_alive(second)

        down = run_down(tmp_path)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
        assert "all services stopped" in (tmp_path / "up.out").read_text()
    finally:
        up.kill()
        up.wait()
    assert not pid_alive(second) and not pid_alive(broker["pid"])
    assert not state_file.exists() and not (tmp_path / "broker.json").exists()


@pytest.mark.parametrize("phase", ["starting the", "starting services"])
def test_down_stops_up_while_it_is_still_starting(tmp_path: Path, engine: Engine,
                                                  phase: str) -> None:
    # "starting the <engine> broker" is written before anything starts; "starting services"
    # while `up` waits for their readiness (it used to ignore stop requests there for 120 s).
    up = start_up(tmp_path, engine)
    state_file = tmp_path / "up.json"
    try:
        wait_for(lambda: read_json(state_file).get("phase", "").startswith(phase), poll_s=0.005)
        children = descendants(up.pid)
        # What `loopline down` runs, called here: the CLI's start-up (a second) would let `up`
        # finish starting first on a quiet machine (that path has its own test above).
        stop_up(LooplineSettings(home=tmp_path))
        assert up.wait(timeout=30) == 0
    finally:
        up.kill()
        up.wait()
    out = (tmp_path / "up.out").read_text()
    assert "stopped by SIGTERM" in out and "loopline is up" not in out
    deadline = time.monotonic() + 30
    while [p for p in children if pid_alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if pid_alive(p)]
    assert not state_file.exists() and not (tmp_path / "broker.json").exists()


def test_up_restarts_its_kafka_broker_and_nothing_is_lost(tmp_path: Path) -> None:
    up = start_up(tmp_path, "kafka")
    state_file = tmp_path / "up.json"
    try:
        wait_for(lambda: ready(read_json(state_file)))
        broker = read_json(tmp_path / "broker.json")
        address, pid = broker["bootstrap_servers"], broker["pid"]
        applied = subprocess.run([*CLI, "apply", "examples/sea.yaml"], env=cli_env(tmp_path),
                                 capture_output=True, text=True, timeout=120)
        assert applied.returncode == 0, applied.stderr

        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: read_json(tmp_path / "broker.json").get("pid") not in (None, pid))
        assert up.poll() is None
        out = (tmp_path / "up.out").read_text()
        assert f"the kafka broker at {address} (pid {pid}) died" in out
        assert "Nothing is lost" in out and f"the broker is back at {address}" in out
        assert read_json(tmp_path / "broker.json")["bootstrap_servers"] == address
        topics = AdminClient({"bootstrap.servers": address}).list_topics(timeout=30).topics
        assert "loopline.sea.features" in topics  # created before the crash
        wait_for(lambda: ready(read_json(state_file)))  # the service works with it again
        status = subprocess.run([*CLI, "status", "sea"], env=cli_env(tmp_path),
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr  # the registry survived as well
        assert "pipeline sea" in status.stdout

        down = run_down(tmp_path)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=30) == 0
    finally:
        up.kill()
        up.wait()


def test_up_exits_3_when_its_tansu_broker_dies_and_says_what_was_lost(tmp_path: Path) -> None:
    up = start_up(tmp_path, "tansu")
    state_file = tmp_path / "up.json"
    try:
        wait_for(lambda: ready(read_json(state_file)))
        service = read_json(state_file)["services"]["lineage"]["pid"]
        os.kill(read_json(tmp_path / "broker.json")["pid"], signal.SIGKILL)
        assert up.wait(timeout=60) == 3
    finally:
        up.kill()
        up.wait()
    out = (tmp_path / "up.out").read_text()
    assert "died" in out and "the model registry" in out and "lost" in out
    assert "all services stopped" in out
    assert not pid_alive(service)
    assert not state_file.exists() and not (tmp_path / "broker.json").exists()


def test_status_says_the_broker_is_unreachable_without_a_traceback(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])  # a pid that no longer runs
    dead.wait()
    write_state(tmp_path, "127.0.0.1:9", dead.pid, "tansu")
    status = subprocess.run([*CLI, "status"], env=cli_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 2
    assert "the broker at 127.0.0.1:9 is unreachable" in status.stderr
    assert "Traceback" not in status.stderr + status.stdout
    assert "loopline up" not in status.stderr  # not advice to start a second stack

    # A recorded process that runs but does not answer (this test's own pid, a closed port).
    write_state(tmp_path, "127.0.0.1:9", os.getpid(), "kafka")
    status = subprocess.run([*CLI, "status"], env=cli_env(tmp_path), capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 2
    assert "the broker at 127.0.0.1:9 is unreachable" in status.stderr
    assert "Traceback" not in status.stderr + status.stdout
