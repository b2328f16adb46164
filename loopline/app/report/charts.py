"""The report's charts as Plotly figures: one colour per version everywhere, one shared time axis.

Only SVG trace types are used (no WebGL), so every chart draws in any browser, GPU or not.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import plotly.graph_objects as go

from loopline.app.report.data import ReportData, model_id

#: Colour-blind-safe (Okabe-Ito, without its yellow), then two neutral extras.
VERSION_COLOURS = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#D55E00",
    "#56B4E9",
    "#7F7F7F",
    "#8C564B",
)
STAGE_COLOURS = {
    "champion": "#009E73",
    "challenger": "#0072B2",
    "canary": "#E69F00",
    "shadow": "#9E9AC8",
    "candidate": "#BDBDBD",
    "rejected": "#D55E00",
    "retired": "#737373",
}
FEATURE_COLOURS = (
    "#1F77B4",
    "#FF7F0E",
    "#2CA02C",
    "#D62728",
    "#9467BD",
    "#8C564B",
    "#E377C2",
    "#17BECF",
    "#BCBD22",
    "#7F7F7F",
)
ALERT_COLOUR, CHANGE_COLOUR = "#C0392B", "#2E7D32"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


@dataclass
class Chart:
    """One figure and the words around it."""

    key: str
    title: str
    caption: str
    figure: go.Figure
    height: int = 360


def when(ms: float) -> str:
    """Epoch ms as the UTC date text Plotly puts on a date axis."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def colours(data: ReportData) -> dict[str, str]:
    """A fixed colour per version, in registration order."""
    order = [v.model for v in data.versions]
    for r in data.traffic + data.performance_total:
        if r["model"] not in order:
            order.append(r["model"])
    return {m: VERSION_COLOURS[i % len(VERSION_COLOURS)] for i, m in enumerate(order)}


def _layout(
    fig: go.Figure, data: ReportData, y_title: str, *, time_axis: bool = True, height: int = 360
) -> None:
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 24, "t": 40, "b": 50},
        font={"family": FONT, "size": 13, "color": "#1F2933"},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
        hoverlabel={"font": {"family": FONT}},
        yaxis_title=y_title,
    )
    if time_axis:
        fig.update_xaxes(
            type="date",
            title_text="time (UTC)",
            showspikes=True,
            spikemode="across",
            spikethickness=1,
            spikecolor="#9AA5B1",
        )
        if data.range_ms is not None:
            fig.update_xaxes(range=[when(data.range_ms[0]), when(data.range_ms[1])])


def _markers(fig: go.Figure, data: ReportData, *, stages: bool = True, alerts: bool = True) -> None:
    """Alerts and stage changes as vertical lines, with hoverable symbols along the top."""
    if alerts:
        raised = [a for a in data.alerts if a["state"] == "raised"]
        for a in raised:
            fig.add_vline(
                x=when(a["at"]),
                line={"color": ALERT_COLOUR, "width": 1.5, "dash": "dash"},
                opacity=0.8,
            )
        if raised:
            fig.add_trace(
                go.Scatter(
                    x=[when(a["at"]) for a in raised],
                    y=[0.97] * len(raised),
                    yaxis="y9",
                    mode="markers",
                    name="alert raised",
                    marker={"symbol": "triangle-down", "size": 12, "color": ALERT_COLOUR},
                    text=[
                        f"{a['severity']} · {a['signal']}"
                        + (f" · {a['feature']}" if a.get("feature") else "")
                        + f"<br>{a['message']}"
                        for a in raised
                    ],
                    hovertemplate="%{text}<extra>alert %{x}</extra>",
                )
            )
    if stages:
        # New champions last, so their mark is on top when a promotion and a retirement coincide.
        moves = sorted(
            (c for c in data.stage_changes if c["to_stage"] != "candidate"),
            key=lambda c: (c["to_stage"] == "champion", c["at"]),
        )
        for c in moves:
            fig.add_vline(
                x=when(c["at"]),
                line={
                    "color": STAGE_COLOURS.get(c["to_stage"], CHANGE_COLOUR),
                    "width": 1.5,
                    "dash": "dot",
                },
                opacity=0.9,
            )
        if moves:
            fig.add_trace(
                go.Scatter(
                    x=[when(c["at"]) for c in moves],
                    y=[0.90] * len(moves),
                    yaxis="y9",
                    mode="markers",
                    name="stage change",
                    marker={
                        "symbol": "diamond",
                        "size": 11,
                        "color": [STAGE_COLOURS.get(c["to_stage"], CHANGE_COLOUR) for c in moves],
                        "line": {"width": 1, "color": "#FFFFFF"},
                    },
                    text=[
                        f"{c['model']}: {c['from_stage'] or 'new'} → {c['to_stage']}"
                        f"<br>{c['reason']}"
                        for c in moves
                    ],
                    hovertemplate="%{text}<extra>stage %{x}</extra>",
                )
            )
    # The symbols sit on a hidden axis of their own (0..1), whatever the chart's values are.
    fig.update_layout(
        yaxis9={"overlaying": "y", "range": [0, 1], "visible": False, "fixedrange": True}
    )


