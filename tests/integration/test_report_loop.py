"""`loopline report` on data made by the real services: ingest, inference, monitor and lineage.

A first model serves; the inputs drift (x1 moves up) and so does the concept; the monitor alerts; a
second version joins as a challenger and is promoted. The report's numbers must be `loopline
lineage query`'s, and headless Chromium must draw every chart of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from chromium_harness import render
from click.testing import CliRunner
from services_harness import ServiceThread
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from loopline import feedback as fb
from loopline.app.cli import main as cli
from loopline.app.report.sources import read_alerts
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import AckedProducer, KafkaConfig
from loopline.models import ModelRegistry, NewVersion
from loopline.services.lineage.query import connect
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

pytestmark = pytest.mark.integration
DRIFT, CHALLENGER, PROMOTION, TOTAL, CHUNK = 600, 800, 1000, 1200, 100


def rows(start: int, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Events from ``start``: x1 moves up by 5 and the label's threshold with it at DRIFT."""
    out = []
    for i in range(start, start + n):
        shift = 5.0 if i >= DRIFT else 0.0
        x1, x2 = float(rng.uniform(0, 10) + shift), float(rng.uniform(0, 10))
        out.append({"user": f"u{i % 97}", "x1": x1, "x2": x2, "y": str(int(x1 + x2 > 10 + shift))})
    return out


def model(data: list[dict[str, Any]]) -> bytes:
    x = np.array([[r["x1"], r["x2"]] for r in data], dtype=np.float32)
    y = np.array([int(r["y"]) for r in data])
    return to_onnx(
        LogisticRegression().fit(x, y), x[:1], options={"zipmap": False}
    ).SerializeToString()


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s"
        time.sleep(0.2)


def stored(store: LineageStore, pipeline: str, sql: str) -> int:
    if pipeline not in store.pipelines():
        return 0
    con = connect(store, pipeline)
    try:
        return int(con.execute(sql).fetchone()[0])  # type: ignore[index]  # the query returns a row
    finally:
        con.close()


@pytest.fixture
def services(
    settings: LooplineSettings, kafka: KafkaConfig, unique: str, tmp_path: Path
) -> Iterator[tuple[PipelineSpec, LineageStore]]:
    from loopline.services.inference.settings import InferenceSettings
    from loopline.services.ingest.settings import IngestSettings
    from loopline.services.monitor.settings import MonitorSettings

    spec = parse_spec(
        {
            "name": unique,
            "key": "user",
            "partitions": 1,
            "features": [
                {"name": "user", "type": "string"},
                {"name": "x1", "type": "float"},
                {"name": "x2", "type": "float"},
            ],
            "label": {"name": "y", "classes": ["0", "1"], "positive": "1"},
            "monitor": {"window": 200, "detectors": ["adwin"], "error_detectors": ["ddm"]},
        }
    )
    apply_spec(kafka, spec)
    common = {
        "bootstrap_servers": settings.bootstrap_servers,
        "kafka_profile": settings.kafka_profile,
        "session_timeout_ms": 6000,
        "home": tmp_path,
        "pipelines": [unique],
        "log_level": "WARNING",
    }
    lineage = LineageSettings(
        **common, group_id=f"{unique}-lineage", flush_rows=100, flush_interval_s=0.3
    )
    threads = [
        ServiceThread(
            "ingest",
            IngestSettings(
                **common, group_id=f"{unique}-ingest", registry_poll_s=0.2, batch_size=200
            ),
        ),
        ServiceThread(
            "inference",
            InferenceSettings(**common, group_id=f"{unique}-inference", registry_poll_s=0.1),
        ),
        ServiceThread(
            "monitor",
            MonitorSettings(**common, group_id=f"{unique}-monitor", checkpoint_interval_s=1.0),
        ),
        ServiceThread("lineage", lineage),
    ]
    try:
        yield spec, LineageStore(lineage.store_dir()), threads[1]
    finally:
        for t in threads:
            t.stop.set()
        for t in threads:
            t.thread.join(60)


