"""`loopline report` computed from a lineage store and a registry written directly (no broker)."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import report_scenario as sc
from click.testing import CliRunner

from loopline.app.cli import main as cli
from loopline.app.report import Report, build
from loopline.app.report.story import tell
from loopline.profile import bin_fractions
from loopline.registry import RegistryState, spec_event
from loopline.services.lineage import rows
from loopline.services.lineage.query import connect
from loopline.services.lineage.store import LineageStore
from loopline.services.monitor.windowed import psi
from loopline.spec import parse_spec

NOW = datetime(2026, 1, 5, 10, 6, tzinfo=UTC)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> sc.Scenario:
    return sc.build(tmp_path_factory.mktemp("home") / "lineage")


@pytest.fixture(scope="module")
def report(scenario: sc.Scenario) -> Report:
    return build(scenario.store, scenario.state, scenario.alerts, sc.PIPELINE, now=NOW)


def embedded(page: str) -> dict[str, Any]:
    """The machine-readable numbers the page carries."""
    found = re.search(
        r'<script type="application/json" id="loopline-report-data">(.*?)</script>', page, re.DOTALL
    )
    assert found, "the page carries no report data"
    return orjson.loads(found.group(1))  # type: ignore[no-any-return]  # JSON is Any


def lineage_query(root: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli,
        ["lineage", "query", sc.PIPELINE, "--format", "json", *args],
        env={"LOOPLINE_HOME": str(root.parent), "LOOPLINE_LINEAGE_DIR": str(root)},
    )
    assert result.exit_code == 0, result.output
    return orjson.loads(result.output)  # type: ignore[no-any-return]  # JSON is Any


def same(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Equal, floats to 1e-9: DuckDB sums in parallel, in an order that varies by the last bit."""
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert mine[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert mine[key] == value, key


@pytest.mark.parametrize("since", [None, datetime(2026, 1, 5, 10, 1, 30, tzinfo=UTC)])
def test_the_numbers_are_lineage_querys(scenario: sc.Scenario, since: datetime | None) -> None:
    built = build(
        scenario.store, scenario.state, scenario.alerts, sc.PIPELINE, since=since, now=NOW
    )
    cli_says = lineage_query(
        scenario.store.root, *(["--since", since.isoformat()] if since else [])
    )
    page = embedded(built.html)["lineage_query"]
    same(page["summary"], cli_says["summary"])
    assert len(page["distribution"]) == len(cli_says["distribution"])
    for mine, theirs in zip(page["distribution"], cli_says["distribution"], strict=True):
        same(mine, theirs)
    served = cli_says["summary"]["served"]
    assert served == (3000 if since is None else 3000 - 900)
    # What the person reads, and every per-version count, adds up to the same numbers.
    assert f"<td>{served:,}</td>" in built.html
    assert sum(r["served"] for r in built.data.traffic) == served
    assert sum(r["n"] for r in built.data.latency_by_version) == cli_says["summary"]["predictions"]


def test_served_accuracy_per_version_is_the_first_feedback_on_each_event(
    scenario: sc.Scenario, report: Report
) -> None:
    expected: dict[str, list[bool]] = {}
    for i, model, label in scenario.served:
        expected.setdefault(model, []).append(label == scenario.truth[i])
    got = {r["model"]: r for r in report.data.performance_total}
    assert set(got) == set(expected)
    for model, right in expected.items():
        # Labels by event id, by prediction id and accept/reject verdicts all count; the late
        # relabel of e1 ("maybe") does not: the first feedback on an event is its truth.
        assert got[model]["labeled"] == len(right)
        assert got[model]["value"] == pytest.approx(sum(right) / len(right))
    assert sum(r["labeled"] for r in report.data.performance) == len(scenario.served)


def test_feature_drift_is_the_monitors_psi_against_each_versions_reference(
    scenario: sc.Scenario, report: Report
) -> None:
    drift = report.data.drift
    assert {r["feature"] for r in drift} == {
        "x1",
        "x2",
        "flag",
    }  # the key `user` is not drift-tested
    v1 = [r for r in drift if r["model"] == "shop/1" and r["feature"] == "x1"]
    # Recompute the last comparison by hand: v1's last 1000 scored x1 values against its reference.
    con = connect(scenario.store, sc.PIPELINE)
    values = np.array(
        [
            r[0]
            for r in con.execute(
                "SELECT f.features.x1 FROM (SELECT DISTINCT event_id, event_ts FROM predictions "
                "WHERE model_version = 1) p JOIN features f USING (event_id) "
                "ORDER BY p.event_ts, event_id"
            ).fetchall()
        ]
    )
    ref = orjson.loads(
        scenario.state.versions[(sc.PIPELINE, sc.PIPELINE, 1)]["reference_profile_json"]
    )
    x1 = ref["features"]["x1"]
    want = psi(np.asarray(x1["fractions"]), np.asarray(bin_fractions(values[-1000:], x1["edges"])))
    assert v1[-1]["psi"] == pytest.approx(want) and v1[-1]["n"] == 1000
    drifted_at = sc.T0 + sc.DRIFT_AT * sc.EVERY_MS
    warn = sc.SPEC.monitor.psi_warning
    assert all(r["psi"] < warn for r in drift if r["model"] == "shop/1" and r["at"] < drifted_at)
    assert max(r["psi"] for r in v1) > sc.SPEC.monitor.psi_alert
    # v2's reference is the drifted data: against it, x1 is where it should be by the end.
    assert [r for r in drift if r["model"] == "shop/2" and r["feature"] == "x1"][-1]["psi"] < warn


def test_latency_traffic_and_timeline(scenario: sc.Scenario, report: Report) -> None:
    con = connect(scenario.store, sc.PIPELINE)
    ms = np.array(
        [
            r[0]
            for r in con.execute(
                "SELECT epoch_ms(scored_at) - epoch_ms(event_ts) FROM predictions WHERE served"
            ).fetchall()
        ]
    )
    lat = report.data.latency_total
    assert (lat["n"], lat["max"]) == (ms.size, ms.max())
    assert lat["p50"] == pytest.approx(np.percentile(ms, 50)) and lat["p99"] == pytest.approx(
        np.percentile(ms, 99)
    )
    by_model: dict[str, int] = {}
    for r in report.data.traffic:
        by_model[r["model"]] = by_model.get(r["model"], 0) + r["served"]
    assert by_model == {"shop/1": 2000, "shop/2": 1000}
    spans = [(s["model"], s["stage"], s["start"], s["end"]) for s in report.data.timeline]
    end = int(NOW.timestamp() * 1000)
    assert spans == [
        ("shop/1", "champion", sc.T0 - 5000, sc.PROMOTED_AT),
        ("shop/2", "shadow", sc.REGISTERED_AT, sc.PROMOTED_AT),
        ("shop/2", "champion", sc.PROMOTED_AT, end),
        ("shop/1", "retired", sc.PROMOTED_AT, end),
    ]


def test_the_story_tells_change_alert_registration_promotion_and_accuracy(report: Report) -> None:
    facts, lines = report.story.facts, report.story.lines
    bucket = report.data.bucket_ms
    drifted_at = sc.T0 + sc.DRIFT_AT * sc.EVERY_MS
    assert abs(facts["performance_change_at"] - drifted_at) <= bucket
    assert drifted_at <= facts["feature_drift_at"] < sc.ALERT_AT  # the window had to fill first
    assert facts["onset_at"] == min(facts["performance_change_at"], facts["feature_drift_at"])
    assert (facts["first_alert_at"], facts["promoted_at"]) == (sc.ALERT_AT, sc.PROMOTED_AT)
    assert facts["served_before_the_change"] > 0.85
    assert facts["served_from_the_change_to_the_promotion"] < 0.75
    assert facts["served_after_the_promotion"] > 0.85
    text = "\n".join(lines)
    for expected in (
        "First alert at 10:02:20",
        "[drift, psi, x1]",
        "shop/2 registered at 10:02:50 (trigger drift)",
        "scorecard accepted",
        "shop/2 became champion at 10:03:20",
        "+60 s after the first alert",
        "shop/2 measured 465.0x slower than champion v1",
    ):
        assert expected in text, text
    assert [t[0] for t in report.story.tiles][:2] == ["served predictions", "served accuracy"]


def test_the_story_tells_registrations_and_the_promotion_in_time_order(report: Report) -> None:
    later = dataclasses.replace(report.data.versions[-1], model="shop/3", trigger="schedule",
                                created_at=sc.PROMOTED_AT + 30_000, scorecard=None, profile=None)
    data = dataclasses.replace(report.data, versions=[*report.data.versions, later])
    lines = tell(data).lines
    order = [next(i for i, line in enumerate(lines) if line.startswith(start))
             for start in ("shop/2 registered at", "shop/2 became champion",
                           "shop/3 registered at")]
    assert order == sorted(order), lines


def test_versions_show_scorecards_with_every_contender_and_profiles(report: Report) -> None:
    page = report.html
    for expected in (
        "sklearn-gbt",
        "did not converge",
        "river-lr ★",
        "holdout of 200 labels",
        "465.0x champion v1&#x27;s latency",
        "107,000 rows/s",
        "user upload",
    ):
        assert expected in page, expected
    assert (
        "profile.latency_p99_ms" not in page.split('id="loopline-report-data"')[0]
    )  # not a "metric"


def test_the_page_is_self_contained(report: Report) -> None:
    page = report.html
    # Nothing to fetch: no external script, stylesheet, image or font; Plotly's code is inlined.
    assert not re.search(r"<(script|img|iframe)[^>]+src=", page)
    assert (
        not re.search(r"<link[^>]+href=", page) and "@import" not in page and "url(http" not in page
    )
    assert len(page) > 3_000_000 and "plotly.js v" in page[:5_000_000]
    keys = [c.key for c in report.charts]
    assert keys == [
        "performance",
        "drift-shop/1",
        "drift-shop/2",
        "traffic",
        "latency",
        "distribution",
        "timeline",
    ]
    for key in keys:
        assert f'id="plot-{key}"' in page
    figures = re.search(r'id="loopline-figures">(.*?)</script>', page, re.DOTALL)
    assert figures and [f["key"] for f in orjson.loads(figures.group(1))] == keys


def test_a_regression_pipeline_reports_mean_absolute_error(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "price",
            "features": [{"name": "x", "type": "float"}],
            "label": {"task": "regression"},
        }
    )
    state = RegistryState()
    state.apply(spec_event(spec)[1], 0)
    store = LineageStore(tmp_path)
    predictions, feedback, errors = [], [], []
    for i in range(400):
        value, truth = float(i % 50), float(i % 50) + (1.0 if i % 2 else -3.0)
        errors.append(abs(value - truth))
        predictions.append(
            {
                "prediction_id": f"p{i}",
                "event_id": f"e{i}",
                "key": None,
                "model_name": "price",
                "model_version": 1,
                "model_sha256": "0" * 64,
                "variant": "champion",
                "served": True,
                "label": None,
                "value": value,
                "scores": [],
                "features_topic": "t",
                "features_partition": 0,
                "features_offset": i,
                "event_ts": sc.T0 + i * 100,
                "scored_at": sc.T0 + i * 100 + 7,
                "_topic": "loopline.price.predictions",
                "_partition": 0,
                "_offset": i,
            }
        )
        feedback.append(
            {
                "feedback_id": f"f{i}",
                "prediction_id": f"p{i}",
                "event_id": None,
                "label": None,
                "value": truth,
                "verdict": None,
                "ts": sc.T0 + i * 100 + 500,
                "_topic": "loopline.price.feedback",
                "_partition": 0,
                "_offset": i,
            }
        )
    store.write(
        "price", "predictions", "loopline.price.predictions", "x", 0, predictions, rows.PREDICTIONS
    )
    store.write("price", "feedback", "loopline.price.feedback", "x", 0, feedback, rows.FEEDBACK)
    built = build(store, state, [], "price", now=NOW)
    assert built.data.metric == "MAE"
    [total] = built.data.performance_total
    assert total["labeled"] == 400 and total["value"] == pytest.approx(np.mean(errors))
    assert [c.key for c in built.charts] == ["performance", "traffic", "latency", "distribution"]
    [hist] = built.data.histograms
    assert sum(hist["counts"]) == 400
    assert "mean absolute error" in built.html and "No model version registered" in built.html


def test_keys_and_id_like_features_get_no_drift_chart_as_in_the_monitor() -> None:
    from loopline.app.report.data import drift_features
    from loopline.profile import build_profile
    from loopline.services.monitor.pipeline import drift_tested
    from loopline.spec import parse_spec

    spec = parse_spec({"name": "fraud", "key": "customer_id", "label": {"classes": ["0", "1"]},
                       "features": [{"name": "customer_id", "type": "string"},
                                    {"name": "device_id", "type": "string"},
                                    {"name": "country", "type": "string"},
                                    {"name": "amount", "type": "float"}]})
    columns = {"customer_id": [f"c{i}" for i in range(300)],
               "device_id": [f"d{i}" for i in range(300)],  # an id: every value distinct
               "country": ["DE" if i % 3 else "FR" for i in range(300)],
               "amount": [float(i % 17) for i in range(300)]}
    reference = build_profile(columns, {f.name: f.type for f in spec.features})["features"]
    assert drift_features(spec, reference) == ["country", "amount"]
    assert drift_features(spec, reference) == [
        f.name for f in spec.features if drift_tested(spec, f.name, reference[f.name])]
