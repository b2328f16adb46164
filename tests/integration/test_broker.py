"""The broker engines: context manager, `loopline broker` command, clean stop, older clients,
one broker per home, and the kafka engine's durability and transactions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from loopline.brokers import ENGINES, STATE_FILE, KafkaBroker, TansuBroker, read_state
from loopline.compat_proxy import _read_uvarint

pytestmark = pytest.mark.integration

#: Processes that make up a running broker: Tansu and its compatibility proxy; Kafka's JVM.
HELPERS = {"tansu": 2, "kafka": 1}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_dead(pids: list[int], timeout_s: float = 60.0) -> list[int]:
    """Wait for ``pids`` to exit; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def test_context_manager_writes_state_and_cleans_up(tmp_path: Path) -> None:
    with TansuBroker(home=tmp_path) as broker:
        state = read_state(tmp_path)
        assert state is not None and state["bootstrap_servers"] == broker.bootstrap_servers
        assert state["engine"] == "tansu"
        md = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
        assert md.brokers
        pids = broker.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        with pytest.raises(Exception, match="already runs"):
            TansuBroker(home=tmp_path).start()
    assert not (tmp_path / STATE_FILE).exists()
    assert not [p for p in pids if alive(p)]


def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_")}
    env["LOOPLINE_HOME"] = str(home)
    return env