def test_report_of_a_real_loop_equals_lineage_query_and_draws_in_chromium(
    services: tuple[PipelineSpec, LineageStore, ServiceThread],
    kafka: KafkaConfig,
    settings: LooplineSettings,
    tmp_path: Path,
    record_property: Callable[[str, Any], None],
) -> None:
    spec, store, inference = services
    name = spec.name
    rng = np.random.default_rng(3)
    data = rows(0, TOTAL, rng)
    registry = ModelRegistry(kafka, ArtifactStore(str(tmp_path / "artifacts")), actor="test")
    features = [{k: r[k] for k in ("user", "x1", "x2")} for r in data]
    registry.register(name, model(data[:DRIFT]), NewVersion(reference=features[:DRIFT]))
    producer = AckedProducer(kafka.producer("test-report"))
    served_sql = "SELECT count(DISTINCT event_id) FROM predictions WHERE served"
    for start in range(0, TOTAL, CHUNK):
        if start == CHALLENGER:  # trained after the drift, on the drifted data
            registry.register(
                name,
                model(data[DRIFT:CHALLENGER]),
                NewVersion(stage="challenger", traffic=0.5, reference=features[DRIFT:CHALLENGER]),
            )
            # Versions load in the background: the challenger takes its keys once it is warm.
            wait_for(lambda: inference.metric("loopline_inference_model_info", pipeline=name,
                                              variant="challenger", model_version="2") == 1,
                     "the challenger loaded and taking traffic")
        if start == PROMOTION:
            registry.promote(name, 2, reason="the challenger wins on live feedback")
        for i in range(start, start + CHUNK):
            event = {"event_id": f"e{i}", "key": data[i]["user"], "features": features[i]}
            producer.send(spec.topics.raw, orjson.dumps(event), key=data[i]["user"])
        producer.confirm()
        wait_for(
            lambda upto=start + CHUNK: stored(store, name, served_sql) >= upto,
            f"events up to {start + CHUNK} served and stored",
        )
        for i in range(start, start + CHUNK):  # labels come back once the chunk is served
            record = fb.make(event_id=f"e{i}", label=data[i]["y"], feedback_id=f"f{i}")
            producer.send(spec.topics.feedback, fb.encode(record), key=f"e{i}")
        producer.confirm()
    wait_for(
        lambda: stored(store, name, "SELECT count(*) FROM feedback") >= TOTAL, "feedback stored"
    )
    wait_for(
        lambda: any(
            a["signal"] == "drift" and a["feature"] == "x1" and a["state"] == "raised"
            for a in read_alerts(kafka, name)
        ),
        "the monitor's drift alert on x1",
    )

    env = {
        "LOOPLINE_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "LOOPLINE_KAFKA_PROFILE": settings.kafka_profile,
        "LOOPLINE_HOME": str(tmp_path),
        "COLUMNS": "200",
    }
    page = tmp_path / "report.html"
    made = CliRunner().invoke(cli, ["report", name, "-o", str(page)], env=env)
    assert made.exit_code == 0, made.output
    assert "report written to" in made.output and page.exists()
    html = page.read_text(encoding="utf-8")
    queried = CliRunner().invoke(cli, ["lineage", "query", name, "--format", "json"], env=env)
    assert queried.exit_code == 0, queried.output
    theirs, mine = orjson.loads(queried.output), embedded(html)
    same(mine["lineage_query"]["summary"], theirs["summary"])
    assert theirs["summary"]["served"] == TOTAL and theirs["summary"]["events"] == TOTAL
    assert [
        (r["model_version"], r["variant"], r["label"], r["n"])
        for r in mine["lineage_query"]["distribution"]
    ] == [(r["model_version"], r["variant"], r["label"], r["n"]) for r in theirs["distribution"]]
    # Served performance per version: v1 clearly worse after the drift than v2, both labeled.
    served = {r["model"]: r for r in mine["served"]}
    assert set(served) == {f"{name}/1", f"{name}/2"}
    assert sum(r["labeled"] for r in served.values()) == TOTAL
    assert served[f"{name}/2"]["value"] > served[f"{name}/1"]["value"]
    # Both versions were measured beside the champion at registration; the report carries that.
    profiles = {v["model"]: v["profile"] for v in mine["versions"]}
    assert profiles[f"{name}/1"] and profiles[f"{name}/2"]["profile.champion_version"] == 1.0
    assert mine["charts"] == [
        "performance",
        f"drift-{name}/1",
        f"drift-{name}/2",
        "traffic",
        "latency",
        "distribution",
        "timeline",
    ]
    facts = mine["facts"]
    assert facts["first_alert_at"] and facts["promoted_at"] > facts["first_alert_at"]

    # A window: the report from the drift on says what `lineage query --since` says.
    since = datetime.fromtimestamp(_event_ms(store, name, f"e{DRIFT}") / 1000, UTC).isoformat()
    windowed = CliRunner().invoke(
        cli, ["report", name, "--since", since, "-o", str(tmp_path / "w.html")], env=env
    )
    assert windowed.exit_code == 0, windowed.output
    theirs = orjson.loads(
        CliRunner()
        .invoke(cli, ["lineage", "query", name, "--since", since, "--format", "json"], env=env)
        .output
    )
    same(
        embedded((tmp_path / "w.html").read_text(encoding="utf-8"))["lineage_query"]["summary"],
        theirs["summary"],
    )
    assert theirs["summary"]["served"] == TOTAL - DRIFT

    shown = render(page, tmp_path / "report.png")
    record_property("screenshot", str(shown.screenshot))
    print(f"screenshot: {shown.screenshot}")
    assert shown.state == "drawn" and not shown.errors, shown.errors
    assert shown.requests == [page.resolve().as_uri()]
    for chart in shown.charts:
        assert chart["drawn"] == "true" and chart["svgs"] >= 1, chart
        assert chart["given"] > 0 and chart["painted"] == chart["given"], chart
    legend = next(c["legend"] for c in shown.charts if c["id"] == "plot-performance")
    assert {f"{name}/1", f"{name}/2", "alert raised", "stage change"} <= set(legend)


def _event_ms(store: LineageStore, pipeline: str, event_id: str) -> int:
    con = connect(store, pipeline)
    try:
        return int(
            con.execute(
                "SELECT min(epoch_ms(event_ts)) FROM predictions WHERE event_id = ?", [event_id]
            ).fetchone()[0]
        )  # type: ignore[index]  # the query returns a row
    finally:
        con.close()


def embedded(page: str) -> dict[str, Any]:
    """The machine-readable numbers the page carries."""
    start = page.index('<script type="application/json" id="loopline-report-data">')
    body = page[page.index(">", start) + 1 : page.index("</script>", start)]
    return orjson.loads(body)  # type: ignore[no-any-return]  # JSON is Any


def same(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Equal, floats to 1e-9: DuckDB sums in parallel, in an order that varies by the last bit."""
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert mine[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert mine[key] == value, key