def _centre(data: ReportData, bucket: int) -> str:
    return when(bucket + data.bucket_ms / 2)


def performance_chart(data: ReportData) -> Chart | None:
    """Served accuracy (or MAE) per version over time, with alerts and stage changes."""
    if not data.performance:
        return None
    fig = go.Figure()
    colour = colours(data)
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in data.performance:
        if r["labeled"] >= 10:
            by_model[r["model"]].append(r)
    for model, rows in by_model.items():
        fig.add_trace(
            go.Scatter(
                x=[_centre(data, r["bucket"]) for r in rows],
                y=[r["value"] for r in rows],
                customdata=[r["labeled"] for r in rows],
                mode="lines+markers",
                name=model,
                line={"color": colour[model], "width": 2.5},
                marker={"size": 6},
                hovertemplate=f"{model}: %{{y:.3f}} (%{{customdata}} labels)<extra></extra>",
            )
        )
    _markers(fig, data)
    regression = data.regression
    _layout(fig, data, "mean absolute error" if regression else "served accuracy", height=400)
    if not regression:
        # From a round tenth below the lowest bucket: a drop from 99% to 88% must be visible.
        lowest = min(r["value"] for rows in by_model.values() for r in rows) if by_model else 0.0
        floor = max(0.0, math.floor((lowest - 0.05) * 10) / 10)
        fig.layout.yaxis.update(range=[floor, 1.02], tickformat=".0%")
    fig.update_layout(hovermode="x unified")
    what = (
        "mean absolute error of served values"
        if regression
        else "share of served predictions that were right"
    )
    return Chart(
        "performance",
        f"Served {data.metric} per version",
        f"The {what}, per {data.bucket_ms / 1000:g} s bucket of event time, from the feedback "
        "joined to each served prediction (buckets with 10+ labels). Dashed red lines: alerts "
        "raised; dotted lines: stage changes (hover the symbols at the top).",
        fig,
        400,
    )


def drift_charts(data: ReportData) -> list[Chart]:
    """PSI of every feature against each version's reference, over time."""
    warn, alert = data.spec.monitor.psi_warning, data.spec.monitor.psi_alert
    charts = []
    models = []
    for r in data.drift:
        if r["model"] not in models:
            models.append(r["model"])
    for model in models:
        fig = go.Figure()
        rows = [r for r in data.drift if r["model"] == model]
        features = sorted(
            {r["feature"] for r in rows}, key=[f.name for f in data.spec.features].index
        )
        top = max([r["psi"] for r in rows] + [alert * 1.3])
        for i, feature in enumerate(features):
            mine = [r for r in rows if r["feature"] == feature]
            fig.add_trace(
                go.Scatter(
                    x=[when(r["at"]) for r in mine],
                    y=[r["psi"] for r in mine],
                    customdata=[r["n"] for r in mine],
                    mode="lines+markers",
                    name=feature,
                    line={"color": FEATURE_COLOURS[i % len(FEATURE_COLOURS)], "width": 2},
                    marker={"size": 5},
                    hovertemplate=f"{feature}: PSI %{{y:.3f}} (last %{{customdata}} values)"
                    "<extra></extra>",
                )
            )
        # The levels as lines of their own, named in the legend (annotations misplace on log axes).
        span = (
            [when(data.range_ms[0]), when(data.range_ms[1])]
            if data.range_ms
            else [when(rows[0]["at"]), when(rows[-1]["at"])]
        )
        for level, value, colour, dash in (
            ("warning", warn, "#E69F00", "dot"),
            ("alert", alert, ALERT_COLOUR, "dash"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=span,
                    y=[value, value],
                    mode="lines",
                    name=f"{level} level {value:g}",
                    line={"color": colour, "dash": dash, "width": 1.5},
                    hoverinfo="skip",
                )
            )
        _markers(fig, data, stages=False)
        # A shifted feature's PSI runs into whole numbers while the thresholds sit at tenths: on a
        # log axis both stay readable.
        log = top > 1.0
        _layout(fig, data, f"PSI vs {model}'s reference" + (" (log scale)" if log else ""))
        if log:
            # Below a hundredth of the warning level nothing is drifting: no need for more decades.
            low = max(min([r["psi"] for r in rows if r["psi"] > 0] + [warn / 4]), warn / 100)
            fig.layout.yaxis.update(
                type="log",
                exponentformat="none",
                range=[math.log10(low / 1.5), math.log10(top * 1.5)],
            )
        else:
            fig.layout.yaxis.update(range=[0, top * 1.05])
        fig.update_layout(hovermode="x unified")
        charts.append(
            Chart(
                f"drift-{model}",
                f"Feature drift against {model}'s reference",
                f"Population stability index of the last {data.spec.monitor.window:,} values "
                f"of each feature that {model} scored (the monitor's window), every "
                f"{data.bucket_ms / 1000:g} s, against the reference profile registered with "
                "it; the monitor's PSI and the spec's levels. Keys and id-like features are not "
                "drift-tested, as in the monitor.",
                fig,
            )
        )
    return charts


