"""Replay throughput: ``replay()`` of a logged window, as a ratio to raw ONNX Runtime scoring.

No broker: a lineage store is written in a temporary folder with ``LineageStore.write`` and the
lineage service's Arrow schemas (features, the served predictions of a logistic regression over 8
numeric features, feedback for a quarter of the events), and the two model versions are registered
in an in-memory ``RegistryState`` (events applied as a ``RegistryReader`` would) with their ONNX
files in an ``ArtifactStore``. Then it times

- ``replay()`` of the whole window through the version that served (a reproducibility audit:
  every logged score must be reproduced exactly, asserted), and against a second version;
- raw ONNX Runtime: ``session.run`` on the already prepared float matrix of the same rows, in
  batches of the replay's batch size (the limit: no reading, no parsing, no comparing);
- only reading the audit's rows out of the store (the replay's DuckDB query, drained), which
  shows how much of a replay is reading and how much is scoring and comparing.

Run: ``.venv/bin/python -m bench.lineage_replay`` (``BENCH_EVENTS`` changes the row count).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import add_engine_argument
from loopline.artifacts import ArtifactStore
from loopline.models import validate_model
from loopline.registry import RegistryState, spec_event
from loopline.scoring import Scorer
from loopline.services.inference.service import prediction_id
from loopline.services.lineage import replay as replay_mod
from loopline.services.lineage import rows as lineage_rows
from loopline.services.lineage.query import connect
from loopline.services.lineage.store import LineageStore
from loopline.spec import PipelineSpec, parse_spec

N = int(os.environ.get("BENCH_EVENTS", "200000"))
FEATURES = 8
PARTITIONS = 4
FILE_ROWS = 25_000  # rows per Parquet file, like a lineage flush
NAME = "bench-lr"
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def say(msg: str) -> None:
    """Progress on stdout (this is a command-line tool, not a service)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_spec() -> PipelineSpec:
    """8 float features; the last one optional, so the fill-value path is part of the replay."""
    feats = [{"name": f"x{i}", "type": "float"} for i in range(FEATURES - 1)]
    feats.append({"name": f"x{FEATURES - 1}", "type": "float", "required": False})
    return parse_spec({"name": "replaybench", "partitions": PARTITIONS, "features": feats,
                       "label": {"classes": ["0", "1"], "positive": "1"}})


