"""Routing by key hash, prediction ids, bulk histograms, artifact store and reference data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loopline.artifacts import ArtifactError, ArtifactStore, read_artifact
from loopline.models import fill_values, load_reference
from loopline.services.inference.metrics import BulkHistogram
from loopline.services.inference.plan import key_bucket, key_buckets
from loopline.services.inference.service import prediction_id
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "unit", "features": [{"name": "x", "type": "float", "min": 0, "max": 4},
                                                {"name": "opt", "type": "float", "required": False},
                                                {"name": "flag", "type": "bool"}]})


def test_key_buckets_are_stable_and_uniform() -> None:
    keys = [f"customer-{i}" for i in range(20_000)]
    b = key_buckets(keys, len(keys))
    assert b.tolist() == [key_bucket(k) for k in keys]
    assert ((b >= 0) & (b < 1)).all()
    assert 0.19 < float((b < 0.2).mean()) < 0.21


def test_prediction_id_is_deterministic() -> None:
    a = prediction_id("e1", "m", 1, "champion")
    assert a == prediction_id("e1", "m", 1, "champion")
    assert len({a, prediction_id("e1", "m", 2, "champion"), prediction_id("e1", "m", 1, "shadow"),
                prediction_id("e2", "m", 1, "champion")}) == 4


def test_bulk_histogram_exposition() -> None:
    registry = CollectorRegistry()
    h = BulkHistogram("lat_seconds", "latency", ["pipeline"], (0.01, 0.1, 1.0))
    registry.register(h)
    h.observe_many(np.array([0.005, 0.01, 0.05, 2.0]), "p")
    h.observe_many(np.array([0.5]), "p")
    assert registry.get_sample_value("lat_seconds_bucket", {"pipeline": "p", "le": "0.01"}) == 2
    assert registry.get_sample_value("lat_seconds_bucket", {"pipeline": "p", "le": "1.0"}) == 4
    assert registry.get_sample_value("lat_seconds_bucket", {"pipeline": "p", "le": "+Inf"}) == 5
    assert registry.get_sample_value("lat_seconds_count", {"pipeline": "p"}) == 5
    assert b"lat_seconds_sum" in generate_latest(registry)


def test_artifact_store_round_trip_and_sha_check(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "a"))
    digest, uri = store.put(b"model-bytes")
    assert uri.startswith("file://") and uri.endswith(f"{digest}.onnx")
    assert read_artifact(uri, digest) == b"model-bytes"
    Path(uri.removeprefix("file://")).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256_match"):
        read_artifact(uri, digest)
    with pytest.raises(ArtifactError, match="could not read"):
        read_artifact((tmp_path / "missing.onnx").as_uri(), digest)


def test_reference_csv_typed_and_fill_values(tmp_path: Path) -> None:
    path = tmp_path / "ref.csv"
    path.write_text("x,opt,flag\n1.5,,true\n2.5,4,0\n")
    rows = load_reference(path, SPEC)
    assert rows == [{"x": 1.5, "opt": None, "flag": True}, {"x": 2.5, "opt": 4.0, "flag": False}]
    assert fill_values(SPEC, rows) == {"opt": 4.0}
    assert fill_values(SPEC, None) == {"opt": 0.0}
    path.write_text("x,opt,flag\nabc,,true\n")
    with pytest.raises(Exception, match="row 1, feature 'x'"):
        load_reference(path, SPEC)


def test_reference_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "ref.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "opt": [None, 3.0], "flag": [True, False]}), path)
    assert load_reference(path, SPEC)[1] == {"x": 2.0, "opt": 3.0, "flag": False}
