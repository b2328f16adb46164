"""How `loopline up` finds its broker and watches it: restarts a Kafka one, not a Tansu one."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loopline.brokers import (
    BrokerProcess,
    Engine,
    Progress,
    make_broker,
    pid_alive,
    read_state,
    resolve_broker,
    state_engine,
)
from loopline.errors import BrokerError
from loopline.settings import LooplineSettings

if TYPE_CHECKING:
    from loopline.app.up import Supervisor


@dataclass
class BrokerHandle:
    """The broker `up` runs against: one it started, one recorded in LOOPLINE_HOME, or a cluster."""

    bootstrap_servers: str
    embedded: bool
    engine: Engine | None  # None: an external cluster (LOOPLINE_BOOTSTRAP_SERVERS)
    owned: BrokerProcess | None = None
    pid: int | None = None

    def describe(self) -> str:
        """One line for the user."""
        if self.engine is None:
            return f"{self.bootstrap_servers} (external cluster)"
        who = "started by this `loopline up`" if self.owned else "started by `loopline broker`"
        return f"{self.bootstrap_servers} ({self.engine} engine, pid {self.pid}, {who})"


@contextlib.contextmanager
def broker_for(settings: LooplineSettings, progress: Progress | None = None
               ) -> Iterator[BrokerHandle]:
    """Yield the broker: an external cluster, a running recorded one, or a new one we own."""
    if settings.bootstrap_servers:
        address = resolve_broker(settings)
        yield BrokerHandle(address.bootstrap_servers, address.embedded, None)
        return
    state = read_state(settings.home)
    if state is not None:
        address = resolve_broker(settings)
        yield BrokerHandle(address.bootstrap_servers, address.embedded, state_engine(state),
                           pid=int(state["pid"]))  # type: ignore[call-overload]  # a JSON value
        return
    embedded = (settings.engine == "tansu" if settings.kafka_profile == "auto"
                else settings.kafka_profile == "embedded")
    with make_broker(settings.engine, settings.home, progress=progress) as broker:
        yield BrokerHandle(broker.bootstrap_servers, embedded, settings.engine, owned=broker,
                           pid=broker.pid)


class BrokerWatch:
    """Notices when the broker `up` runs against dies, and brings a Kafka-engine one back."""

    #: A broker that dies this often within ``_DEATH_WINDOW_S`` is not restarted again.
    MAX_DEATHS = 3
    _DEATH_WINDOW_S = 600.0

    def __init__(self, handle: BrokerHandle, home: Path, say: Callable[[str], None]) -> None:
        self.handle = handle
        self.home = home
        self.say = say
        self.deaths: list[float] = []
        self.down_since: float | None = None

    def alive(self) -> bool:
        """Whether the broker runs (an external cluster is not ours to watch: always True)."""
        if self.handle.engine is None:
            return True
        if self.handle.owned is not None:
            return self.handle.owned.running()
        return pid_alive(self.handle.pid or 0)

    def check(self, supervisor: Supervisor) -> int | None:
        """Handle a dead broker; return an exit code if `up` must end (None: carry on)."""
        if self.alive():
            return None
        h = self.handle
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.say(self._death_line())
        if h.engine == "tansu":
            self.say("It kept everything in memory: every topic, the model registry "
                     "(loopline.models) and all their messages are lost, and the services cannot "
                     "go on without them. Stopping the services. `loopline up` starts a fresh, "
                     "empty stack (apply your pipelines and register your models again); "
                     "`--engine kafka` runs a broker that keeps its data.")
            return 3
        if h.owned is None:
            return self._wait_for_restart(supervisor)
        return self._restart(h.owned, supervisor)

    def _death_line(self) -> str:
        h = self.handle
        code = h.owned.returncode() if h.owned is not None else None
        log = h.owned.log_path if h.owned is not None else None
        how = f"exit code {code}" if code is not None else "its process is gone"
        return (f"the {h.engine} broker at {h.bootstrap_servers} (pid {h.pid}) died ({how}"
                + (f"; see {log}" if log else "") + ").")

    def _restart(self, broker: BrokerProcess, supervisor: Supervisor) -> int | None:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < self._DEATH_WINDOW_S] + [now]
        if len(self.deaths) > self.MAX_DEATHS:
            self.say(f"It died {len(self.deaths)} times in {self._DEATH_WINDOW_S / 60:.0f} "
                     "minutes; not restarting it again. Its data is safe in "
                     f"{self.home / 'kafka'}; stopping the services.")
            return 3
        self.say(f"Nothing is lost: its data is on disk in {self.home / 'kafka'}. Restarting it...")
        try:
            address = broker.start()
        except BrokerError as e:
            self.say(f"could not restart the broker: {e}. Stopping the services.")
            return 3
        self._back(address, broker.pid, supervisor)
        return None

    def _wait_for_restart(self, supervisor: Supervisor) -> int | None:
        # Not ours to restart: say it once, then wait for `loopline broker` to be run again.
        if self.handle.pid is not None:
            self.say("Nothing is lost: its data is on disk. Start it again with `loopline broker "
                     "--engine kafka`; the services reconnect when it is back.")
            self.handle.pid = None
        state = read_state(self.home)
        if state is not None:
            self._back(str(state["bootstrap_servers"]), int(state["pid"]), supervisor)  # type: ignore[call-overload]  # a JSON value
        return None

    def _back(self, address: str, pid: int | None, supervisor: Supervisor) -> None:
        moved = address != self.handle.bootstrap_servers
        self.handle.bootstrap_servers, self.handle.pid = address, pid
        self.down_since = None
        if moved:
            self.say(f"the broker is back at {address} (pid {pid}), a new address: restarting "
                     "the services against it")
            supervisor.rebase(address)
        else:
            self.say(f"the broker is back at {address} (pid {pid}); the services reconnect")
            supervisor.forgive()
