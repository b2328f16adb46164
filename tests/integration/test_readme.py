"""Every README example runs as a user runs it: its shell commands and Python blocks, in order.

The test reads README.md's fenced ``sh``/``bash``/``console`` and ``python`` blocks and runs each
command (``loopline`` is this environment's, first on PATH as in ``make shell``) in a folder that
stands for the repository's root: ``examples/`` copied there, ``.venv`` linked. Every subprocess
reaches the session broker through ``LOOPLINE_BOOTSTRAP_SERVERS``; ``LOOPLINE_HOME`` is the
default ``.loopline`` of that folder. "Using it" runs first, from an empty pipeline: it is the
newcomer's path, and its pipeline, models and predictions are what the other sections' examples
read; then every other section, in README order.

Nothing here is edited to make an example pass: a command is run as written, except for the
placeholders the README documents (:data:`PLACEHOLDERS`); the commands that only set up a machine
or run until Ctrl-C are listed in :data:`NOT_RUN` with the test that covers them instead; the few
a user starts and leaves running, or re-runs while waiting, are in :data:`BACKGROUND` and
:data:`UNTIL`. A new README example is run without any change here, so a broken one fails.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from loopline.kafka import KafkaConfig
from loopline.registry import RegistryReader, RegistryState
from loopline.settings import LooplineSettings

# The walk runs the whole README (services, a retrain, a report): minutes on a busy machine.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RUN = {"sh": "sh", "bash": "sh", "console": "sh", "python": "python"}
#: Fences that hold no example to run: diagrams and sample output (no language), spec fragments.
NOT_EXAMPLES = {"", "yaml"}
FIRST = "Using it"

#: Commands not run here, by (section, command as the README writes it): why, and what covers them.
NOT_RUN: dict[tuple[str, str], str] = {
    ("Two commands", "make demo"):
        "runs the demo on a broker of its own (minutes): tests/integration/test_demo.py runs "
        "`loopline demo`",
    ("Two commands", "make test"): "is this test suite",
    ("Two commands", "make test-kafka"):
        "this suite again on Apache Kafka (needs Java and Maven): CI's .ci/run runs it",
    ("What `make demo` shows", ".venv/bin/loopline demo --keep"):
        "keeps the demo running until Ctrl-C: tests/integration/test_demo.py runs the demo and "
        "stops it with Ctrl-C",
    (FIRST, "loopline broker"):
        "runs until Ctrl-C: the session broker stands in for it (tests/conftest.py); "
        "tests/integration/test_broker.py runs this command",
    (FIRST, "loopline broker --engine kafka"):
        "runs until Ctrl-C, needs Java: tests/integration/test_broker.py runs it (make test-kafka)",
    ("Faust apps", "LOOPLINE_BOOTSTRAP_SERVERS=127.0.0.1:9092 LOOPLINE_FAUST_PIPELINE=fraud "
                   ".venv/bin/python examples/faust_app.py worker -l info"):
        "a Faust worker runs until stopped: tests/integration/test_faust.py runs this example app "
        "as a worker",
    ("Pointing at a real Kafka cluster", "loopline up"):
        "runs until stopped; it already runs, started in \"Using it\" (one `up` per home); "
        "tests/integration/test_up.py",
}

#: Commands a user starts and leaves running (a second terminal): started in the background,
#: waited for until they print the line given, stopped by `loopline down` after the last section.
BACKGROUND: dict[tuple[str, str], str] = {
    (FIRST, "loopline up"): "Ctrl-C or `loopline down` stops everything",
}

#: Commands a user re-runs while waiting (the README says what for): run again every few seconds
#: until they succeed and their output has the text given, for at most :data:`WAIT_S`.
UNTIL: dict[tuple[str, str], tuple[str, str]] = {
    (FIRST, "loopline models list fraud"):
        ("trainer", "\"a minute later\": the trainer's version, after the labels"),
    (FIRST, "loopline lineage trace <event_id>"):
        ("feedback  label=1", "the lineage service writes every LOOPLINE_FLUSH_INTERVAL_S (5 s)"),
}
WAIT_S = 600.0


@dataclass(frozen=True)
class Placeholder:
    """A README placeholder: where it is, which value of the walk replaces it, and what it means."""

    pattern: str
    value: str
    meaning: str


#: The placeholders the README documents, and what stands for each here.
PLACEHOLDERS = [
    Placeholder(r"127\.0\.0\.1:<port>", "bootstrap",
                "the address `loopline broker` printed: the session broker's"),
    Placeholder(r"kafka-1:9092,kafka-2:9092", "bootstrap", "a real cluster: the session broker"),
    Placeholder(r"(?<=LOOPLINE_KAFKA_PROFILE=)kafka\b", "profile",
                "the session broker's client tuning (embedded on Tansu)"),
    Placeholder(r"(?<=LOOPLINE_REPLICATION_FACTOR=)3\b", "replication",
                "the session broker is one broker"),
    Placeholder(r"(?<![\w./-])(?:fraud|sea)(?![\w.-])", "pipeline",
                "the session broker is shared by every test, so the pipeline gets a name no "
                "other test uses (examples/fraud.yaml is copied with it); `sea`, the demo's "
                "pipeline, stands for it too: the demo is tests/integration/test_demo.py's"),
    Placeholder(r"(?<![\w-])ID(?![\w-])", "prediction_id",
                "a prediction_id: the first prediction `loopline tail` printed"),
    Placeholder(r"<event_id>", "event_id", "that prediction's event_id"),
    Placeholder(r"2026-11-25T10:00", "served_at",
                "a moment the pipeline served: that prediction's scored_at"),
]


@dataclass(frozen=True)
class Example:
    """One shell command (continuations joined, comment dropped) or one Python block."""

    section: str
    language: str  # "sh" or "python"
    text: str
    line: int  # where it starts in README.md

    @property
    def key(self) -> tuple[str, str]:
        """(section, text): how the tables above name it."""
        return self.section, self.text


def strip_comment(line: str) -> str:
    """A shell line without its ``#`` comment (a ``#`` inside quotes or a word stays)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(body: str, language: str) -> list[tuple[int, str]]:
    """(line offset, command) of a shell block; a ``console`` block's commands start with ``$``."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, raw in enumerate(body.splitlines()):
        if pending is None and language == "console":
            if not raw.startswith("$ "):
                continue  # output
            raw = raw[2:]
        line = strip_comment(raw)
        if pending is not None:
            line = f"{pending[1]} {line.strip()}"
        start = pending[0] if pending is not None else offset
        if line.endswith("\\"):
            pending = (start, line[:-1].rstrip())
            continue
        pending = None
        if line.strip():
            out.append((start, line.strip()))
    return out


def readme_examples(text: str) -> list[Example]:
    """Every example of README text, in order, with the heading of the section it is in."""
    section, examples = "", []
    fence = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
    heading = re.compile(r"^#{1,6} (.+)$", re.M)
    position = 0
    for block in fence.finditer(text):
        for h in heading.finditer(text, position, block.start()):
            section = h.group(1).strip()
        position = block.end()
        language, body = block.group(1), block.group(2)
        line = text.count("\n", 0, block.start()) + 2
        if language in NOT_EXAMPLES:
            continue
        if language not in RUN:
            raise AssertionError(f"README.md:{line - 1}: a ```{language} block: run it here "
                                 f"(languages {sorted(RUN)}) or add it to NOT_EXAMPLES")
        if RUN[language] == "python":
            examples.append(Example(section, "python", body, line))
        else:
            examples += [Example(section, "sh", cmd, line + offset)
                         for offset, cmd in shell_commands(body, language)]
    return examples


def substitute(text: str, values: dict[str, str]) -> str:
    """The example with every documented placeholder replaced by this walk's value for it."""
    for p in PLACEHOLDERS:
        if re.search(p.pattern, text):
            if p.value not in values:
                raise AssertionError(f"placeholder {p.pattern!r} ({p.meaning}) is used before "
                                     "the example that gives its value")
            value = values[p.value]
            text = re.sub(p.pattern, lambda _, value=value: value, text)
    left = re.findall(r"<[a-z_]+>", text)
    assert not left, f"undocumented placeholder(s) {left} in {text!r}: add them to PLACEHOLDERS"
    return text