def traffic_chart(data: ReportData) -> Chart | None:
    """Share of served predictions per version over time (the traffic split as it happened)."""
    if not data.traffic:
        return None
    fig = go.Figure()
    colour = colours(data)
    buckets = sorted({r["bucket"] for r in data.traffic})
    # Steps over each bucket [start, end): the last bucket's share is repeated at its end.
    edges = [*buckets, buckets[-1] + data.bucket_ms]
    for model in [m for m in colour if any(r["model"] == m for r in data.traffic)]:
        rows = {r["bucket"]: r["served"] for r in data.traffic if r["model"] == model}
        counts = [rows.get(b, 0) for b in buckets]
        fig.add_trace(
            go.Scatter(
                x=[when(b) for b in edges],
                y=[*counts, counts[-1]],
                mode="lines",
                name=model,
                stackgroup="traffic",
                groupnorm="percent",
                line={"color": colour[model], "width": 0.5, "shape": "hv"},
                fillcolor=colour[model],
                customdata=[*counts, counts[-1]],
                hovertemplate=f"{model}: %{{y:.1f}}% (%{{customdata}} served)<extra></extra>",
            )
        )
    _markers(fig, data, alerts=False)
    _layout(fig, data, "share of served predictions (%)", height=320)
    fig.layout.yaxis.update(range=[0, 100], ticksuffix="%")
    fig.update_layout(hovermode="x unified", legend_traceorder="normal")
    return Chart(
        "traffic",
        "Traffic split",
        "Which version served each event, as a share of the served predictions per bucket "
        "(shadows score but never serve). Dotted lines: stage changes.",
        fig,
        320,
    )


def latency_chart(data: ReportData) -> Chart | None:
    """Event-to-prediction latency percentiles of served predictions over time."""
    if not data.latency:
        return None
    fig = go.Figure()
    x = [_centre(data, r["bucket"]) for r in data.latency]
    for key, colour, dash in (
        ("p50", "#0072B2", "solid"),
        ("p95", "#E69F00", "dash"),
        ("p99", "#D55E00", "dot"),
    ):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=[r[key] for r in data.latency],
                customdata=[r["n"] for r in data.latency],
                mode="lines+markers",
                name=key,
                line={"color": colour, "width": 2, "dash": dash},
                marker={"size": 4},
                hovertemplate=f"{key}: %{{y:,.0f}} ms (%{{customdata}} served)<extra></extra>",
            )
        )
    _layout(fig, data, "latency (ms)", height=320)
    fig.layout.yaxis.update(rangemode="tozero")
    fig.update_layout(hovermode="x unified")
    return Chart(
        "latency",
        "Latency from event to prediction",
        "Percentiles of scored_at − event_ts of the served predictions, per bucket: the time "  # noqa: RUF001 - a real minus sign
        "an event took through ingest and inference.",
        fig,
        320,
    )


