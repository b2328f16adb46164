"""``loopline lineage ...``: query, trace, served-at and forget."""

from __future__ import annotations

import csv
import sys
from datetime import datetime
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from loopline.kafka import KafkaConfig
from loopline.registry import RegistryReader, RegistryState
from loopline.services.lineage import query as q
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore

console = Console(highlight=False)


def _store(settings: LineageSettings) -> LineageStore:
    return LineageStore(settings.store_dir())


def _registry(settings: LineageSettings) -> RegistryState:
    reader = RegistryReader(KafkaConfig.from_settings(settings), client_id="loopline-lineage-cli")
    try:
        return reader.catch_up()
    finally:
        reader.close()


def _fmt(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(title: str, records: list[dict[str, Any]]) -> Table:
    table = Table(*(records[0].keys() if records else ["(no rows)"]), title=title)
    for r in records:
        table.add_row(*(_fmt(v) for v in r.values()))
    return table


def _emit(records: list[dict[str, Any]], fmt: str, title: str) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(records, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif fmt == "csv":
        if records:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: _fmt(v) for k, v in r.items()} for r in records)
    else:
        console.print(_table(title, records))


@click.group()
def lineage() -> None:
    """Ask the lineage store what models said, to whom, and from which inputs."""


@lineage.command("query")
@click.argument("pipeline")
@click.option("--model", help="NAME@VERSION (or NAME) to restrict to.")
@click.option("--since", help="Start: ISO-8601, epoch ms, or a duration back from now (1h).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--limit", type=int, default=50, show_default=True, help="Rows listed (the summary counts all).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def query_cmd(pipeline: str, model: str | None, since: str | None, until: str | None, limit: int, fmt: str) -> None:
    """What the model output in a time window, for whom: counts, output distribution, rows."""
    name, version = q.parse_model(model) if model else (None, None)
    result = q.query_predictions(_store(LineageSettings()), pipeline, name, version,
                                 q.parse_time(since) if since else None, q.parse_time(until) if until else None,
                                 limit)
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"summary": result.summary, "distribution": result.distribution,
                                       "rows": result.rows}, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        _emit(result.rows, "csv", "")
        return
    console.print(_table(f"{pipeline}: summary", [result.summary]))
    console.print(_table("output distribution", result.distribution))
    console.print(_table(f"first {limit} predictions", result.rows))


@lineage.command("trace")
@click.argument("event_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def trace_cmd(event_id: str, fmt: str) -> None:
    """The whole chain of one event: raw offset, features, predictions, feedback, models trained on it."""
    settings = LineageSettings()
    chain = q.trace(_store(settings), _registry(settings), event_id)
    if fmt == "json":
        sys.stdout.write(orjson.dumps(chain, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.print(f"event [bold]{event_id}[/] in pipeline [bold]{chain['pipeline']}[/]")
    for f in chain["features"]:
        console.print(f"  raw      {f['raw_topic']}[{f['raw_partition']}]@{f['raw_offset']}  key={f['key']}")
        console.print(f"  features {f['_topic']}[{f['_partition']}]@{f['_offset']}  {f['features']}")
    for p in chain["predictions"]:
        console.print(f"  predicted {p['model_name']}@{p['model_version']} {p['variant']:10} "
                      f"{'served' if p['served'] else 'not served'}  label={p['label']} value={_fmt(p['value'])}"
                      f"  ({p['_topic']}[{p['_partition']}]@{p['_offset']})")
    for fb in chain["feedback"]:
        console.print(f"  feedback  label={fb['label']} verdict={fb['verdict']} value={fb['value']} at {_fmt(fb['ts'])}")
    console.print(f"  trained on by: {', '.join(chain['trained_on']) or 'no model version yet'}")


@lineage.command("served-at")
@click.argument("pipeline")
@click.argument("time")
def served_at_cmd(pipeline: str, time: str) -> None:
    """Which version was champion (and the whole deployment) at TIME."""
    when = q.parse_time(time)
    plan = q.served_at(_registry(LineageSettings()), pipeline, when)
    console.print(_table(f"{pipeline} at {when.isoformat(timespec='seconds')}", plan))


@lineage.command("forget")
@click.argument("pipeline")
@click.option("--key", required=True, help="The data subject's key.")
def forget_cmd(pipeline: str, key: str) -> None:
    """Remove one key's rows from the store; list model versions trained on them."""
    settings = LineageSettings()
    result = q.forget(_store(settings), _registry(settings), pipeline, key)
    removed = ", ".join(f"{n} {t}" for t, n in result["removed"].items())
    console.print(f"forgot key {key!r} in {pipeline}: {result['events']} event(s); removed rows: {removed}")
    trained = result["trained_on"]
    console.print("model versions trained on this key's data: " + (", ".join(trained) if trained else "none"))