def spawn_cli(home: Path, engine: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "broker",
                             "--engine", engine], env=cli_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_address(proc: subprocess.Popen[str]) -> str:
    """Read the CLI's output up to its ready line (progress lines may come first)."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "broker ready at" in line:
            return line.split("ready at ")[1].split()[0]
    raise AssertionError("".join(seen) + (proc.stderr.read() if proc.stderr else ""))


def start_cli(home: Path, engine: str = "tansu") -> tuple[subprocess.Popen[str], str]:
    proc = spawn_cli(home, engine)
    return proc, read_address(proc)


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_prints_address_records_it_and_stops_on_sigterm(tmp_path: Path, engine: str) -> None:
    proc, address = start_cli(tmp_path, engine)
    helpers: list[int] = []
    try:
        state = json.loads((tmp_path / STATE_FILE).read_text())
        assert state["bootstrap_servers"] == address and state["engine"] == engine
        md = AdminClient({"bootstrap.servers": address}).list_topics(timeout=10)
        assert {"loopline.models", "loopline.alerts"} <= set(md.topics)
        helpers = children_of(proc.pid)
        assert len(helpers) == HELPERS[engine]
        # A second broker in the same home refuses, whatever its engine.
        for other in ENGINES:
            second = subprocess.run([sys.executable, "-m", "loopline.app.cli", "broker",
                                     "--engine", other], env=cli_env(tmp_path),
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"a {engine} broker already runs at {address}" in second.stderr
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "broker stopped" in out
    finally:
        proc.kill()
        proc.communicate()
    assert not wait_dead(helpers, timeout_s=5)  # stop() waited for them already
    assert not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_two_brokers_started_together_in_one_home_one_refuses(tmp_path: Path, engine: str) -> None:
    # Started at the same moment, neither has written its state file yet: the home's lock
    # decides. (Two Kafka JVMs on one log dir would corrupt the metadata log.)
    first, second = spawn_cli(tmp_path, engine), spawn_cli(tmp_path, engine)
    try:
        # Wait for the first to stop (on a busy machine reaching the lock takes seconds), then a
        # moment more: the other one must keep running.
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in (first, second)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        codes = [first.poll(), second.poll()]
        running = [p for p, c in zip((first, second), codes, strict=True) if c is None]
        refused = [p for p, c in zip((first, second), codes, strict=True) if c is not None]
        assert len(running) == 1 and len(refused) == 1, codes
        assert refused[0].returncode == 2
        assert refused[0].stderr is not None
        assert "stop it first" in refused[0].stderr.read()
        address = read_address(running[0])
        assert AdminClient({"bootstrap.servers": address}).list_topics(timeout=10).brokers
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (first, second):
            proc.communicate(timeout=60)


@pytest.mark.parametrize("engine", ENGINES)
def test_no_orphan_even_when_the_cli_is_killed(tmp_path: Path, engine: str) -> None:
    proc, _ = start_cli(tmp_path, engine)
    helpers = children_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=5)
    assert not wait_dead(helpers)
    assert read_state(tmp_path) is None  # the dead pid is not trusted


def produce_transactionally(address: str, topic: str, values: list[bytes], commit: bool) -> None:
    producer = Producer({"bootstrap.servers": address, "transactional.id": f"{topic}-{commit}"})
    producer.init_transactions(60)
    producer.begin_transaction()
    for v in values:
        producer.produce(topic, v)
    if commit:
        producer.commit_transaction(60)
    else:
        producer.abort_transaction(60)


def read_committed(address: str, topic: str, group: str) -> list[bytes]:
    """Every committed message of ``topic`` that ``group`` has not consumed yet (and commit)."""
    consumer = Consumer({"bootstrap.servers": address, "group.id": group,
                         "isolation.level": "read_committed", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    consumer.assign([TopicPartition(topic, 0)])
    try:
        values = []
        while True:
            m = consumer.poll(30)
            assert m is not None, "no end of partition within 30 s"
            if m.error() is not None:
                break  # partition EOF: the end of what is committed
            values.append(m.value())
        if values:
            consumer.commit(asynchronous=False)
        return values
    finally:
        consumer.close()


def test_kafka_engine_transactions_and_data_survive_a_restart(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path)
    address = broker.start()
    try:
        pid, cluster_id = broker.pid, broker.cluster_id
        topic = "durable"
        admin = AdminClient({"bootstrap.servers": address})  # must outlive its future
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(60)
        produce_transactionally(address, topic, [b"a", b"b"], commit=True)
        produce_transactionally(address, topic, [b"lost"], commit=False)
        produce_transactionally(address, topic, [b"c"], commit=True)
        assert read_committed(address, topic, "g1") == [b"a", b"b", b"c"]
        produce_transactionally(address, topic, [b"d"], commit=True)
    finally:
        broker.stop()
    assert not alive(pid or 0) and read_state(tmp_path) is None

    again = KafkaBroker(tmp_path)
    assert again.start() == address  # the same address while its port stays free
    try:
        assert again.cluster_id == cluster_id
        md = AdminClient({"bootstrap.servers": address}).list_topics(timeout=10)
        assert md.cluster_id == cluster_id and topic in md.topics
        # The committed offset of g1 survived too: only what came after it is new.
        assert read_committed(address, topic, "g1") == [b"d"]
        assert read_committed(address, topic, "g2") == [b"a", b"b", b"c", b"d"]
    finally:
        again.stop()
    assert json.loads((tmp_path / "kafka" / "engine.json").read_text())["cluster_id"] == cluster_id


def api_versions_v3(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        header = struct.pack(">hhih", 18, 3, 1, 4) + b"test" + b"\x00"
        body = header + b"\x05kcat\x061.7.1\x00"
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        return s.recv(size, socket.MSG_WAITALL)


def test_apiversions_through_the_proxy_has_no_default_tags() -> None:
    # Tansu's own broker (whatever the session's engine): the proxy belongs to it.
    with TansuBroker() as broker:
        body = api_versions_v3(broker.bootstrap_servers)
    pos = 6
    count, pos = _read_uvarint(body, pos)
    pos += (count - 1) * 7 + 4
    assert body[pos:] == b"\x00"  # no tagged fields: librdkafka < 2.2 parses it


@pytest.mark.skipif(shutil.which("kcat") is None, reason="Debian's kcat is not installed")
def test_debian_kcat_lists_metadata(bootstrap_servers: str) -> None:
    out = subprocess.run(["kcat", "-b", bootstrap_servers, "-L", "-m", "10"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "loopline.models" in out.stdout or "brokers" in out.stdout
