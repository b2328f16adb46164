"""The `kafka` engine: a real Apache Kafka (KRaft, one broker+controller) durable in LOOPLINE_HOME.

Layout of ``$LOOPLINE_HOME/kafka``: ``data/`` (the log dirs, formatted once), ``engine.json``
(cluster id and the ports of the last start), ``server.properties`` (written on every start)
and ``broker.log``. A restart reuses the storage, the cluster id and, when they are still
free, the same ports, so clients that outlived the broker reconnect to the same address.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from loopline.brokers.common import BrokerProcess, Progress, die_with_parent, free_port, port_free
from loopline.brokers.maven import classpath, dist_file, java_binary, kafka_version
from loopline.errors import BrokerError

#: Broker heap: small, because on a 2-core machine it shares memory and CPU with five services.
HEAP_MB = 512

#: What makes a single node work, beside the listeners (see _server_properties).
SINGLE_NODE = {
    # Internal topics default to 3 replicas, which one broker cannot place.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # Fewer partitions than the default 50: the first group join and the first transaction
    # create these topics, and one local broker gains nothing from spreading coordinators.
    "offsets.topic.num.partitions": "10",
    "transaction.state.log.num.partitions": "10",
    # Groups start as soon as the first member joins instead of waiting 3 s for others.
    "group.initial.rebalance.delay.ms": "0",
    # LOOPLINE_SESSION_TIMEOUT_MS may be as low as 1000 (tests use 6000, Kafka's minimum).
    "group.min.session.timeout.ms": "1000",
    "num.partitions": "1",
}


def new_cluster_id() -> str:
    """A KRaft cluster id (a base64url UUID, as `kafka-storage random-uuid` prints)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # One in 64 starts with '-', which kafka-storage's parser takes for an option (Kafka's
        # own Uuid.randomUuid() draws again for the same reason).
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaBroker(BrokerProcess):
    """Run Apache Kafka in KRaft mode as one broker+controller on loopback; a context manager."""

    engine = "kafka"
    # A clean stop flushes and closes every partition; give it time before SIGKILL.
    stop_timeout_s = 30.0

    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 0,
                 ready_timeout_s: float = 120.0, progress: Progress | None = None,
                 heap_mb: int = HEAP_MB) -> None:
        super().__init__(home, host, port, ready_timeout_s, progress)
        # Absolute: the JVM runs in this folder, and server.properties names it.
        self.dir = home.resolve() / "kafka"
        self.heap_mb = heap_mb
        self.cluster_id: str | None = None
        self.controller_port = 0
        self.version = kafka_version()
        self._process: subprocess.Popen[bytes] | None = None
        self._java: str | None = None
        self._lib: Path | None = None
        self._attempt = 0

    @property
    def log_path(self) -> Path:
        """The broker's own log (log4j2 output and anything the JVM prints)."""
        return self.dir / "broker.log"

    @property
    def data_dir(self) -> Path:
        """Kafka's log dir (topics, the metadata log)."""
        return self.dir / "data"

    def _processes(self) -> list[subprocess.Popen[bytes] | None]:
        return [self._process]

    def _forget_processes(self) -> None:
        self._process = None

    def _meta(self) -> dict[str, object]:
        try:
            return json.loads((self.dir / "engine.json").read_text())  # type: ignore[no-any-return]  # JSON is Any
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_meta(self) -> None:
        tmp = self.dir / ".engine.json.tmp"
        tmp.write_text(json.dumps({"cluster_id": self.cluster_id, "port": self.port,
                                   "controller_port": self.controller_port,
                                   "kafka_version": self.version}, indent=2))
        os.replace(tmp, self.dir / "engine.json")

    def _prepare(self) -> None:
        self._java = java_binary()
        self._lib = classpath(self.progress)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._attempt = 0
        formatted = self._formatted_cluster_id()
        if formatted is not None:
            self.cluster_id = formatted
            return
        self.cluster_id = str(self._meta().get("cluster_id") or new_cluster_id())
        self._format()

    def _formatted_cluster_id(self) -> str | None:
        try:
            text = (self.data_dir / "meta.properties").read_text()
        except FileNotFoundError:
            return None
        for line in text.splitlines():
            if line.startswith("cluster.id="):
                return line.split("=", 1)[1].strip()
        raise BrokerError(f"{self.data_dir / 'meta.properties'} names no cluster.id; the storage "
                          f"is damaged: move {self.data_dir} away to start an empty broker")

    def _format(self) -> None:
        assert self._java is not None and self._lib is not None and self.cluster_id is not None
        self.progress(f"formatting KRaft storage in {self.data_dir} (cluster id {self.cluster_id})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The ports in this file do not matter: the one voter is static and read from the
        # config on every start, so nothing formatted here pins an address.
        props = self._write_properties(self.requested_port or free_port(self.host),
                                       free_port(self.host))
        # A short-lived tool: C1 only, a small heap.
        command = [self._java, "-Xmx256m", "-XX:TieredStopAtLevel=1", *self._log4j(),
                   "-cp", f"{self._lib}/*", "kafka.tools.StorageTool", "format",
                   "--cluster-id", self.cluster_id, "--config", str(props)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise BrokerError(f"formatting Kafka storage in {self.data_dir} failed (exit code "
                              f"{out.returncode}):\n{(out.stdout + out.stderr).strip()[-2000:]}")

    def _choose_port(self) -> int:
        self._attempt += 1
        meta = self._meta()
        recorded = int(meta.get("port", 0) or 0)  # type: ignore[call-overload]  # a JSON value
        if self.requested_port:
            port = self.requested_port
        elif self._attempt == 1 and recorded and port_free(self.host, recorded):
            port = recorded  # the same address as last time: clients that outlived it reconnect
        else:
            port = free_port(self.host)
        controller = int(meta.get("controller_port", 0) or 0)  # type: ignore[call-overload]  # a JSON value
        if self._attempt > 1 or not controller or controller == port \
                or not port_free(self.host, controller):
            controller = free_port(self.host)
            while controller == port:
                controller = free_port(self.host)
        self.controller_port = controller
        return port

    def _retryable(self, error: BrokerError) -> bool:
        # Another port helps only if this one was taken between choosing and binding it.
        return not self.requested_port and "Address already in use" in str(error)

    def _log4j(self) -> list[str]:
        return [f"-Dlog4j2.configurationFile={dist_file('log4j2.properties')}"]

    def _server_properties(self, port: int, controller_port: int) -> dict[str, str]:
        listener = f"PLAINTEXT://{self.host}:{port}"
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            # A static voter rather than `format --standalone` (a dynamic quorum records the
            # controller's endpoint in the metadata log, which would pin its port forever).
            "controller.quorum.voters": f"1@{self.host}:{controller_port}",
            "listeners": f"{listener},CONTROLLER://{self.host}:{controller_port}",
            "advertised.listeners": listener,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            **SINGLE_NODE,
        }

    def _write_properties(self, port: int, controller_port: int) -> Path:
        path = self.dir / "server.properties"
        lines = ["# written by loopline on every start of the kafka engine; edits are lost"]
        lines += [f"{k}={v}" for k, v in self._server_properties(port, controller_port).items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, port: int) -> None:
        assert self._java is not None and self._lib is not None
        self.port = port
        props = self._write_properties(port, self.controller_port)
        self._save_meta()
        command = [self._java, f"-Xms{min(128, self.heap_mb)}m", f"-Xmx{self.heap_mb}m",
                   "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                   "-XX:+ExplicitGCInvokesConcurrent", "-XX:+ExitOnOutOfMemoryError",
                   "-Djava.awt.headless=true", *self._log4j(),
                   "-cp", f"{self._lib}/*", "kafka.Kafka", str(props)]
        out = self._output()
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd=self.dir, preexec_fn=die_with_parent,
                                         start_new_session=True)  # Ctrl-C: its owner stops it
        self.progress(f"started Apache Kafka {self.version} (pid {self._process.pid}) on "
                      f"{self.bootstrap_servers}; waiting until it answers")

    def _wait_ready(self) -> None:
        super()._wait_ready()
        self._wait_coordinators()

    def _wait_coordinators(self) -> None:
        """Wait until consumer groups and transactions work, not only metadata.

        The first group or transactional request creates ``__consumer_offsets`` and
        ``__transaction_state`` and the coordinators then load them; meanwhile clients get
        NOT_COORDINATOR, and a consumer that assign()s partitions whose committed offsets it
        could not fetch then waits forever. Doing it here keeps that out of every first client.
        """
        from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

        deadline = time.monotonic() + self.ready_timeout_s
        conf = {"bootstrap.servers": self.bootstrap_servers, "log_level": 3}
        probe = Consumer(dict(conf, **{"group.id": "loopline-broker-ready",
                                       "enable.auto.commit": False}))
        try:
            while True:
                self._check_alive()
                try:
                    # An OffsetFetch: answered only once the group coordinator is loaded.
                    probe.committed([TopicPartition("loopline.broker-ready", 0)], timeout=5)
                    break
                except KafkaException as e:
                    if time.monotonic() > deadline:
                        raise BrokerError(f"the group coordinator of {self.bootstrap_servers} "
                                          f"did not answer within {self.ready_timeout_s:.0f}s: "
                                          f"{e.args[0].str()}") from e
                    time.sleep(0.2)
        finally:
            probe.close()
        producer = Producer(dict(conf, **{"transactional.id": "loopline-broker-ready"}))
        try:
            # Retries NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS itself until the timeout.
            producer.init_transactions(max(1.0, deadline - time.monotonic()))
        except KafkaException as e:
            self._check_alive()
            raise BrokerError(f"the transaction coordinator of {self.bootstrap_servers} did not "
                              f"answer within {self.ready_timeout_s:.0f}s: "
                              f"{e.args[0].str()}") from e

    def _check_alive(self) -> None:
        if not self.running():
            raise BrokerError(self._exited_message())

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self