def make_model(seed: int) -> bytes:
    """A logistic regression exported by skl2onnx (probabilities as a tensor)."""
    from skl2onnx import to_onnx  # benchmark-only dependency
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2000, FEATURES)).astype(np.float32)
    w = rng.normal(size=FEATURES)
    y = (x @ w + rng.normal(scale=0.5, size=2000) > 0).astype(int)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def register(state: RegistryState, store: ArtifactStore, spec: PipelineSpec, model: bytes,
             version: int,
             stage: str, reference: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Validate and store a version and fold its registry event into ``state`` (no broker)."""
    checked = validate_model(model, spec, reference, label=f"{NAME} v{version}")
    digest, uri = store.put(model)
    record = {"name": NAME, "version": version, "sha256": digest, "uri": uri, "stage": stage,
              "traffic": 1.0 if stage == "champion" else 0.0, "parent": None,
              "created_at": START_MS, "library_versions": checked.library_versions, "metrics": {},
              "reference_profile_json": None,
              "training_ranges": [], "trigger": None, "scorecard_json": None,
              "fill_values": checked.fill_values, "input_features": checked.input_features}
    state.apply({"kind": "model_version", "pipeline": spec.name, "at": START_MS, "spec": None,
                 "model": record, "stage_change": None}, offset)
    return record


def features_table(spec: PipelineSpec, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Feature records, the optional last feature missing in 5 % of them."""
    x = rng.normal(size=(N, FEATURES))
    missing = rng.random(N) < 0.05
    names = [f.name for f in spec.features]
    records = [dict(zip(names, row, strict=True)) for row in x.tolist()]
    for i in np.flatnonzero(missing).tolist():
        records[i][names[-1]] = None
    return records


def write_store(store: LineageStore, spec: PipelineSpec, served: Scorer,
                records: list[dict[str, Any]], sha: str, rng: np.random.Generator) -> int:
    """Write features, served predictions and feedback files; return the feedback count."""
    topics = spec.topics
    fschema = lineage_rows.features_schema(spec)
    labeled = 0
    for part in range(PARTITIONS):
        idx = list(range(part, N, PARTITIONS))  # event i lives in partition i % PARTITIONS
        for start in range(0, len(idx), FILE_ROWS):
            chunk = idx[start:start + FILE_ROWS]
            ts = [START_MS + i for i in chunk]
            feats = [{"event_id": f"e{i}", "key": None, "ts": t, "ingested_at": t,
                      "raw_topic": topics.raw,
                      "raw_partition": part, "raw_offset": start + j, "features": records[i],
                      "_topic": topics.features, "_partition": part, "_offset": start + j}
                     for j, (i, t) in enumerate(zip(chunk, ts, strict=True))]
            store.write(spec.name, "features", topics.features, "bench", part, feats, fschema)
            # Scored the way the inference service does: one batch through Scorer.score.
            result = served.score([records[i] for i in chunk])
            assert (result.labels is not None and result.values is not None
                    and result.scores is not None)
            preds = [{"prediction_id": prediction_id(f"e{i}", NAME, 1, "champion"),
                      "event_id": f"e{i}",
                      "key": None, "model_name": NAME, "model_version": 1, "model_sha256": sha,
                      "variant": "champion", "served": True, "label": result.labels[j],
                      "value": result.values[j],
                      "scores": list(result.scores[j].items()), "features_topic": topics.features,
                      "features_partition": part, "features_offset": start + j, "event_ts": t,
                      "scored_at": t + 5,
                      "_topic": topics.predictions, "_partition": part, "_offset": start + j}
                     for j, (i, t) in enumerate(zip(chunk, ts, strict=True))]
            store.write(spec.name, "predictions", topics.predictions, "bench", part, preds,
                        lineage_rows.PREDICTIONS)
            # Late labels for a quarter of the events; the served label is right 85 % of the time.
            fb_idx = np.flatnonzero(rng.random(len(chunk)) < 0.25).tolist()
            flip = (rng.random(len(fb_idx)) < 0.15).tolist()
            fbs = [{"feedback_id": f"f{chunk[j]}",
                    "prediction_id": prediction_id(f"e{chunk[j]}", NAME, 1, "champion"),
                    "event_id": None,
                    "label": str(1 - int(result.labels[j])) if f else result.labels[j],
                    "value": None, "verdict": None, "ts": START_MS + chunk[j] + 60_000,
                    "_topic": topics.feedback, "_partition": part, "_offset": start + j}
                   for j, f in zip(fb_idx, flip, strict=True)]
            if fbs:
                store.write(spec.name, "feedback", topics.feedback, "bench", part, fbs,
                            lineage_rows.FEEDBACK)
            labeled += len(fbs)
        say(f"  partition {part}: {len(idx)} features + predictions written")
    return labeled


def raw_ort_rate(scorer: Scorer, records: list[dict[str, Any]]) -> float:
    """Events/s of bare ``session.run`` over the prepared
    matrix, in replay-sized batches (best of 3)."""
    name = scorer.session.get_inputs()[0].name
    x = scorer.feeds(records)[name]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for start in range(0, len(x), replay_mod.BATCH):
            scorer.session.run(None, {name: x[start:start + replay_mod.BATCH]})
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def read_rate(store: LineageStore, pipeline: str) -> float:
    """Events/s of only reading the audit's rows out of
    the store (the replay's query, drained, best of 3)."""
    best = float("inf")
    for _ in range(3):
        con = connect(store, pipeline)
        t0 = time.perf_counter()
        reader = con.sql(replay_mod._ROWS_SQL, params=[None, None, NAME, 1, None, None])
        rows = sum(batch.num_rows for batch in reader.to_arrow_reader(replay_mod.BATCH))
        best = min(best, time.perf_counter() - t0)
        con.close()
    assert rows == N, rows
    return N / best


def main() -> None:
    """Build the store, run the audit replay and the comparison, print rates and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_argument(parser, uses_broker=False)
    parser.parse_args()
    rng = np.random.default_rng(7)
    spec = make_spec()
    with tempfile.TemporaryDirectory(prefix="loopline-replay-bench-") as tmp:
        root = Path(tmp)
        say(f"building a lineage store of {N} events ({FEATURES} features, {PARTITIONS} "
            f"partitions) in {root}")
        t0 = time.perf_counter()
        records = features_table(spec, rng)
        reference = records[:2000]
        state = RegistryState()
        _, event = spec_event(spec)
        state.apply(event, 0)
        artifacts = ArtifactStore(str(root / "artifacts"))
        v1 = register(state, artifacts, spec, make_model(1), 1, "champion", reference, 1)
        register(state, artifacts, spec, make_model(2), 2, "shadow", reference, 2)
        served = replay_mod.load_scorer(state, spec.name, NAME, 1)
        store = LineageStore(root / "lineage")
        labeled = write_store(store, spec, served, records, v1["sha256"], rng)
        say(f"store ready in {time.perf_counter() - t0:.1f} s ({labeled} feedback rows)")

        raw = raw_ort_rate(served, records)
        del records, reference  # a replay process holds none of this: keep the GC's work realistic
        gc.collect()
        say(f"raw ONNX Runtime session.run, batches of {replay_mod.BATCH}: {raw:,.0f} events/s")

        read = read_rate(store, spec.name)
        say(f"reading the window from the store (DuckDB query only): {read:,.0f} events/s")

        def progress(done: int, total: int) -> None:
            if done == total or done % (replay_mod.BATCH * 4) == 0:
                say(f"  replayed {done}/{total}")

        audit = None
        for attempt in (1, 2):  # best of 2, like the limits (the machine is shared)
            say(f"replay {NAME}@1 (the served version: reproducibility audit), run {attempt}")
            report = replay_mod.replay(store, state, spec.name, (NAME, 1), progress=progress)
            side = report.sides[0]
            assert report.rows == N and side.logged == N, (report.rows, side.logged)
            assert side.reproduced == N and side.max_abs_diff == 0.0, (side.reproduced,
                                                                       side.max_abs_diff)
            assert report.labeled == labeled, (report.labeled, labeled)
            say(f"audit: {side.reproduced}/{side.logged} scores reproduced exactly, "
                f"accuracy {report.metric(side):.3f} on {report.labeled} labeled, "
                f"{report.events_per_s:,.0f} events/s")
            if audit is None or report.events_per_s > audit.events_per_s:
                audit = report
        assert audit is not None

        say(f"replay {NAME}@1 against {NAME}@2 (backtest)")
        cmp = replay_mod.replay(store, state, spec.name, (NAME, 1), against=(NAME, 2),
                                progress=progress)
        a, b = cmp.sides
        assert cmp.rows == N and a.reproduced == N and b.logged == 0
        say(f"comparison: agreement {cmp.agreement:.3f}, accuracy v1 {cmp.metric(a):.3f} v2 "
            f"{cmp.metric(b):.3f}")

        print()
        print(f"{'run':<34}{'events/s':>12}{'vs raw ORT':>12}")
        print(f"{'raw ORT session.run (1 model)':<34}{raw:>12,.0f}{1.0:>12.2f}")
        print(f"{'store read only (DuckDB query)':<34}{read:>12,.0f}{read / raw:>12.3f}")
        print(f"{'replay audit (1 version)':<34}{audit.events_per_s:>12,.0f}"
              f"{audit.events_per_s / raw:>12.3f}")
        print(f"{'replay v1 against v2 (2 versions)':<34}{cmp.events_per_s:>12,.0f}"
              f"{cmp.events_per_s / (raw / 2):>12.3f}  (limit: raw / 2 models)")
        print(f"replay audit / store read only: {audit.events_per_s / read:.2f} (near 1: reading "
              "the store is the bound; noisy on a shared machine)")
        goal = "met" if audit.events_per_s >= 100_000 else "NOT met"
        print(f"goal >= 100,000 events/s for a linear model: {goal}")


if __name__ == "__main__":
    main()