def distribution_chart(data: ReportData) -> Chart | None:
    """What each version predicted: class shares (classification) or value histograms."""
    colour = colours(data)
    fig = go.Figure()
    if data.regression:
        if not data.histograms:
            return None
        for h in data.histograms:
            edges = h["edges"]
            fig.add_trace(
                go.Bar(
                    x=[(a + b) / 2 for a, b in itertools.pairwise(edges)],
                    y=h["counts"],
                    width=[b - a for a, b in itertools.pairwise(edges)],
                    name=h["model"],
                    marker={"color": colour.get(h["model"], "#7F7F7F")},
                    opacity=0.6,
                    hovertemplate=f"{h['model']}: %{{y}} predictions near %{{x:.3g}}"
                    "<extra></extra>",
                )
            )
        _layout(fig, data, "predictions", time_axis=False)
        fig.update_layout(barmode="overlay", xaxis_title="predicted value")
        caption = "Histogram of every version's predicted values in the window (all variants)."
    else:
        rows = data.query.distribution
        if not rows:
            return None
        columns = []
        totals: dict[str, int] = defaultdict(int)
        for r in rows:
            col = f"{model_id(r['model_name'], r['model_version'])} · {r['variant']}"
            if col not in columns:
                columns.append(col)
            totals[col] += r["n"]
        labels = list(
            dict.fromkeys([*(data.spec.label.classes or []), *(r["label"] for r in rows)])
        )
        labels = [lab for lab in labels if any(r["label"] == lab for r in rows)]
        for i, lab in enumerate(labels):
            counts = {
                f"{model_id(r['model_name'], r['model_version'])} · {r['variant']}": r["n"]
                for r in rows
                if r["label"] == lab
            }
            share = [100 * counts.get(c, 0) / totals[c] for c in columns]
            fig.add_trace(
                go.Bar(
                    x=columns,
                    y=share,
                    name=f"label {lab}",
                    customdata=[counts.get(c, 0) for c in columns],
                    marker={"color": FEATURE_COLOURS[i % len(FEATURE_COLOURS)]},
                    text=[f"{s:.0f}%" if s >= 6 else "" for s in share],
                    textposition="inside",
                    hovertemplate=f"label {lab}: %{{y:.1f}}% (%{{customdata:,}} predictions)"
                    "<extra>%{x}</extra>",
                )
            )
        _layout(fig, data, "share of the version's predictions (%)", time_axis=False)
        fig.update_layout(barmode="stack", xaxis_title="version · variant")
        fig.layout.yaxis.update(range=[0, 100], ticksuffix="%")
        caption = (
            "Predicted class shares per version and variant in the window; the counts are "
            "the output distribution of loopline lineage query (table below)."
        )
    return Chart("distribution", "Prediction distribution per version", caption, fig)


def timeline_chart(data: ReportData) -> Chart | None:
    """Each version's stages over time, with alerts."""
    if not data.timeline:
        return None
    fig = go.Figure()
    shown: set[str] = set()
    order = list(dict.fromkeys(s["model"] for s in data.timeline))
    for s in data.timeline:
        stage = s["stage"]
        traffic = f", traffic {s['traffic']:.0%}" if stage in ("challenger", "canary") else ""
        fig.add_trace(
            go.Bar(
                y=[s["model"]],
                x=[max(s["end"] - s["start"], 1)],
                base=[when(s["start"])],
                orientation="h",
                name=stage,
                legendgroup=stage,
                showlegend=stage not in shown,
                marker={"color": STAGE_COLOURS.get(stage, "#7F7F7F"), "line": {"width": 0}},
                hovertemplate=f"{s['model']}: {stage}{traffic}<br>from {when(s['start'])[:19]} "
                f"to {when(s['end'])[:19]}<extra></extra>",
            )
        )
        shown.add(stage)
    _markers(fig, data, stages=False)
    height = max(220, 70 + 44 * len(order))
    _layout(fig, data, "version", height=height)
    fig.layout.yaxis.update(categoryorder="array", categoryarray=order[::-1])
    fig.update_layout(barmode="overlay", bargap=0.35)
    return Chart(
        "timeline",
        "Version timeline",
        "Each version's stage from its registration on (green: champion; blue: challenger; "
        "purple: shadow; red: rejected; grey: retired). Dashed red lines: alerts.",
        fig,
        height,
    )


def all_charts(data: ReportData) -> Sequence[Chart]:
    """Every chart the report has data for, in reading order."""
    found = [
        performance_chart(data),
        *drift_charts(data),
        traffic_chart(data),
        latency_chart(data),
        distribution_chart(data),
        timeline_chart(data),
    ]
    return [c for c in found if c is not None]
