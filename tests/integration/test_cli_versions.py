"""Naming versions on the command line (PIPELINE/2, PIPELINE@challenger), origins, --force."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_models import lr_model, registry  # noqa: F401 - the fixture, shared

from loopline.app.cli import main as cli
from loopline.kafka import KafkaConfig
from loopline.models import Lineage, ModelRegistry, NewVersion
from loopline.settings import LooplineSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def runner(settings: LooplineSettings, tmp_path: Path) -> CliRunner:
    env = {"LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
           "LOOPLINE_KAFKA_PROFILE": settings.kafka_profile, "LOOPLINE_HOME": str(settings.home),
           "LOOPLINE_ARTIFACT_URI": str(tmp_path / "artifacts")}
    return CliRunner(env=env)


def run(runner: CliRunner, *args: str, code: int = 0) -> Any:
    result = runner.invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result


def trained(registry: ModelRegistry, pipeline: str, stage: str,  # noqa: F811 - the shared fixture
            seed: int) -> dict[str, Any]:
    """A version registered the way the trainer registers one: with a trigger and a scorecard."""
    verdict = "rejected" if stage == "rejected" else "accepted"
    card = {"accepted": stage != "rejected",
            "summary": f"{verdict} sklearn.linear: score 0.61 vs champion 0.74"}
    return registry.register(pipeline, lr_model(4, seed), NewVersion(stage=stage, lineage=Lineage(
        trigger="every_n_labels(2000)", scorecard=card)))


def test_versions_by_number_and_alias_origins_and_force(
        runner: CliRunner, unique: str, registry: ModelRegistry) -> None:  # noqa: F811 - the shared fixture
    registry.register(unique, lr_model(4, 1))                                           # 1 user
    registry.register(unique, lr_model(4, 2), NewVersion(stage="challenger", traffic=0.2))  # 2 user
    trained(registry, unique, "rejected", 3)                                            # 3 trainer
    trained(registry, unique, "candidate", 4)                                           # 4 trainer

    def origins(*args: str) -> dict[str, str]:
        listed = run(runner, "models", "list", *args).output
        rows = re.finditer(rf"│ {unique}\s*│ ({unique}/\d)\s*│ (\w+)", listed)
        return {m.group(1): m.group(2) for m in rows}

    assert origins(unique) == {f"{unique}/1": "user", f"{unique}/2": "user",
                               f"{unique}/3": "trainer", f"{unique}/4": "trainer"}
    assert origins(f"{unique}@challenger") == {f"{unique}/2": "user"}
    assert origins(f"{unique}/3") == {f"{unique}/3": "trainer"}

    # The status shows what each version serves: the champion the 80 % no challenger takes.
    status = run(runner, "status", unique).output
    assert re.search(rf"{unique}/1\s*│ user\s*│ champion\s*│ 80%", status), status
    assert re.search(rf"{unique}/2\s*│ user\s*│ challenger\s*│ 20%", status), status
    assert "events/s over the last second" in status
    if runner.env.get("LOOPLINE_KAFKA_PROFILE") == "embedded":
        assert "approximate" in status

    # A rejected version and a never-validated candidate take no traffic without --force.
    refused = run(runner, "models", "promote", f"{unique}/3", code=2).output
    assert "was rejected by test: registered: rejected sklearn.linear" in refused
    assert "made by the trainer" in refused and "rule: force_needed" in refused
    refused = run(runner, "models", "promote", unique, "--version", "4", "--to", "challenger",
                  "--traffic", "0.1", code=2).output
    assert "is a candidate: it was never validated" in refused and "--to shadow" in refused
    assert "-> shadow" in run(runner, "models", "promote", f"{unique}/4", "--to", "shadow").output
    forced = run(runner, "models", "promote", f"{unique}/3", "--to", "shadow").output
    assert "rejected -> shadow" in forced  # a shadow takes no traffic: no --force needed
    forced = run(runner, "models", "promote", f"{unique}/3", "--to", "retired").output
    assert "-> retired" in forced

    # The alias names whichever version holds the stage now.
    promoted = run(runner, "models", "promote", f"{unique}@challenger").output
    assert f"{unique}/2 challenger -> champion" in promoted
    # The old NAME@VERSION still works, with a note on stderr; NAME VERSION too.
    old = run(runner, "models", "promote", f"{unique}@1", "--to", "shadow")
    assert f"{unique}/1 retired -> shadow" in old.stdout
    assert "deprecated" in old.stderr and f"write {unique}/1" in old.stderr
    assert "-> retired" in run(runner, "models", "promote", unique, "1", "--to", "retired").output
    run(runner, "models", "promote", f"{unique}/1", "--version", "2", code=2)
    assert "no version of" in run(runner, "models", "promote", f"{unique}@canary", code=2).output

    back = run(runner, "models", "rollback", f"{unique}@champion").output
    assert f"rolled back {unique}/2 -> champion is now {unique}/1" in back
    assert "rule: model_ref" in run(runner, "models", "rollback", f"{unique}/2", code=2).output


def test_history_prints_whole_when_piped(runner: CliRunner, unique: str,
                                         registry: ModelRegistry) -> None:  # noqa: F811 - the shared fixture
    registry.register(unique, lr_model(4, 1))
    trained(registry, unique, "shadow", 2)
    out = run(runner, "models", "list", unique, "--history").output
    row = next(line for line in out.splitlines() if f"{unique}/2" in line)
    # The trainer's whole reason on one line: CliRunner's output is not a terminal.
    assert "registered: accepted sklearn.linear: score 0.61 vs champion 0.74" in row
    assert row.rstrip().endswith("│")


def test_lineage_and_replay_take_the_same_names(runner: CliRunner, kafka: KafkaConfig,
                                                unique: str) -> None:
    # An empty store: the names are parsed (and aliases resolved) before any data is read.
    bad = run(runner, "lineage", "query", unique, "--model", f"{unique}@newest", code=2).output
    assert "'newest' is not an alias" in bad and "rule: model_ref" in bad
    bad = run(runner, "replay", unique, "--model", unique, code=2).output
    assert "which version?" in bad
