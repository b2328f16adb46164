"""``loopline up`` / ``loopline down``: the broker and all five services as supervised processes.

``up`` supervises the broker as well as the services: a Kafka-engine broker that dies is
restarted (its data is on disk) and the services reconnect; a Tansu broker that dies took every
topic with it, so ``up`` says so, stops the services and exits with code 3. ``down`` (SIGTERM)
stops ``up`` at any moment, even while it is still starting the broker or waiting for services.
"""

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

from rich.console import Console
from rich.status import Status
from rich.table import Table

from loopline.app.broker_watch import BrokerHandle, BrokerWatch, broker_for
from loopline.brokers import Progress, die_with_parent, free_port, pid_alive
from loopline.errors import LooplineError
from loopline.runtime.service import RESTARTS_ENV, SERVICES
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec

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
        # The service exposes how often it was restarted (loopline_service_restarts).
        env = dict(self.env, **{RESTARTS_ENV: str(self.restarts)})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loopline.app.cli", "run", self.name], env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, preexec_fn=die_with_parent,
            # Its own session: a Ctrl-C at the terminal reaches only the supervisor, which stops
            # the services in order (while the broker still runs) instead of all at once.
            start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def readiness(self) -> tuple[bool, str]:
        """Whether ``/readyz`` answers 200, and why (``down`` or ``starting`` if it cannot say)."""
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
        self.embedded = embedded
        self.phase = "starting services"
        self.services = [
            ServiceProcess(name, port, self._env(port), self.home / "logs" / f"{name}.log")
            for name, port in ((n, free_port()) for n in services)]

    def _env(self, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_METRICS_PORT")}
        profile = self.settings.kafka_profile
        if profile == "auto":  # services get the address, so say which tuning it needs
            profile = "embedded" if self.embedded else "kafka"
        env.update({"LOOPLINE_BOOTSTRAP_SERVERS": self.bootstrap_servers,
                    "LOOPLINE_HOME": str(self.home), "LOOPLINE_KAFKA_PROFILE": profile,
                    "LOOPLINE_METRICS_PORT": str(port)})
        return env

    def start(self) -> None:
        """Start every service and record them."""
        for s in self.services:
            s.start()
        self.write_state()

    def wait_ready(self, timeout_s: float,
                   on_tick: Callable[[list[tuple[str, str]]], None] | None = None,
                   interrupt: Callable[[], bool] | None = None) -> bool:
        """Poll readiness (restarting any that dies) until all are ready or ``timeout_s`` passes.

        ``interrupt`` ends the wait early (returning False) when it returns True.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.supervise_once()
            states = [(s.name, s.health()) for s in self.services]
            if on_tick:
                on_tick(states)
            if all(h == "ok" for _, h in states) or time.monotonic() > deadline:
                return all(h == "ok" for _, h in states)
            if interrupt is not None and interrupt():
                return False
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
                log.warning("service_exited", extra={
                    "service": s.name, "returncode": code, "restart_in_s": s.backoff_s,
                    "log": str(s.log_path)})
            elif now >= s.restart_at:
                s.stop()
                s.restarts += 1
                s.start()
                s.restart_at = 0.0
                s.backoff_s = min(s.backoff_s * 2, _MAX_BACKOFF_S)
                restarted.append(s.name)
        if restarted:
            self.write_state()
        return restarted

    def forgive(self) -> None:
        """Restart services that died without waiting out their backoff (the broker is back)."""
        for s in self.services:
            s.backoff_s = 1.0
            if s.restart_at:
                s.restart_at = time.monotonic()

    def rebase(self, bootstrap_servers: str) -> None:
        """Restart every service against a broker that came back on another address."""
        self.stop()
        self.bootstrap_servers = bootstrap_servers
        for s in self.services:
            s.env = self._env(s.port)
            s.restart_at, s.backoff_s = 0.0, 1.0
            s.start()
        self.write_state()

    def stop(self) -> None:
        """Stop every service (in parallel: SIGTERM all, then wait)."""
        for s in self.services:
            if s.alive() and s.process is not None:
                s.process.terminate()
        for s in self.services:
            s.stop()

    def write_state(self) -> None:
        """Record this run in LOOPLINE_HOME for `loopline down` and `loopline status`."""
        write_up(self.home, self.phase, self.bootstrap_servers,
                 {s.name: {"pid": s.process.pid if s.process else None, "metrics": s.metrics,
                           "log": str(s.log_path)} for s in self.services})


def write_up(home: Path, phase: str, bootstrap_servers: str | None = None,
             services: dict[str, object] | None = None) -> None:
    """Record this `loopline up` in LOOPLINE_HOME (from its first moment, so `down` finds it)."""
    home.mkdir(parents=True, exist_ok=True)
    state = {"pid": os.getpid(), "phase": phase, "bootstrap_servers": bootstrap_servers,
             "services": services or {}}
    tmp = home / f".{UP_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, home / UP_FILE)



def available_services() -> tuple[str, ...]:
    """The services whose code is installed (``loopline.services.<name>.main`` exists)."""
    import importlib.util

    return tuple(n for n in SERVICES
                 if importlib.util.find_spec(f"loopline.services.{n}.main") is not None)


def read_up(home: Path) -> dict[str, object] | None:
    """The running `loopline up`, if any."""
    try:
        state = json.loads((home / UP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state if pid_alive(int(state.get("pid", 0))) else None


class StopRequested(BaseException):  # like KeyboardInterrupt, not an error
    """SIGINT or SIGTERM reached `loopline up`; raised where `up` was, like KeyboardInterrupt."""


class Stopper:
    """SIGINT/SIGTERM handling of `up`: the first signal interrupts whatever `up` is doing.

    Raising (rather than setting a flag the loops poll) is what lets `loopline down` stop `up`
    at any moment: while Maven fetches Kafka, while the broker starts, while services start.
    Cleanup code calls :meth:`disarm` first, so a second signal cannot cut it short.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._armed = True
        self._cleaning_up = False

    def install(self) -> None:
        """Route SIGINT and SIGTERM to this stopper."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def disarm(self) -> None:
        """From now on a signal only records the request (cleanup is under way)."""
        self._armed = False
        self._cleaning_up = True

    def check(self) -> None:
        """Raise :class:`StopRequested` if a stop was requested and nothing is cleaning up yet.

        The handler's exception can be lost: raised while Python runs code whose exceptions it
        ignores (a finalizer, a logging lock's release at exit), it is printed and dropped. So
        `up` also checks between its steps.
        """
        if self.signal_name is not None and not self._cleaning_up:
            raise StopRequested(self.signal_name)

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal_name = signal.Signals(signum).name
        if self._armed:
            self._armed = False
            raise StopRequested(self.signal_name)


def down(settings: LooplineSettings, timeout_s: float = 120.0) -> int:
    """Stop a running `loopline up` (SIGTERM to its supervisor); return its pid."""
    state = read_up(settings.home)
    if state is None:
        raise LooplineError(f"no running `loopline up` is recorded in {settings.home / UP_FILE}")
    pid = int(state["pid"])  # type: ignore[call-overload]  # a JSON value
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise LooplineError(f"`loopline up` (pid {pid}) did not stop within {timeout_s:.0f}s")
        time.sleep(0.2)
    return pid


def run_up(settings: LooplineSettings, names: tuple[str, ...], specs: list[PipelineSpec],
           console: Console) -> int:
    """Start the broker (unless one is configured or running), apply ``specs``, run ``names``.

    Returns the exit code: 0 after a stop request, 3 when the broker was lost for good.
    """
    home = settings.home.resolve()
    stopper = Stopper()
    stopper.install()
    write_up(home, f"starting the {settings.engine} broker")
    supervisor: Supervisor | None = None
    try:
        with contextlib.ExitStack() as stack:
            with console.status("starting the broker...") as status:
                handle = stack.enter_context(broker_for(settings, progress_to(console, status)))
            try:
                stopper.check()
                _apply(settings, handle, specs, console)
                stopper.check()
                supervisor = Supervisor(settings, handle.bootstrap_servers, handle.embedded, names)
                supervisor.start()
                watch = BrokerWatch(handle, home,
                                    lambda line: console.print(line, style="bold red"))

                def interrupt() -> bool:
                    stopper.check()
                    return not watch.alive()

                with console.status("starting services...") as status:
                    ready = supervisor.wait_ready(120, lambda states: status.update(
                        "starting services: " + ", ".join(f"{n} {h}" for n, h in states)),
                        interrupt=interrupt)
                stopper.check()
                _print_services(console, supervisor, ready)
                supervisor.phase = "running"
                supervisor.write_state()
                while True:
                    stopper.check()
                    code = watch.check(supervisor)
                    if code is not None:
                        return code
                    for name in supervisor.supervise_once():
                        console.print(f"restarted {name} (it had exited; see its log)")
                    time.sleep(1.0)
            finally:
                stopper.disarm()
                if supervisor is not None:
                    supervisor.stop()
                    console.print("all services stopped")
                if handle.owned is not None:
                    kept = (f" (its data stays in {home / 'kafka'})"
                            if handle.engine == "kafka" else "")
                    console.print(f"stopping the broker{kept}")
    except StopRequested as e:
        console.print(f"stopped by {e}")
        return 0
    finally:
        stopper.disarm()
        (home / UP_FILE).unlink(missing_ok=True)


def progress_to(console: Console, status: Status) -> Progress:
    """A progress callback: print each line (dim) and show it beside the spinner."""
    def say(line: str) -> None:
        console.print(line, style="dim")
        status.update(line)

    return say


def _apply(settings: LooplineSettings, handle: BrokerHandle, specs: list[PipelineSpec],
           console: Console) -> None:
    from loopline.apply import apply_spec, ensure_global_topics
    from loopline.brokers import BrokerAddress
    from loopline.kafka import KafkaConfig

    console.print(f"broker: {handle.describe()}")
    write_up(settings.home.resolve(), "applying pipelines", handle.bootstrap_servers)
    kafka = KafkaConfig(settings, BrokerAddress(handle.bootstrap_servers, handle.embedded))
    ensure_global_topics(kafka)
    for spec in specs:
        apply_spec(kafka, spec)
        console.print(f"pipeline {spec.name} applied")


def _print_services(console: Console, supervisor: Supervisor, ready: bool) -> None:
    table = Table("service", "pid", "metrics and health", "state", title="loopline is up" if ready
                  else "loopline is up, but not every service is ready")
    for s in supervisor.services:
        table.add_row(s.name, str(s.process.pid if s.process else "-"),
                      f"{s.metrics}/metrics  {s.metrics}/readyz", s.health())
    console.print(table)
    console.print(f"logs: {supervisor.home / 'logs'}; Ctrl-C or `loopline down` stops everything")
