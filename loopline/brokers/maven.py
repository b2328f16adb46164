"""The `kafka` engine's Java side: find Java, and fetch the pinned Kafka release once with Maven.

``infra/kafka/pom.xml`` (installed as ``loopline.infra_kafka``) pins the release. The first
start copies its runtime jars into ``~/.cache/loopline/kafka/<version>-<pom sha256>/lib``;
every later start (tests, CI, other homes) reuses that folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import os
import re
import shutil
import subprocess
from pathlib import Path

from loopline.brokers.common import Progress, log_tail
from loopline.errors import BrokerError

DIST_PACKAGE = "loopline.infra_kafka"
MIN_JAVA = 17
_INSTALL_JAVA = "install Java 17 or newer, e.g. `apt-get install openjdk-17-jre-headless`"
_INSTALL_MAVEN = "install Maven 3.8 or newer, e.g. `apt-get install maven`"


def dist_file(name: str) -> Path:
    """A file of the pinned Kafka distribution (``pom.xml``, ``log4j2.properties``)."""
    path = Path(str(importlib.resources.files(DIST_PACKAGE) / name))
    if not path.is_file():
        raise BrokerError(f"{name} of the kafka engine is missing from {path.parent}; "
                          "reinstall Loopline")
    return path


def kafka_version() -> str:
    """The Apache Kafka version ``pom.xml`` pins."""
    match = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", dist_file("pom.xml").read_text())
    if match is None:
        raise BrokerError(f"{dist_file('pom.xml')} does not pin <kafka.version>")
    return match.group(1).strip()


def cache_root() -> Path:
    """Loopline's user cache folder (``$XDG_CACHE_HOME/loopline`` or ``~/.cache/loopline``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loopline"


def java_binary() -> str:
    """Path of a Java 17+ ``java`` (``$JAVA_HOME/bin/java``, else the one on PATH)."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else None
    java = candidate if candidate and os.access(candidate, os.X_OK) else shutil.which("java")
    if java is None:
        raise BrokerError(f"the kafka engine runs Apache Kafka on Java, and no `java` was found "
                          f"(JAVA_HOME unset or wrong, none on PATH): {_INSTALL_JAVA}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BrokerError(f"`{java} -version` failed ({e}): {_INSTALL_JAVA}") from e
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_392" is Java 8
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise BrokerError(f"the kafka engine needs Java {MIN_JAVA} or newer; {java} is "
                          f"{'version ' + str(major) if major else 'of unknown version'}: "
                          f"{_INSTALL_JAVA}")
    return java


def classpath(progress: Progress | None = None) -> Path:
    """The folder of the pinned Kafka's jars, fetched with Maven the first time."""
    say = progress or (lambda _: None)
    pom = dist_file("pom.xml")
    version = kafka_version()
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    root = cache_root() / "kafka"
    target = root / f"{version}-{digest}"
    if (target / "complete").is_file():
        return target / "lib"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        # Another process (a parallel test, a second `loopline broker`) may be fetching it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "complete").is_file():
            return target / "lib"
        _fetch(pom, version, target, say)
    return target / "lib"


def _fetch(pom: Path, version: str, target: Path, say: Progress) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(f"the kafka engine fetches Apache Kafka {version} with Maven the first "
                          f"time, and `mvn` is not on PATH: {_INSTALL_MAVEN} (it is needed once: "
                          f"the jars are kept in {target})")
    work = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # Maven may write beside its pom, and the installed package may be read-only.
    shutil.copy(pom, work / "pom.xml")
    say(f"fetching Apache Kafka {version} with Maven into {target} (first start only; "
        "later starts reuse it)")
    log_path = work / "maven.log"
    command = [mvn, "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={work / 'lib'}"]
    jars = 0
    with log_path.open("w") as log, subprocess.Popen(
            command, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            # "Downloaded from central: https://.../kafka_2.13-4.3.2.jar (6.5 MB at 3 MB/s)"
            if line.startswith("Downloaded from") and ".jar " in line:
                jars += 1
                url = line.split(": ", 1)[-1].split()[0]
                say(f"maven: downloaded {url.rsplit('/', 1)[-1]}")
    if proc.returncode != 0:
        kept = target.parent / f"maven-failed-{version}.log"
        shutil.copy(log_path, kept)
        shutil.rmtree(work, ignore_errors=True)
        raise BrokerError(f"Maven could not fetch Apache Kafka {version} (exit code "
                          f"{proc.returncode}; full log {kept}); it ended with:\n"
                          f"{log_tail(kept, 20)}")
    count = len(list((work / "lib").glob("*.jar")))
    (work / "complete").write_text(f"{version}\n{count} jars\n")
    shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from a killed fetch
    os.replace(work, target)
    say(f"Apache Kafka {version}: {count} jars in {target / 'lib'} ({jars} downloaded)")