@dataclass
class Ran:
    """What one example did."""

    example: Example
    command: str  # as run, placeholders replaced
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """The example, where it is and what it printed: for a failure message."""
        e = self.example
        return (f"README.md:{e.line} ({e.section}): exit {self.returncode}\n{self.command}\n"
                f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}")


@dataclass
class Walk:
    """The README walked once: where, with which environment, and what every example did."""

    root: Path
    env: dict[str, str]
    values: dict[str, str]
    ran: list[Ran] = field(default_factory=list)
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def check_finished(self) -> None:
        """Fail, naming the example and what it printed, unless every example succeeded."""
        failed = [r for r in self.ran if r.returncode != 0]
        assert not failed, failed[0].describe()

    def output(self, section: str, command: str) -> Ran:
        """What the example ``command`` (as the README writes it) of ``section`` did."""
        found = [r for r in self.ran if r.example.key == (section, command)]
        assert found, f"{command!r} in {section!r} did not run (the walk stopped: see the log)"
        return found[-1]

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``loopline ARGS`` in the walk's folder, stdout piped."""
        return subprocess.run(["loopline", *args], cwd=self.root, env=dict(self.env, **env),
                              capture_output=True, text=True, timeout=300)

    def run(self, example: Example) -> Ran:
        """Run one example as a user does; record and return what it did."""
        text = substitute(example.text, self.values)
        if example.language == "python":
            script = self.root / f"readme_{example.line}.py"
            script.write_text(text)
            done = subprocess.run([sys.executable, str(script)], cwd=self.root, env=self.env,
                                  capture_output=True, text=True, timeout=300)
            ran = Ran(example, text, done.returncode, done.stdout, done.stderr)
        elif text.startswith("export "):  # the environment of the commands that follow
            for word in shlex.split(text)[1:]:
                name, _, value = word.partition("=")
                self.env[name] = value
            ran = Ran(example, text, 0, "", "")
        elif example.key in BACKGROUND:
            ran = self._start(example, text, BACKGROUND[example.key])
        else:
            ran = self._until(example, text, *UNTIL.get(example.key, ("", "")))
        self.ran.append(ran)
        return ran

    def _shell(self, example: Example, text: str) -> Ran:
        done = subprocess.run(["bash", "-c", text], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=300)
        return Ran(example, text, done.returncode, done.stdout, done.stderr)

    def _until(self, example: Example, text: str, expected: str, why: str) -> Ran:
        deadline = time.monotonic() + WAIT_S
        while True:
            ran = self._shell(example, text)
            if not expected or (ran.returncode == 0 and expected in ran.stdout):
                return ran
            if time.monotonic() > deadline:
                ran.returncode = ran.returncode or 1
                ran.stderr += f"\n(re-run for {WAIT_S:.0f} s, waiting for {expected!r}: {why})"
                return ran
            time.sleep(3)

    def _start(self, example: Example, text: str, ready_line: str) -> Ran:
        log = self.root / f"background_{example.line}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(["bash", "-c", f"exec {text}"], cwd=self.root,
                                       env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.background.append(process)
        deadline = time.monotonic() + WAIT_S
        while (ready_line not in log.read_text() and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.5)
        said = log.read_text()
        if ready_line in said and process.poll() is None:
            return Ran(example, text, 0, said, "")
        return Ran(example, text, process.poll() or 1, said,
                   f"(started in the background: it printed no {ready_line!r} while running)")

    def stop(self) -> None:
        """Stop what runs in the background as the README says: `loopline down`."""
        if not self.background:
            return
        down = self.cli("down")
        for process in self.background:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.terminate()
                process.wait(timeout=30)
        assert down.returncode == 0, down.stderr


