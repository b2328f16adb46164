"""What every broker engine shares: process helpers, the state file, and finding the broker."""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from loopline.errors import BrokerError, ConfigError
from loopline.settings import LooplineSettings

log = logging.getLogger(__name__)

Engine = Literal["tansu", "kafka"]
ENGINES: tuple[Engine, ...] = ("tansu", "kafka")
STATE_FILE = "broker.json"
#: Held (flock) by the process that owns the broker of a home, from the start of its start().
LOCK_FILE = ".broker.lock"
_PR_SET_PDEATHSIG = 1

#: Receives one line per step of a long start (resolving, formatting, waiting).
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, and whether clients should use the embedded (Tansu) tuning."""

    bootstrap_servers: str
    embedded: bool


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The broker binds with SO_REUSEADDR too, so its own TIME_WAIT sockets do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (use as ``preexec_fn``)."""
    # Runs in the child before exec: the kernel sends SIGTERM to the broker if we die,
    # even by SIGKILL, so a crashed `loopline` never leaves an orphan broker behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed broker whose parent died may linger as a zombie nobody reaps
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def write_state(home: Path, bootstrap_servers: str, pid: int, engine: Engine = "tansu") -> None:
    """Record the running broker in ``home`` (atomically)."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"bootstrap_servers": bootstrap_servers, "pid": pid,
                               "engine": engine, "started_at": time.time()}))
    os.replace(tmp, home / STATE_FILE)


def read_state(home: Path, check_alive: bool = True) -> dict[str, object] | None:
    """Return the recorded broker, or None if there is none (or, with ``check_alive``, it died)."""
    path = home / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if check_alive and not pid_alive(int(state.get("pid", 0))):
        return None
    return state  # type: ignore[no-any-return]  # a JSON document


def state_engine(state: dict[str, object]) -> Engine:
    """The engine a state file names (files written before engines existed are Tansu's)."""
    return "kafka" if state.get("engine") == "kafka" else "tansu"


def dead_broker_message(home: Path, state: dict[str, object]) -> str:
    """Say plainly that the recorded broker is gone, and what went with it."""
    engine = state_engine(state)
    lost = ("nothing is lost: its data is on disk and `loopline broker --engine kafka` "
            "(or `loopline up --engine kafka`) starts it again" if engine == "kafka" else
            "it kept everything in memory, so its topics, the model registry and all their "
            "data are gone")
    return (f"the broker at {state.get('bootstrap_servers')} is unreachable: its process "
            f"(pid {state.get('pid')}, {engine} engine, recorded in {home / STATE_FILE}) "
            f"is not running; {lost}")


def resolve_broker(settings: LooplineSettings) -> BrokerAddress:
    """Find the broker: LOOPLINE_BOOTSTRAP_SERVERS, else the one recorded in LOOPLINE_HOME."""
    if settings.bootstrap_servers:
        return BrokerAddress(settings.bootstrap_servers,
                             embedded=settings.kafka_profile == "embedded")
    state = read_state(settings.home, check_alive=False)
    if state is None:
        raise ConfigError(
            f"no Kafka broker: none is recorded in {settings.home / STATE_FILE} and "
            "LOOPLINE_BOOTSTRAP_SERVERS is not set. Start one with `loopline broker` "
            "(or `loopline up`), or point LOOPLINE_BOOTSTRAP_SERVERS at your cluster."
        )
    if not pid_alive(int(state.get("pid", 0))):  # type: ignore[call-overload]  # a JSON value
        raise BrokerError(dead_broker_message(settings.home, state))
    if settings.kafka_profile == "auto":
        embedded = state_engine(state) == "tansu"
    else:
        embedded = settings.kafka_profile == "embedded"
    return BrokerAddress(str(state["bootstrap_servers"]), embedded=embedded)


class BrokerProcess:
    """A broker engine run as a child process on a loopback port; a context manager.

    Subclasses say how to prepare (``_prepare``), spawn (``_spawn``) and which processes
    make it up (``_processes``); this class refuses a second broker in the same home,
    retries a port someone else took meanwhile, waits until a metadata request answers,
    records the state file and stops everything with SIGTERM, then SIGKILL.
    """

    engine: Engine = "tansu"
    #: How long a clean stop may take before SIGKILL.
    stop_timeout_s = 5.0

    def __init__(self, home: Path | None, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout_s: float = 30.0, progress: Progress | None = None) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.requested_port = port  # 0: any free port (a retry may then pick another one)
        self.ready_timeout_s = ready_timeout_s
        self.progress = progress or (lambda _: None)
        self._log_file: IO[bytes] | None = None
        self._lock: IO[str] | None = None

    # -- what an engine provides -------------------------------------------------------

    def _prepare(self) -> None:
        """Work done once before the first spawn attempt (resolve binaries, format storage)."""

    def _choose_port(self) -> int:
        """The public port of the next attempt."""
        return self.requested_port or free_port(self.host)

    def _retryable(self, error: BrokerError) -> bool:
        """Whether another port may help after ``error`` (only when the port was free to choose)."""
        return True

    def _spawn(self, port: int) -> None:
        raise NotImplementedError

    def _processes(self) -> list[subprocess.Popen[bytes] | None]:
        raise NotImplementedError

    @property
    def log_path(self) -> Path | None:
        """Where the broker's output goes (None: discarded)."""
        return self.home / "broker.log" if self.home is not None else None

    # -- shared behaviour --------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker itself, if it runs."""
        first = self._processes()[0]
        return first.pid if first is not None else None

    @property
    def pids(self) -> list[int]:
        """Process ids of every process that makes up the broker."""
        return [p.pid for p in self._processes() if p is not None]

    def running(self) -> bool:
        """Whether every process of the broker is alive."""
        return all(p is not None and p.poll() is None for p in self._processes())

    def returncode(self) -> int | None:
        """The exit code of the broker process once it has exited."""
        first = self._processes()[0]
        return first.poll() if first is not None else None

    def start(self) -> str:
        """Start the broker, wait until it answers metadata requests, return its address."""
        if self.home is not None and self._lock is None:  # held already: a restart
            self._take_home()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self.bootstrap_servers

    def _take_home(self) -> None:
        assert self.home is not None
        self.home.mkdir(parents=True, exist_ok=True)
        existing = read_state(self.home)
        if existing is not None:
            raise BrokerError(
                f"a {state_engine(existing)} broker already runs at "
                f"{existing['bootstrap_servers']} (pid {existing['pid']}, state file "
                f"{self.home / STATE_FILE}); stop it first"
            )
        # The state file appears only once a broker is ready; the lock also covers its start,
        # so two brokers never share one home (two Kafka JVMs on one log dir corrupt it).
        lock = open(self.home / LOCK_FILE, "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise BrokerError(f"another broker is starting in {self.home} (it holds "
                              f"{self.home / LOCK_FILE}); stop it first") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _release_home(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _start(self) -> None:
        self._prepare()
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            port = self._choose_port()
            try:
                self._open_log()
                self._spawn(port)
                self._wait_ready()
                break
            except BaseException as e:
                self._halt()
                if not isinstance(e, BrokerError) or attempt == attempts - 1 \
                        or not self._retryable(e):
                    raise
                log.warning("broker_start_retry", extra={"port": port, "error": str(e)})
                self.progress(f"port {port} did not work ({e}); trying another")
        if self.home is not None:
            write_state(self.home, self.bootstrap_servers, self.pid or 0, self.engine)
        log.info("broker_ready", extra={"bootstrap_servers": self.bootstrap_servers,
                                        "pid": self.pid, "engine": self.engine})

    def _open_log(self) -> None:
        if self.log_path is not None and self._log_file is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()

    def _output(self) -> IO[bytes] | int:
        """Where a child's stdout and stderr go."""
        return self._log_file if self._log_file is not None else subprocess.DEVNULL

    def _exited_message(self) -> str:
        where = f"see {self.log_path}" if self.log_path else "run it with a home to keep its log"
        tail = log_tail(self.log_path) if self.log_path else ""
        return (f"the {self.engine} broker exited while starting (port {self.port}, exit code "
                f"{self.returncode()}); {where}" + (f"; it ended with:\n{tail}" if tail else ""))

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.ready_timeout_s
        # Wait for the port first: librdkafka logs every refused connection to stderr.
        while True:
            if not self.running():
                raise BrokerError(self._exited_message())
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"the {self.engine} broker did not listen on "
                                      f"{self.bootstrap_servers} within "
                                      f"{self.ready_timeout_s:.0f}s") from None
                time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 3})
        while True:
            if not self.running():
                raise BrokerError(self._exited_message())
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    return
            except Exception as e:  # KafkaException until it answers
                if time.monotonic() > deadline:
                    raise BrokerError(f"the {self.engine} broker at {self.bootstrap_servers} did "
                                      f"not answer a metadata request within "
                                      f"{self.ready_timeout_s:.0f}s") from e
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``) and free its home."""
        self._halt()
        self._release_home()

    def _halt(self) -> None:
        """Stop the processes and drop the state file; the home stays ours (a retry follows)."""
        processes = [p for p in self._processes() if p is not None]
        main = processes[0].pid if processes else None
        self._forget_processes()
        for p in reversed(processes):  # helpers (a proxy) first, the broker last
            if p.poll() is None:
                p.terminate()
        for p in reversed(processes):
            try:
                p.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("broker_kill", extra={"pid": p.pid, "after_s": self.stop_timeout_s})
                p.kill()
                p.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.home is not None and main is not None:
            state = read_state(self.home, check_alive=False)
            if state is not None and state.get("pid") == main:
                (self.home / STATE_FILE).unlink(missing_ok=True)

    def _forget_processes(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if there is none)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16_384))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
