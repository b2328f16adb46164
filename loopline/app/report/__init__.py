"""``loopline report``: one self-contained HTML page that tells a pipeline's story.

:func:`build` computes the data (:mod:`.data`), the story (:mod:`.story`) and the charts
(:mod:`.charts`) and lays them out (:mod:`.page`); :func:`write_report` also reads the registry
and the alerts from Kafka (:mod:`.sources`) and writes the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from loopline.app.report.charts import Chart, all_charts
from loopline.app.report.data import ReportData, collect
from loopline.app.report.page import render
from loopline.app.report.story import Story, tell
from loopline.registry import RegistryState
from loopline.services.lineage.store import LineageStore

__all__ = ["Report", "build", "write_report"]


@dataclass
class Report:
    """A built report: its data, story, charts and page."""

    data: ReportData
    story: Story
    charts: Sequence[Chart]
    html: str


def build(
    store: LineageStore,
    state: RegistryState,
    alerts: Sequence[Mapping[str, Any]],
    pipeline: str,
    since: datetime | None = None,
    until: datetime | None = None,
    now: datetime | None = None,
    sources: str = "",
) -> Report:
    """Compute and lay out the report of ``pipeline`` for the window [since, until)."""
    data = collect(store, state, alerts, pipeline, since, until, now)
    story = tell(data)
    charts = all_charts(data)
    sources = sources or f"lineage store {store.root}"
    return Report(data, story, charts, render(data, story, charts, sources))


def write_report(
    kafka: Any,
    store: LineageStore,
    pipeline: str,
    output: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    step: Callable[[str], None] = lambda _: None,
) -> Report:
    """Read the registry and alerts from Kafka, build the report and write it to ``output``."""
    from loopline.app.report.sources import read_alerts, read_registry

    step("reading the registry")
    state = read_registry(kafka)
    step("reading the alerts")
    alerts = read_alerts(kafka, pipeline)
    step("computing from the lineage store")
    report = build(
        store,
        state,
        alerts,
        pipeline,
        since,
        until,
        sources=f"lineage store {store.root}; registry and alerts on "
        f"{kafka.broker.bootstrap_servers}",
    )
    step(f"writing {output}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(report.html, encoding="utf-8")
    tmp.replace(output)  # a reader never sees half a report
    return report
