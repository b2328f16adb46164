"""Every committed version of every schema in schemas/ can be read by the current one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from loopline import avro

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = sorted((REPO / "schemas").glob("*.avsc"))


def committed_versions(path: Path) -> list[tuple[str, str]]:
    """(commit, text) of each committed version of ``path``; empty outside a git checkout."""
    rel = path.relative_to(REPO).as_posix()
    try:
        commits = subprocess.run(["git", "log", "--format=%H", "--", rel], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [(c, subprocess.run(["git", "show", f"{c}:{rel}"], cwd=REPO, check=True,
                               capture_output=True, text=True).stdout) for c in commits]


def test_every_topic_kind_has_a_schema() -> None:
    assert {p.stem for p in SCHEMAS} >= set(avro.KINDS)


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_is_backward_compatible_with_its_history(path: Path) -> None:
    current = json.loads(path.read_text())
    if path.stem in ("raw", "features"):  # templates: check them with a feature filled in
        fields = [{"name": "x", "type": "double"}]
        current = avro.with_features(path.stem, fields)
    for commit, text in committed_versions(path):
        old = json.loads(text)
        if path.stem in ("raw", "features"):
            old["fields"] = [dict(f, type=dict(f["type"], fields=[{"name": "x", "type": "double"}]))
                             if f["name"] == "features" else f for f in old["fields"]]
        # source.avsc is a named type the others share: checked on its own.
        reason = avro.is_backward_compatible(current, old, shared=path.stem != "source")
        assert reason is None, f"{path.name} cannot read data written at {commit[:10]}: {reason}"


@pytest.mark.parametrize("kind", ["prediction", "feedback", "deadletter", "alert", "registry"])
def test_messages_of_every_committed_version_stay_readable(kind: str) -> None:
    """A message written under any committed version
    decodes with today's codec (schemas/history)."""
    import fastavro
    import fastavro.utils

    codec = avro.codec(kind)
    for commit, text in committed_versions(REPO / "schemas" / f"{kind}.avsc"):
        old = fastavro.parse_schema(json.loads(text), named_schemas=avro.named_types())
        fp = avro.fingerprint(old)
        assert fp in codec._writers, (  # the writers a codec accepts
            f"schemas/{kind}.avsc as of {commit[:10]} (fingerprint {fp.hex()}) is not in "
            f"schemas/history: add it as schemas/history/{kind}.{fp.hex()}.avsc")
        for record in fastavro.utils.generate_many(old, 5):
            message = avro.Codec(json.loads(text)).encode(record)
            decoded = codec.decode(message)
            assert set(decoded) == {f["name"] for f in codec.schema["fields"]}
