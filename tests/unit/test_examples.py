"""The example builders: the same files every run, models Loopline accepts for their pipeline."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from loopline.app.tools import read_events, read_feedback
from loopline.models import load_reference, validate_model
from loopline.scoring import Scorer
from loopline.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def build(script: str, out: Path, hash_seed: str) -> dict[str, bytes]:
    """Run an example builder as a user does; the files it wrote."""
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)  # set iteration order differs between runs
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize(("script", "pipeline"), [("fraud_model.py", "fraud.yaml"),
                                                  ("sea_model.py", "sea.yaml")])
def test_builders_write_the_same_accepted_files_every_run(tmp_path: Path, script: str,
                                                          pipeline: str) -> None:
    first, second = build(script, tmp_path / "a", "1"), build(script, tmp_path / "b", "2")
    assert sorted(first) == ["data.csv", "events.csv", "labels.csv", "model.onnx", "v2.onnx"]
    assert first == second  # deterministic: byte for byte
    spec = load_spec(EXAMPLES / pipeline)
    reference = load_reference(tmp_path / "a" / "data.csv", spec)
    # As ingest writes them: every feature present, a missing optional one as None.
    events = [{f.name: e["features"].get(f.name) for f in spec.features}
              for e in read_events(tmp_path / "a" / "events.csv", spec)]
    labels = read_feedback(tmp_path / "a" / "labels.csv", spec)
    assert len(labels) == len(events) and all(r["event_id"] and r["label"] for r in labels)
    with (tmp_path / "a" / "labels.csv").open() as f:
        assert next(csv.reader(f)) == ["event_id", spec.label.name]  # the spec's label name
    for name in ("model.onnx", "v2.onnx"):
        model = first[name]
        # What users export from float32 data with skl2onnx: one tensor(float) input.
        (graph_input,) = onnx.load_model_from_string(model).graph.input
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        validated = validate_model(model, spec, reference, label=name)
        scored = Scorer(model, spec, validated.fill_values).score(events[:500])
        assert set(scored.labels or []) <= set(spec.label.classes or [])
        truth = [r["label"] for r in labels[:500]]
        accuracy = sum(p == t for p, t in zip(scored.labels or [], truth, strict=True)) / 500
        assert accuracy > 0.75, (name, accuracy)  # a model worth serving, not a constant
