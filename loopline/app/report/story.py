"""The report's opening summary: what happened, in order, with times and accuracy before and after.

The onset of a change is the earlier of two signs in the data: a feature's PSI against the serving
version's reference reaching the spec's warning level, and a change point in the first champion's
served accuracy (or error) per time bucket, before any promotion: the split of the labeled
buckets where the two sides' means differ most, kept only when they differ by at least
:data:`MIN_Z` standard errors and for the worse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from loopline.app.report.data import ReportData

#: Standard errors between the means before and after a change point for it to be told.
MIN_Z = 5.0


@dataclass
class Story:
    """Sentences for a person, tiles of headline numbers, and the facts behind them."""

    lines: list[str] = field(default_factory=list)
    tiles: list[tuple[str, str, str]] = field(default_factory=list)  # label, value, note
    facts: dict[str, Any] = field(default_factory=dict)


def clock(ms: int, with_date: bool = False) -> str:
    """An epoch-ms time as UTC wall-clock text."""
    when = datetime.fromtimestamp(ms / 1000, UTC)
    return when.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def after(ms: int, since: int) -> str:
    """'+12 s', '+3.5 min', '+2.0 h' between two moments."""
    s = (ms - since) / 1000
    if abs(s) < 120:
        return f"{s:+.0f} s"
    if abs(s) < 7200:
        return f"{s / 60:+.1f} min"
    return f"{s / 3600:+.1f} h"


def _fmt_metric(data: ReportData, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if data.regression else f"{value:.3f}"


def change_point(
    buckets: list[tuple[int, int, float, float]], worse_is_lower: bool
) -> tuple[int, float, float, float] | None:
    """Where the mean of per-bucket (start, n, sum, sum of squares) shifts for the worse, if at all.

    Returns (first bucket after the change, mean before, mean after, z) or None.
    """
    total_n = sum(b[1] for b in buckets)
    best: tuple[int, float, float, float] | None = None
    ln = ls = lq = 0.0
    tn, ts, tq = total_n, sum(b[2] for b in buckets), sum(b[3] for b in buckets)
    for k in range(1, len(buckets)):
        ln, ls, lq = ln + buckets[k - 1][1], ls + buckets[k - 1][2], lq + buckets[k - 1][3]
        rn, rs, rq = tn - ln, ts - ls, tq - lq
        if ln < 30 or rn < 30:
            continue
        ml, mr = ls / ln, rs / rn
        within = (lq - ln * ml * ml + rq - rn * mr * mr) / max(tn - 2, 1)
        z = abs(ml - mr) / math.sqrt(max(within, 1e-12) * (1 / ln + 1 / rn))
        worse = mr < ml if worse_is_lower else mr > ml
        if worse and z >= MIN_Z and (best is None or z > best[3]):
            best = (buckets[k][0], ml, mr, z)
    return best


def _served_metric(data: ReportData, lo: int | None, hi: int | None) -> tuple[float | None, int]:
    """Served accuracy (or MAE) over the buckets starting in [lo, hi), and its label count."""
    n = s = 0.0
    for r in data.performance:
        if (lo is None or r["bucket"] >= lo) and (hi is None or r["bucket"] < hi):
            n += r["labeled"]
            s += r["labeled"] * r["value"]
    return (s / n if n else None), int(n)


def tell(data: ReportData) -> Story:
    """The story of the window, from the report's data."""
    story = Story()
    q = data.query.summary
    word = "error (MAE)" if data.regression else "accuracy"
    if not q.get("predictions"):
        story.lines.append(f"No predictions of {data.pipeline} in this window yet.")
        return story
    first_ms = int(q["first_event"].timestamp() * 1000)
    last_ms = int(q["last_event"].timestamp() * 1000)
    dated = last_ms - first_ms > 86_400_000
    labeled = sum(r["labeled"] for r in data.performance_total)
    story.lines.append(
        f"{data.pipeline} served {q['served']:,} predictions for {q['events']:,} events between "
        f"{clock(first_ms, True)} and {clock(last_ms, dated)} UTC ({q['predictions']:,} "
        f"predictions by all variants); {labeled:,} served predictions have feedback."
    )

    # The first champion: serving when the window's first event came.
    champ = next(
        (
            s["model"]
            for s in data.timeline
            if s["stage"] == "champion" and s["start"] <= first_ms < s["end"]
        ),
        None,
    )
    promotions = [
        c
        for c in data.stage_changes
        if c["to_stage"] == "champion" and c["model"] != champ and c["at"] > first_ms
    ]
    promotion = promotions[0] if promotions else None
    first_alert = next((a for a in data.alerts if a["state"] == "raised"), None)

    # Onset, sign 1: the first champion's served metric shifts for the worse before any promotion.
    onset: tuple[int, str] | None = None
    cut = promotion["at"] if promotion else None
    rows = sorted(
        (r for r in data.performance if r["model"] == champ and (cut is None or r["bucket"] < cut)),
        key=lambda r: r["bucket"],
    )
    point = change_point(
        [(r["bucket"], r["labeled"], r["value"] * r["labeled"], r["sq"]) for r in rows],
        not data.regression,
    )
    if point is not None:
        at, before, after_, _ = point
        onset = (at, "performance")
        story.facts["performance_change_at"] = at
        story.lines.append(
            f"Served {word} of {champ} went from {_fmt_metric(data, before)} to "
            f"{_fmt_metric(data, after_)} at about {clock(at, dated)} (a change point in its "
            "labeled predictions)."
        )
    # Onset, sign 2: a feature's PSI against its version's reference reaches the warning level.
    warn, alert = data.spec.monitor.psi_warning, data.spec.monitor.psi_alert
    drifted = sorted((r for r in data.drift if r["psi"] >= warn), key=lambda r: r["at"])
    if drifted:
        d = drifted[0]
        story.facts["feature_drift_at"] = d["at"]
        level = "alert" if d["psi"] >= alert else "warning"
        story.lines.append(
            f"Feature {d['feature']} drifted from {d['model']}'s reference by "
            f"{clock(d['at'], dated)}: PSI {d['psi']:.2f} over its last {d['n']:,} values "
            f"({level} level; warning at {warn:g}, alert at {alert:g})."
        )
        if onset is None or d["at"] < onset[0]:
            onset = (d["at"], "features")
    elif data.drift:
        story.lines.append(
            f"No feature drifted from its version's reference (PSI stayed below {warn:g} in every "
            "comparison)" + (": what changed was the concept, not the inputs." if onset else ".")
        )
    if onset:
        story.facts["onset_at"] = onset[0]
    if first_alert is not None:
        since = f" ({after(first_alert['at'], onset[0])} after the change)" if onset else ""
        what = ", ".join(
            x
            for x in (
                first_alert["signal"],
                first_alert.get("detector"),
                first_alert.get("feature"),
            )
            if x
        )
        story.facts["first_alert_at"] = first_alert["at"]
        story.lines.append(
            f"First alert at {clock(first_alert['at'], dated)}{since} [{what}]: "
            f"{first_alert['message']}"
        )
        more = sum(a["state"] == "raised" for a in data.alerts) - 1
        if more > 0:
            story.lines[-1] += f" ({more} more raised later)"
    # Registrations and the promotion, told in the order they happened.
    timed: list[tuple[int, str]] = []
    for v in data.versions:
        if v.created_at > first_ms and v.model != champ:
            card = v.scorecard or {}
            verdict = ""
            if card:
                verdict = "; scorecard " + ("accepted" if card.get("accepted") else "rejected")
                if card.get("reason"):
                    verdict += f": {card['reason']}"
            timed.append((v.created_at,
                          f"{v.model} registered at {clock(v.created_at, dated)}"
                          + (f" (trigger {v.trigger})" if v.trigger else "") + verdict + "."))
    if promotion is not None:
        story.facts["promoted_at"] = promotion["at"]
        rel = [f"{after(promotion['at'], onset[0])} after the change"] if onset else []
        if first_alert is not None:
            rel.append(f"{after(promotion['at'], first_alert['at'])} after the first alert")
        timed.append((promotion["at"],
                      f"{promotion['model']} became champion at {clock(promotion['at'], dated)}"
                      + (f" ({', '.join(rel)})" if rel else "") + f": {promotion['reason']}."))
    story.lines.extend(line for _, line in sorted(timed, key=lambda t: t[0]))
    # Served metric per phase.
    marks = [m for m in (onset[0] if onset else None, promotion["at"] if promotion else None) if m]
    phases = []
    if onset and promotion and onset[0] < promotion["at"]:
        phases = [
            ("before the change", None, onset[0]),
            ("from the change to the promotion", onset[0], promotion["at"]),
            ("after the promotion", promotion["at"], None),
        ]
    elif marks:
        name = "the change" if onset else "the promotion"
        phases = [(f"before {name}", None, marks[0]), (f"after {name}", marks[0], None)]
    parts = []
    for label, lo, hi in phases:
        value, n = _served_metric(data, lo, hi)
        story.facts[f"served_{label.replace(' ', '_')}"] = value
        if value is not None:
            parts.append(f"{_fmt_metric(data, value)} {label} ({n:,} labels)")
    if parts:
        story.lines.append(f"Served {word}: " + "; ".join(parts) + ".")
    for v in data.versions:
        if v.profile is not None and v.profile.slow:
            story.lines.append(
                f"{v.model} measured {v.profile.slowdown:.1f}x slower than champion "
                f"v{v.profile.champion_version} at registration."
            )
    _tiles(data, story, labeled)
    return story


def _tiles(data: ReportData, story: Story, labeled: int) -> None:
    q = data.query.summary
    overall, n = _served_metric(data, None, None)
    lat = data.latency_total
    raised = sum(a["state"] == "raised" for a in data.alerts)
    story.tiles = [
        ("served predictions", f"{q['served']:,}", f"{q['events']:,} events, {q['keys']:,} keys"),
        (f"served {data.metric}", _fmt_metric(data, overall), f"{n:,} labeled predictions"),
        (
            "latency p50 / p99",
            "-" if lat["p50"] is None else f"{lat['p50']:,.0f} / {lat['p99']:,.0f} ms",
            "event time to scoring, served",
        ),
        (
            "versions",
            str(len(data.versions)),
            f"{len(data.stage_changes)} stage changes in the window",
        ),
        ("alerts raised", str(raised), f"{len(data.alerts)} alert events in the window"),
    ]
    story.facts["labeled"] = labeled
