"""The kafka engine without a broker: Java and Maven checks, the one-time fetch, resolution."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from loopline.brokers import BrokerAddress, resolve_broker, write_state
from loopline.brokers.apache_kafka import KafkaBroker, new_cluster_id
from loopline.brokers.maven import classpath, java_binary
from loopline.errors import BrokerError
from loopline.settings import LooplineSettings


def fake_tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def test_missing_java_names_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"no `java` was found.*apt-get install openjdk-17"):
        java_binary()


def test_java_older_than_17_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                       ) -> None:
    fake_tool(tmp_path / "jdk" / "bin", "java",
              "echo 'openjdk version \"11.0.22\" 2024-01-16' >&2\n")
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(BrokerError, match=r"needs Java 17 or newer.*version 11"):
        java_binary()


def test_missing_maven_names_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing fetched yet
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BrokerError, match=r"`mvn` is not on PATH.*apt-get install maven"):
        classpath()


def test_fetch_runs_maven_once_and_reports_progress(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    # A stand-in for Maven: copies "a jar" where copy-dependencies would, prints what it did.
    fake_tool(tmp_path / "bin", "mvn", f"""echo run >> {calls}
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
done
mkdir -p "$out" && echo jar > "$out/kafka_2.13-x.jar"
echo "Downloaded from central: https://repo/org/apache/kafka/kafka_2.13-x.jar (6 MB at 1 MB/s)"
""")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    lines: list[str] = []
    lib = classpath(lines.append)
    assert [p.name for p in lib.glob("*.jar")] == ["kafka_2.13-x.jar"]
    assert lib.is_relative_to(tmp_path / "cache" / "loopline" / "kafka")
    assert any("fetching Apache Kafka" in line for line in lines)
    assert "maven: downloaded kafka_2.13-x.jar" in lines
    assert classpath() == lib  # cached: Maven is not run again
    assert calls.read_text().split() == ["run"]


def test_a_failed_fetch_says_so_and_keeps_maven_s_log(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    fake_tool(tmp_path / "bin", "mvn", "echo '[ERROR] Could not resolve dependencies'\nexit 1\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BrokerError, match=r"(?s)Maven could not fetch.*Could not resolve") as e:
        classpath()
    log = Path(str(e.value).split("full log ")[1].split(")")[0])
    assert "Could not resolve" in log.read_text()


def test_single_node_settings_let_groups_and_transactions_work(tmp_path: Path) -> None:
    props = KafkaBroker(tmp_path)._server_properties(19092, 19093)
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr"):
        assert props[key] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert int(props["group.min.session.timeout.ms"]) <= 1000  # LOOPLINE_SESSION_TIMEOUT_MS >= 1000
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["log.dirs"].startswith(str(tmp_path.resolve()))


@pytest.mark.parametrize(("engine", "embedded"), [("tansu", True), ("kafka", False)])
def test_auto_profile_follows_the_recorded_engine(tmp_path: Path, engine: str,
                                                  embedded: bool) -> None:
    write_state(tmp_path, "127.0.0.1:1234", os.getpid(), engine)  # type: ignore[arg-type]  # a deliberately wrong engine
    address = resolve_broker(LooplineSettings(home=tmp_path, bootstrap_servers=None))
    assert address == BrokerAddress("127.0.0.1:1234", embedded=embedded)


def test_a_dead_recorded_broker_is_unreachable_not_missing(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_state(tmp_path, "127.0.0.1:1234", dead.pid, "kafka")
    with pytest.raises(BrokerError, match=r"127.0.0.1:1234 is unreachable.*nothing is lost"):
        resolve_broker(LooplineSettings(home=tmp_path, bootstrap_servers=None))


def test_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # kafka-storage format reads "--cluster-id -x..." as a missing value: the format fails.
    draws = iter([b"\xf8" + bytes(15), bytes(16)])  # base64url of 0xf8... starts with '-'
    monkeypatch.setattr("loopline.brokers.apache_kafka.uuid.uuid4",
                        lambda: type("U", (), {"bytes": next(draws)})())
    assert new_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
