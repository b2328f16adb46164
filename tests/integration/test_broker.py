"""The embedded broker: context manager, `loopline broker` command, clean stop, older clients."""

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
from confluent_kafka.admin import AdminClient

from loopline.broker import STATE_FILE, EmbeddedBroker, read_state
from loopline.compat_proxy import _read_uvarint

pytestmark = pytest.mark.integration


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


def test_context_manager_writes_state_and_cleans_up(tmp_path: Path) -> None:
    with EmbeddedBroker(home=tmp_path) as broker:
        state = read_state(tmp_path)
        assert state is not None and state["bootstrap_servers"] == broker.bootstrap_servers
        md = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
        assert md.brokers
        pids = broker.pids
        assert len(pids) == 2 and all(alive(p) for p in pids)
        with pytest.raises(Exception, match="already runs"):
            EmbeddedBroker(home=tmp_path).start()
    assert not (tmp_path / STATE_FILE).exists()
    assert not [p for p in pids if alive(p)]


def start_cli(home: Path) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, LOOPLINE_HOME=str(home))
    env.pop("LOOPLINE_BOOTSTRAP_SERVERS", None)
    proc = subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "broker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "broker ready at" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
    address = line.split("ready at ")[1].split()[0]
    return proc, address


def test_cli_prints_address_records_it_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc, address = start_cli(tmp_path)
    try:
        assert json.loads((tmp_path / STATE_FILE).read_text())["bootstrap_servers"] == address
        md = AdminClient({"bootstrap.servers": address}).list_topics(timeout=10)
        assert {"loopline.models", "loopline.alerts"} <= set(md.topics)
        helpers = children_of(proc.pid)
        assert len(helpers) == 2  # tansu and the compatibility proxy
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0 and "broker stopped" in out
    finally:
        proc.kill()
        proc.communicate()
    assert not [p for p in helpers if alive(p)]
    assert not (tmp_path / STATE_FILE).exists()


def test_no_orphan_even_when_the_cli_is_killed(tmp_path: Path) -> None:
    proc, _ = start_cli(tmp_path)
    helpers = children_of(proc.pid)
    proc.kill()
    proc.communicate(timeout=5)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in helpers if alive(p)]
    assert read_state(tmp_path) is None  # the dead pid is not trusted


def api_versions_v3(address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        header = struct.pack(">hhih", 18, 3, 1, 4) + b"test" + b"\x00"
        body = header + b"\x05kcat\x061.7.1\x00"
        s.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        return s.recv(size, socket.MSG_WAITALL)


def test_apiversions_through_the_proxy_has_no_default_tags(bootstrap_servers: str, settings) -> None:  # type: ignore[no-untyped-def]
    if settings.kafka_profile != "embedded":
        pytest.skip("the compatibility proxy belongs to the embedded broker")
    body = api_versions_v3(bootstrap_servers)
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