def sections_in_walk_order(examples: list[Example]) -> list[Example]:
    """"Using it" first (it builds the pipeline the others read), then the rest in README order."""
    assert any(e.section == FIRST for e in examples), f"README.md has no {FIRST!r} examples"
    return ([e for e in examples if e.section == FIRST]
            + [e for e in examples if e.section != FIRST])


def copy_examples(root: Path, pipeline: str) -> None:
    """examples/ as the repository has it, with the fraud pipeline under ``pipeline``'s name."""
    shutil.copytree(REPO / "examples", root / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    spec = root / "examples" / "fraud.yaml"
    text, count = re.subn(r"^name: fraud$", f"name: {pipeline}", spec.read_text(), flags=re.M)
    assert count == 1, "examples/fraud.yaml: expected one `name: fraud` line"
    spec.write_text(text)


def learn_prediction(walk: Walk, ran: Ran) -> None:
    """The values `loopline tail` gives the placeholders: its first served prediction's ids."""
    lines = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    assert lines, f"`loopline tail` printed no prediction:\n{ran.stdout}\n{ran.stderr}"
    first = lines[0]["value"]
    scored = datetime.fromtimestamp(first["scored_at"] / 1000, UTC)
    walk.values.update(prediction_id=first["prediction_id"], event_id=first["event_id"],
                       served_at=scored.isoformat(timespec="seconds"))


def registry(kafka: KafkaConfig) -> RegistryState:
    """The registry as it is now."""
    reader = RegistryReader(kafka)
    try:
        return reader.catch_up()
    finally:
        reader.close()


@pytest.fixture(scope="module")
def walk(settings: LooplineSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    """README.md's examples run once, in walk order; stops at the first one that fails."""
    pipeline = "readme" + uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("readme")
    copy_examples(root, pipeline)
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPLINE_") and k != "COLUMNS"}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               LOOPLINE_BOOTSTRAP_SERVERS=settings.bootstrap_servers or "",
               LOOPLINE_KAFKA_PROFILE=settings.kafka_profile,
               LOOPLINE_SESSION_TIMEOUT_MS=str(settings.session_timeout_ms),
               # The session broker holds other tests' pipelines: the services serve this one.
               LOOPLINE_PIPELINES=pipeline)
    values = {"bootstrap": settings.bootstrap_servers or "", "profile": settings.kafka_profile,
              "replication": "1", "pipeline": pipeline}
    w = Walk(root, env, values)
    try:
        for example in sections_in_walk_order(readme_examples(README.read_text())):
            if example.key in NOT_RUN:
                continue
            ran = w.run(example)
            if ran.returncode != 0:
                break
            if example.text.startswith("loopline tail"):
                learn_prediction(w, ran)
        yield w
    finally:
        w.stop()


def test_every_readme_example_runs(walk: Walk) -> None:
    walk.check_finished()
    examples = readme_examples(README.read_text())
    expected = [e for e in examples if e.key not in NOT_RUN]
    assert sorted(r.example.line for r in walk.ran) == sorted(e.line for e in expected)


def test_using_it_reaches_a_prediction_feedback_a_retrain_and_a_report(
        walk: Walk, kafka: KafkaConfig) -> None:
    walk.check_finished()
    pipeline = walk.values["pipeline"]
    tail = walk.output(FIRST, "loopline tail fraud --from-beginning -n 3")
    first = json.loads(tail.stdout.splitlines()[0])["value"]
    assert first["served"] and first["pipeline"] == pipeline and first["model_version"] == 1
    # The feedback sent for that prediction reached the lineage store, beside the prediction.
    trace = walk.output(FIRST, "loopline lineage trace <event_id>").stdout
    assert f"predicted {pipeline}/1 champion" in trace and "feedback  label=1" in trace, trace
    # The labels file made the trainer learn and register a version of its own.
    trained = [v for (p, _, _), v in registry(kafka).versions.items()
               if p == pipeline and v["trigger"]]
    assert trained, f"no version of {pipeline} by the trainer"
    listed = walk.output(FIRST, "loopline models list fraud").stdout
    assert any(f"{pipeline}/{v['version']}" in line and "trainer" in line
               for v in trained for line in listed.splitlines()), listed
    replay = walk.output(FIRST,
                         "loopline replay fraud --since 1h --model fraud/1 --against fraud/2")
    audit = f"reproducibility audit of {pipeline}/1: "  # every served event of events.csv
    assert audit in replay.stdout and "/3000 live scores reproduced exactly" in replay.stdout
    # The report tells that story in one offline file.
    report = walk.root / f"loopline-report-{pipeline}.html"
    html = report.read_text()
    assert 'id="loopline-report-data"' in html
    said = walk.output(FIRST, "loopline report fraud").stdout
    assert f"(trigger {trained[0]['trigger']})" in said, said


def test_cli_tables_print_whole_when_piped_at_any_columns(walk: Walk,
                                                          kafka: KafkaConfig) -> None:
    walk.check_finished()
    pipeline = walk.values["pipeline"]
    versions = [v for (p, _, _), v in registry(kafka).versions.items() if p == pipeline]
    for args in (["models", "list", pipeline], ["models", "list", pipeline, "--history"],
                 ["status", pipeline], ["lineage", "query", pipeline, "--limit", "5"],
                 ["lineage", "served-at", pipeline, walk.values["served_at"]]):
        done = walk.cli(*args, COLUMNS="40")  # an exported COLUMNS describes a terminal, not a pipe
        assert done.returncode == 0, done.stderr
        assert "…" not in done.stdout, f"loopline {' '.join(args)} cut a cell:\n{done.stdout}"
        if args[1:] == ["list", pipeline]:  # one line a row: each version with its sha256
            lines = done.stdout.splitlines()
            for v in versions:
                assert any(f"{pipeline}/{v['version']} " in line and v["sha256"][:12] in line
                           for line in lines), done.stdout


def test_the_tables_above_name_commands_the_readme_has() -> None:
    """A README edit that drops or rewords an excluded command must revisit its exclusion."""
    keys = {e.key for e in readme_examples(README.read_text())}
    for table in (NOT_RUN, BACKGROUND, UNTIL):
        stale = set(table) - keys
        assert not stale, f"not in README.md any more: {sorted(stale)}"


@pytest.mark.parametrize(("block", "commands"), [
    ("a  # note\nb \\\n  --c 'x # y'  # more\n\n# only a comment\n", ["a", "b --c 'x # y'"]),
    ("$ loopline status\npipeline fraud\n$ loopline tail \\\n  -n 1\n",
     ["loopline status", "loopline tail -n 1"]),
])
def test_shell_blocks_are_split_into_commands(block: str, commands: list[str]) -> None:
    language = "console" if block.startswith("$") else "sh"
    assert [c for _, c in shell_commands(block, language)] == commands


def test_an_unknown_fence_language_is_an_error_not_a_skipped_example() -> None:
    with pytest.raises(AssertionError, match="```shell"):
        readme_examples("## A\n\n```shell\nloopline status\n```\n")
    found = readme_examples("## A\n\n```yaml\nx: 1\n```\n### B\n```python\nprint(1)\n```\n")
    assert [(e.section, e.language, e.text) for e in found] == [("B", "python", "print(1)\n")]


def test_placeholders_are_replaced_and_unknown_ones_refused() -> None:
    values = {"pipeline": "p1", "prediction_id": "abc", "bootstrap": "h:1"}

    def sub(text: str) -> str:
        return substitute(text, values)

    assert sub("loopline feedback fraud --prediction-id ID --label 1") == \
        "loopline feedback p1 --prediction-id abc --label 1"
    assert sub("loopline apply examples/fraud.yaml") == "loopline apply examples/fraud.yaml"
    assert sub("replay sea --model sea/1 -o sea.html") == "replay p1 --model p1/1 -o sea.html"
    assert sub("kcat -b 127.0.0.1:<port> -L") == "kcat -b h:1 -L"
    with pytest.raises(AssertionError, match="undocumented placeholder"):
        sub("loopline lineage trace <trace_id>")
    with pytest.raises(AssertionError, match="before the example that gives its value"):
        sub("loopline lineage trace <event_id>")
