"""The report in a real browser: Chromium draws every chart, logs no error, fetches nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import report_scenario as sc
from chromium_harness import render

from loopline.app.report import build


def check_drawn(charts: list[dict[str, Any]], keys: list[str]) -> None:
    """Every chart drew every trace it was given, in a box of real size, with axis titles."""
    assert [c["id"] for c in charts] == [f"plot-{k}" for k in keys]
    for c in charts:
        assert c["drawn"] == "true", c
        assert c["svgs"] >= 1 and c["width"] > 300 and c["height"] > 150, c
        assert c["given"] > 0 and c["painted"] == c["given"], c  # no empty or failed trace
        assert c["ytitle"] and c["legend"], c


def test_every_chart_draws_offline_without_a_script_error(
    tmp_path: Path, record_property: Any
) -> None:
    scenario = sc.build(tmp_path / "lineage")
    report = build(
        scenario.store,
        scenario.state,
        scenario.alerts,
        sc.PIPELINE,
        now=datetime(2026, 1, 5, 10, 6, tzinfo=UTC),
    )
    page = tmp_path / "report.html"
    page.write_text(report.html, encoding="utf-8")
    shown = render(page, tmp_path / "report.png")
    record_property("screenshot", str(shown.screenshot))
    print(f"screenshot: {shown.screenshot}")
    assert shown.state == "drawn" and not shown.errors, shown.errors
    assert shown.requests == [page.resolve().as_uri()]  # the page itself and nothing else
    check_drawn(shown.charts, [c.key for c in report.charts])
    legends = {c["id"]: c["legend"] for c in shown.charts}
    assert {"shop/1", "shop/2", "alert raised", "stage change"} <= set(legends["plot-performance"])
    assert {"x1", "x2", "flag", "warning level 0.1", "alert level 0.25"} <= set(
        legends["plot-drift-shop/1"]
    )
    png = shown.screenshot.read_bytes() if shown.screenshot else b""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1280 and height > 4000  # the whole page, not the first screen


def test_the_check_fails_on_a_chart_that_did_not_draw_and_on_a_script_error(tmp_path: Path) -> None:
    scenario = sc.build(tmp_path / "lineage")
    report = build(
        scenario.store,
        scenario.state,
        scenario.alerts,
        sc.PIPELINE,
        now=datetime(2026, 1, 5, 10, 6, tzinfo=UTC),
    )
    # The first chart's two version traces lose their points (Plotly draws nothing for them,
    # without an error), and a script fails after the charts.
    head, marker, rest = report.html.partition('id="loopline-figures">')
    figures, end, tail = rest.partition("</script>")
    parsed = orjson.loads(figures)
    for trace in parsed[0]["figure"]["data"][:2]:
        trace["x"], trace["y"] = [], []
    broken = head + marker + orjson.dumps(parsed).decode() + end + tail
    broken = broken.replace("</body>", "<script>window.noSuchFunction();</script></body>")
    page = tmp_path / "broken.html"
    page.write_text(broken, encoding="utf-8")
    shown = render(page, tmp_path / "broken.png")
    assert any("noSuchFunction" in e for e in shown.errors), shown.errors
    with pytest.raises(AssertionError):
        check_drawn(shown.charts, [c.key for c in report.charts])
    failed = [c for c in shown.charts if c["painted"] < c["given"]]
    assert failed and failed[0]["id"] == "plot-performance"
