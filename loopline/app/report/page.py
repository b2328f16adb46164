"""The report as one self-contained HTML page: styles, Plotly's JavaScript and the data inlined.

Nothing is fetched when the page opens (no CDN, no web font), so it reads the same offline, from a
mail attachment or an artifact store. Every chart records whether it drew (``data-drawn`` on its
element, ``data-charts`` on the body) and says so in its box if it could not; time charts share
one axis and zoom together.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import plotly.io as pio
from plotly.offline import get_plotlyjs

from loopline.app.report.charts import STAGE_COLOURS, Chart
from loopline.app.report.data import ReportData, VersionInfo
from loopline.app.report.story import Story, clock
from loopline.model_profile import human_bytes

_CSS = """
:root { --ink: #1F2933; --muted: #52606D; --line: #E4E7EB; --bg: #F5F7FA; --accent: #0B69A3; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
header { margin-bottom: 18px; }
.brand { color: var(--accent); font-weight: 600; letter-spacing: .06em; text-transform: uppercase;
  font-size: 12px; }
h1 { margin: 4px 0 6px; font-size: 28px; }
h2 { margin: 0 0 4px; font-size: 19px; }
h3 { margin: 14px 0 6px; font-size: 15px; }
.meta, .caption { color: var(--muted); margin: 0; font-size: 13.5px; }
.caption { margin-bottom: 10px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px;
  margin: 16px 0; box-shadow: 0 1px 2px rgba(16, 42, 67, .05); }
.story ol { margin: 8px 0 0; padding-left: 22px; }
.story li { margin: 4px 0; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 12px; }
.tile { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; }
.tile .label { color: var(--muted); font-size: 12.5px; text-transform: uppercase;
  letter-spacing: .04em; }
.tile .value { font-size: 24px; font-weight: 650; margin: 2px 0; }
.tile .note { color: var(--muted); font-size: 12.5px; }
.plot { width: 100%; }
.failed { color: #B42318; font-weight: 600; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 6px 0 4px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; background: #FAFBFC; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; color: #fff;
  font-size: 12px;
  font-weight: 600; }
.ok { color: #1B7F3B; font-weight: 600; } .bad { color: #B42318; font-weight: 600; }
.versions { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 12px; }
.version { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.version dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 8px 0 0;
  font-size: 13.5px; }
.version dt { color: var(--muted); } .version dd { margin: 0; overflow-wrap: anywhere; }
.warn { color: #9A6700; font-weight: 600; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
footer { color: var(--muted); font-size: 12.5px; margin-top: 24px; }
"""

_LOADER = """
(function () {
  "use strict";
  var figures = JSON.parse(document.getElementById("loopline-figures").textContent);
  var config = {displaylogo: false, responsive: true,
                modeBarButtonsToRemove: ["select2d", "lasso2d"]};
  var timeCharts = [], syncing = false;
  function sync(source, ev) {
    if (syncing) { return; }
    var update;
    if (ev["xaxis.autorange"]) { update = {"xaxis.range": window.looplineRange.slice()}; }
    else if (ev["xaxis.range[0]"] !== undefined) {
      update = {"xaxis.range": [ev["xaxis.range[0]"], ev["xaxis.range[1]"]]};
    } else if (ev["xaxis.range"]) { update = {"xaxis.range": ev["xaxis.range"]}; }
    else { return; }
    syncing = true;
    var others = timeCharts.filter(function (c) { return c !== source || ev["xaxis.autorange"]; });
    Promise.all(others.map(function (c) { return Plotly.relayout(c, update); }))
      .then(function () { syncing = false; }, function () { syncing = false; });
  }
  var drawing = figures.map(function (f) {
    var el = document.getElementById("plot-" + f.key);
    var done;
    try {
      done = Plotly.newPlot(el, f.figure.data, f.figure.layout, config);
    } catch (err) {
      done = Promise.reject(err);
    }
    return done.then(function () {
      el.dataset.drawn = "true";
      if (f.time) {
        timeCharts.push(el);
        el.on("plotly_relayout", function (ev) { sync(el, ev); });
      }
    }, function (err) {
      el.dataset.drawn = "failed";
      el.innerHTML = "";
      var p = document.createElement("p");
      p.className = "failed";
      p.textContent = "This chart could not be drawn: " + err;
      el.appendChild(p);
      throw err;
    });
  });
  Promise.all(drawing).then(function () { document.body.dataset.charts = "drawn"; },
                            function () { document.body.dataset.charts = "failed"; });
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _json_script(element_id: str, payload: str) -> str:
    # "</" inside a script element would end it; "<\\/" is the same JSON string.
    safe = payload.replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{safe}</script>'


def _badge(stage: str) -> str:
    colour = STAGE_COLOURS.get(stage, "#7F7F7F")
    return f'<span class="badge" style="background:{colour}">{_e(stage)}</span>'


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()
) -> str:
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
        for i, h in enumerate(headers)
    )
    body = []
    for r in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _e(value)


def _scorecard(card: dict[str, Any], metric: str) -> str:
    verdict = (
        '<span class="ok">accepted</span>'
        if card.get("accepted")
        else '<span class="bad">rejected</span>'
    )
    parts = [f"<h3>Scorecard: {verdict}</h3>"]
    if card.get("reason"):
        parts.append(f'<p class="meta">{_e(card["reason"])}</p>')
    cand, champ = card.get("candidate") or {}, card.get("champion") or {}
    keys = [k for k in dict.fromkeys([*cand, *champ]) if k != "score"]
    if keys:
        rows = [[_e(k), _num(cand.get(k)), _num(champ.get(k))] for k in keys]
        champion = card.get("champion_version") or "champion"
        parts.append(_table(["holdout", "this version", _e(champion)], rows, numeric=(1, 2)))
    contenders = card.get("contenders") or []
    if contenders:
        rows = [
            [
                _e(c.get("learner")) + (" ★" if c.get("winner") else ""),
                _num(c.get("score")),
                _e(c.get("error") or ""),
            ]
            for c in contenders
        ]
        parts.append(
            "<h3>Contenders</h3>"
            + _table(["learner", f"holdout {metric}", "error"], rows, numeric=(1,))
        )
    evidence = card.get("evidence") or {}
    if evidence.get("note"):
        parts.append(f'<p class="meta">{_e(evidence["note"])}</p>')
    return "".join(parts)


def _version(v: VersionInfo, metric: str) -> str:
    rows = [
        ("registered", clock(v.created_at, True) + " UTC"),
        ("trigger", v.trigger or "user upload"),
        ("parent", v.parent or "-"),
        ("sha256", f"<code>{_e(v.sha256[:16])}</code>"),
    ]
    if v.stage in ("challenger", "canary"):
        rows.append(("traffic", f"{v.traffic:.0%}"))
    p = v.profile
    if p is not None:
        speed = (
            f"{p.latency_p50_ms:.3g} / {p.latency_p99_ms:.3g} ms at 1 row; "
            f"{p.batch_latency_p50_ms:.3g} / {p.batch_latency_p99_ms:.3g} ms "
            f"at {p.batch_size:,} rows"
        )
        rows += [
            ("latency p50 / p99", _e(speed)),
            ("throughput", f"{p.rows_per_s:,.0f} rows/s"),
            (
                "size, memory",
                _e(
                    f"{human_bytes(p.model_bytes)}, "
                    + (
                        f"+{human_bytes(p.peak_memory_bytes)} peak"
                        if p.peak_memory_bytes is not None
                        else "memory not measured"
                    )
                ),
            ),
        ]
        if p.slowdown is not None:
            text = f"{p.slowdown:.1f}x champion v{p.champion_version}'s latency, measured beside it"
            rows.append(
                ("vs champion", f'<span class="warn">{_e(text)}</span>' if p.slow else _e(text))
            )
    else:
        rows.append(("profile", "not measured at registration"))
    if v.metrics:
        rows.append(
            ("metrics", _e(", ".join(f"{k} {x:.4g}" for k, x in sorted(v.metrics.items()))))
        )
    body = "".join(
        f"<dt>{_e(k)}</dt><dd>{val}</dd>"
        for k, val in rows
    )
    card = _scorecard(v.scorecard, metric) if v.scorecard else ""
    return (
        f'<div class="version"><strong>{_e(v.model)}</strong> {_badge(v.stage)}'
        f"<dl>{body}</dl>{card}</div>"
    )


def _chart(c: Chart) -> str:
    return (
        f'<section class="card chart" id="chart-{_e(c.key)}"><h2>{_e(c.title)}</h2>'
        f'<p class="caption">{_e(c.caption)}</p>'
        f'<div class="plot" id="plot-{_e(c.key)}" style="height:{c.height}px"></div></section>'
    )


def _utc(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _window_text(data: ReportData) -> str:
    q = data.query.summary
    if data.since or data.until:
        bounds = (
            f"from {_utc(data.since) if data.since else 'the first event'} "
            f"to {_utc(data.until) if data.until else 'now'}"
        )
    else:
        bounds = "every event in the lineage store"
    if q.get("first_event") is not None:
        bounds += f" (events {_utc(q['first_event'])} to {_utc(q['last_event'])})"
    return bounds


def render(data: ReportData, story: Story, charts: Sequence[Chart], sources: str) -> str:
    """The whole page."""
    q = data.query
    tiles = "".join(
        f'<div class="tile"><div class="label">{_e(a)}</div><div class="value">{_e(b)}</div>'
        f'<div class="note">{_e(c)}</div></div>'
        for a, b, c in story.tiles
    )
    lines = "".join(f"<li>{_e(s)}</li>" for s in story.lines)
    alerts = (
        _table(
            [
                "time (UTC)",
                "state",
                "severity",
                "signal",
                "detector",
                "feature",
                "statistic",
                "message",
            ],
            [
                [
                    clock(a["at"], True),
                    _e(a["state"]),
                    _e(a["severity"]),
                    _e(a["signal"]),
                    _e(a.get("detector")),
                    _e(a.get("feature")),
                    _num(a.get("statistic")),
                    _e(a["message"]),
                ]
                for a in data.alerts
            ],
            numeric=(6,),
        )
        if data.alerts
        else '<p class="meta">No alert events for this pipeline in the window.</p>'
    )
    changes = (
        _table(
            ["time (UTC)", "version", "from", "to", "traffic", "reason", "actor"],
            [
                [
                    clock(c["at"], True),
                    _e(c["model"]),
                    _e(c["from_stage"] or "-"),
                    _badge(c["to_stage"]),
                    f"{c['traffic']:.0%}",
                    _e(c["reason"]),
                    _e(c["actor"]),
                ]
                for c in data.stage_changes
            ],
            numeric=(4,),
        )
        if data.stage_changes
        else '<p class="meta">No stage changes in the window.</p>'
    )
    summary = _table(
        list(q.summary),
        [
            [
                _num(v) if not hasattr(v, "isoformat") else _e(v.isoformat())
                for v in q.summary.values()
            ]
        ],
    )
    dist = _table(
        ["model", "version", "variant", "label", "predictions", "mean value"],
        [
            [
                _e(r["model_name"]),
                _num(r["model_version"]),
                _e(r["variant"]),
                _e(r["label"]),
                _num(r["n"]),
                _num(r["mean_value"]),
            ]
            for r in q.distribution
        ],
        numeric=(1, 4, 5),
    )
    latency = _table(
        ["version", "variant", "predictions", "p50 ms", "p95 ms", "p99 ms", "max ms"],
        [
            [
                _e(r["model"]),
                _e(r["variant"]),
                _num(r["n"]),
                _num(r["p50"]),
                _num(r["p95"]),
                _num(r["p99"]),
                _num(r["max"]),
            ]
            for r in data.latency_by_version
        ],
        numeric=(2, 3, 4, 5, 6),
    )
    served = (
        _table(
            ["version", "labeled served predictions", f"served {data.metric}"],
            [
                [_e(r["model"]), _num(r["labeled"]), _num(r["value"])]
                for r in data.performance_total
            ],
            numeric=(1, 2),
        )
        if data.performance_total
        else '<p class="meta">No feedback joined to served predictions yet.</p>'
    )
    versions = (
        "".join(_version(v, data.metric) for v in data.versions)
        or '<p class="meta">No model version registered.</p>'
    )
    figures = ",".join(
        '{"key": '
        + orjson.dumps(c.key).decode()
        + ', "time": '
        + ("false" if c.key == "distribution" else "true")
        + ', "figure": '
        + pio.to_json(c.figure, validate=False)
        + "}"
        for c in charts
    )
    payload = orjson.dumps(
        {
            "pipeline": data.pipeline,
            "since": data.since,
            "until": data.until,
            "generated_at": data.generated_at,
            "bucket_ms": data.bucket_ms,
            "lineage_query": {"summary": q.summary, "distribution": q.distribution},
            "served": data.performance_total,
            "latency": data.latency_total,
            "charts": [c.key for c in charts],
            "facts": story.facts,
            "versions": [
                {
                    "model": v.model,
                    "stage": v.stage,
                    "profile": v.profile.to_metrics() if v.profile else None,
                }
                for v in data.versions
            ],
        },
        default=str,
        option=orjson.OPT_SERIALIZE_NUMPY,
    ).decode()
    window = _window_text(data)
    command = (
        f"loopline lineage query {data.pipeline}"
        + (f" --since {data.since.isoformat()}" if data.since else "")
        + (f" --until {data.until.isoformat()}" if data.until else "")
    )
    # Double-click on any time chart returns every time chart to this shared range.
    first_time = next((c for c in charts if c.key != "distribution"), None)
    initial = (
        list(first_time.figure.layout.xaxis.range)
        if first_time and first_time.figure.layout.xaxis.range
        else []
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Loopline report · {_e(data.pipeline)}</title>
<style>{_CSS}</style>
<script>{get_plotlyjs()}</script>
</head><body>
<main>
<header><div class="brand">Loopline report</div>
<h1>Pipeline {_e(data.pipeline)}</h1>
<p class="meta">Window: {_e(window)} · time buckets of {data.bucket_ms / 1000:g} s · generated
{_e(_utc(data.generated_at))} · all times UTC</p></header>
<section class="card story"><h2>What happened</h2><ol>{lines}</ol></section>
<section class="tiles">{tiles}</section>
{"".join(_chart(c) for c in charts)}
<section class="card"><h2>Versions and scorecards</h2>
<p class="caption">Every registered version, its stage now, its scorecard (the trainer's holdout
judgement, with every contender it tried) and its profile measured in ONNX Runtime at
registration.</p>
<div class="versions">{versions}</div></section>
<section class="card"><h2>Served performance and latency per version</h2>{served}{latency}</section>
<section class="card"><h2>Alerts</h2>{alerts}</section>
<section class="card"><h2>Stage changes</h2>{changes}</section>
<section class="card"><h2>The lineage store's numbers</h2>
<p class="caption">What <code>{_e(command)}</code> prints for this window: the same function on the
same store.</p>{summary}{dist}</section>
<footer>Sources: {_e(sources)}. Generated by <code>loopline report</code>; this file needs no
network.
</footer>
</main>
{_json_script("loopline-figures", "[" + figures + "]")}
{_json_script("loopline-report-data", payload)}
<script>window.looplineRange = {orjson.dumps(initial).decode()};{_LOADER}</script>
</body></html>
"""
