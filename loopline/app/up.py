"""``loopline up`` / ``loopline down``: the broker and all five services as supervised processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from loopline.broker import EmbeddedBroker, die_with_parent, free_port, pid_alive, read_state, resolve_broker
from loopline.errors import LooplineError
from loopline.kafka import StopFlag
from loopline.runtime.service import SERVICES
from loopline.settings import LooplineSettings

log = logging.getLogger(__name__)

UP_FILE = "up.json"
_MAX_BACKOFF_S = 30.0


@dataclass
class ServiceProcess:
    """One supervised service process and how to restart it."""

    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    restart_at: float = 0.0
    started_at: float = 0.0
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def metrics(self) -> str:
        """Metrics/health base address."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Spawn ``loopline run <name>`` with its log appended to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loopline.app.cli", "run", self.name], env=self.env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, preexec_fn=die_with_parent)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def readiness(self) -> tuple[bool, str]:
        """Whether ``/readyz`` answers 200, and its reason (``down`` or ``starting`` when it cannot say)."""
        if not self.alive():
            return False, "down"
        try:
            with urllib.request.urlopen(self.metrics + "/readyz", timeout=1) as r:
                return True, str(json.loads(r.read()).get("reason", "ready"))
        except urllib.error.HTTPError as e:
            return False, str(json.loads(e.read() or b"{}").get("reason", f"HTTP {e.code}"))
        except (OSError, ValueError):
            return False, "starting"

    def health(self) -> str:
        """``ok``, or why the service is not ready."""
        ready, reason = self.readiness()
        return "ok" if ready else reason

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


class Supervisor:
    """Starts the services, restarts any that dies (with backoff), stops them all on request."""

    def __init__(self, settings: LooplineSettings, bootstrap_servers: str, embedded: bool,
                 services: tuple[str, ...] = SERVICES) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.home = settings.home.resolve()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_METRICS_PORT")}
        env.update({"LOOPLINE_BOOTSTRAP_SERVERS": bootstrap_servers, "LOOPLINE_HOME": str(self.home),
                    "LOOPLINE_KAFKA_PROFILE": "embedded" if embedded else settings.kafka_profile})
        self.services = [
            ServiceProcess(name, port, dict(env, LOOPLINE_METRICS_PORT=str(port)), self.home / "logs" / f"{name}.log")
            for name, port in ((n, free_port()) for n in services)]

    def start(self) -> None:
        """Start every service and record them."""
        for s in self.services:
            s.start()
        self.write_state()

    def wait_ready(self, timeout_s: float,
                   on_tick: Callable[[list[tuple[str, str]]], None] | None = None) -> bool:
        """Poll readiness (restarting any that dies) until all are ready or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.supervise_once()
            states = [(s.name, s.health()) for s in self.services]
            if on_tick:
                on_tick(states)
            if all(h == "ok" for _, h in states) or time.monotonic() > deadline:
                return all(h == "ok" for _, h in states)
            time.sleep(0.3)

    def supervise_once(self) -> list[str]:
        """Restart services that died (after their backoff); return the names restarted now."""
        restarted = []
        now = time.monotonic()
        for s in self.services:
            if s.alive():
                if now - s.started_at > 60:
                    s.backoff_s = 1.0  # a minute of uptime forgives earlier crashes
                continue
            if s.restart_at == 0.0:
                code = s.process.returncode if s.process else None
                s.restart_at = now + s.backoff_s
                log.warning("service_exited", extra={"service": s.name, "returncode": code,
                                                     "restart_in_s": s.backoff_s, "log": str(s.log_path)})
            elif now >= s.restart_at:
                s.stop()
                s.start()
                s.restarts += 1
                s.restart_at = 0.0
                s.backoff_s = min(s.backoff_s * 2, _MAX_BACKOFF_S)
                restarted.append(s.name)
        if restarted:
            self.write_state()
        return restarted

    def stop(self) -> None:
        """Stop every service (in parallel: SIGTERM all, then wait)."""
        for s in self.services:
            if s.alive() and s.process is not None:
                s.process.terminate()
        for s in self.services:
            s.stop()

    def write_state(self) -> None:
        """Record this run in LOOPLINE_HOME for `loopline down` and `loopline status`."""
        state = {"pid": os.getpid(), "bootstrap_servers": self.bootstrap_servers,
                 "services": {s.name: {"pid": s.process.pid if s.process else None, "metrics": s.metrics,
                                       "log": str(s.log_path)} for s in self.services}}
        tmp = self.home / f".{UP_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.home / UP_FILE)


def available_services() -> tuple[str, ...]:
    """The services whose code is installed (``loopline.services.<name>.main`` exists)."""
    import importlib.util

    return tuple(n for n in SERVICES if importlib.util.find_spec(f"loopline.services.{n}.main") is not None)


def read_up(home: Path) -> dict[str, object] | None:
    """The running `loopline up`, if any."""
    try:
        state = json.loads((home / UP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if pid_alive(int(state.get("pid", 0))) else None  # type: ignore[no-any-return]


@contextlib.contextmanager
def broker_for(settings: LooplineSettings):  # type: ignore[no-untyped-def]
    """Yield (bootstrap, embedded): an external cluster, a running embedded broker, or a new one."""
    if settings.bootstrap_servers or read_state(settings.home) is not None:
        address = resolve_broker(settings)
        yield address.bootstrap_servers, address.embedded
        return
    with EmbeddedBroker(home=settings.home) as broker:
        yield broker.bootstrap_servers, True


def down(settings: LooplineSettings, timeout_s: float = 60.0) -> int:
    """Stop a running `loopline up` (SIGTERM to its supervisor); return its pid."""
    state = read_up(settings.home)
    if state is None:
        raise LooplineError(f"no running `loopline up` is recorded in {settings.home / UP_FILE}")
    pid = int(state["pid"])  # type: ignore[arg-type]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise LooplineError(f"`loopline up` (pid {pid}) did not stop within {timeout_s:.0f}s")
        time.sleep(0.2)
    return pid


def install_stop(stop: StopFlag) -> None:
    """Route SIGINT and SIGTERM to ``stop``."""
    signal.signal(signal.SIGINT, stop.set)
    signal.signal(signal.SIGTERM, stop.set)
