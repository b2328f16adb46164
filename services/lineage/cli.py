"""``loopline lineage ...``: query, trace, served-at and forget."""

from __future__ import annotations

import csv
import sys
from datetime import datetime
from typing import Any

import click
import orjson
from rich.table import Table

from loopline.artifacts import ArtifactStore
from loopline.kafka import KafkaConfig
from loopline.model_ref import ModelRef, parse_ref, resolve, version_id
from loopline.registry import RegistryReader, RegistryState
from loopline.services.lineage import query as q
from loopline.services.lineage.settings import LineageSettings
from loopline.services.lineage.store import LineageStore
from loopline.terminal import make_console

console = make_console()
notes = make_console(stderr=True)


def _store(settings: LineageSettings) -> LineageStore:
    return LineageStore(settings.store_dir())


def _registry(settings: LineageSettings) -> RegistryState:
    reader = RegistryReader(KafkaConfig.from_settings(settings), client_id="loopline-lineage-cli")
    try:
        return reader.catch_up()
    finally:
        reader.close()


def _model(settings: LineageSettings, pipeline: str, text: str, what: str,
           need_version: bool) -> tuple[str, int | None]:
    """(model name, version) from NAME, NAME/VERSION or NAME@ALIAS (an alias: via the registry)."""
    ref: ModelRef = parse_ref(text, what=what)
    if ref.note:
        notes.print(ref.note, style="yellow", soft_wrap=True)
    if ref.alias is not None or (need_version and ref.version is None):
        record = resolve(ref, _registry(settings), pipeline)
        return str(record["name"]), int(record["version"])
    return ref.name, ref.version


def _fmt(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(title: str, records: list[dict[str, Any]]) -> Table:
    # As wide as its title at least: a narrow table (one column, no rows) would wrap the title.
    table = Table(*(records[0].keys() if records else ["(no rows)"]), title=title,
                  min_width=len(title))
    for r in records:
        table.add_row(*(_fmt(v) for v in r.values()))
    return table


def _emit(records: list[dict[str, Any]], fmt: str, title: str) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(records, default=str,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
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
@click.option("--model", help="NAME/VERSION, NAME@ALIAS (champion, challenger, shadow, canary: "
                               "the version holding it now) or NAME, to restrict to.")
@click.option("--since", help="Start: ISO-8601, epoch ms, or a duration back from now (1h).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--limit", type=int, default=50, show_default=True,
              help="Rows listed (the summary counts all).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def query_cmd(pipeline: str, model: str | None, since: str | None, until: str | None, limit: int,
              fmt: str) -> None:
    """What the model output in a time window, for whom: counts, output distribution, rows."""
    settings = LineageSettings()
    name, version = (_model(settings, pipeline, model, "--model", need_version=False) if model
                     else (None, None))
    result = q.query_predictions(_store(settings), pipeline, name, version,
                                 q.parse_time(since) if since else None,
                                 q.parse_time(until) if until else None, limit)
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"summary": result.summary,
                                       "distribution": result.distribution,
                                       "rows": result.rows}, default=str,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        _emit(result.rows, "csv", "")
        return
    console.print(_table(f"{pipeline}: summary", [result.summary]))
    console.print(_table("output distribution", result.distribution))
    console.print(_table(f"first {limit} predictions", result.rows))


@lineage.command("trace")
@click.argument("event_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def trace_cmd(event_id: str, fmt: str) -> None:
    """The whole chain of one event: raw offset, features,
    predictions, feedback, models trained on it."""
    settings = LineageSettings()
    chain = q.trace(_store(settings), _registry(settings), event_id)
    if fmt == "json":
        sys.stdout.write(orjson.dumps(chain, default=str,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.print(f"event [bold]{event_id}[/] in pipeline [bold]{chain['pipeline']}[/]")
    for f in chain["features"]:
        console.print(f"  raw      {f['raw_topic']}[{f['raw_partition']}]@{f['raw_offset']}  "
                      f"key={f['key']}")
        console.print(f"  features {f['_topic']}[{f['_partition']}]@{f['_offset']}  "
                      f"{f['features']}")
    for p in chain["predictions"]:
        console.print(f"  predicted {version_id(p['model_name'], p['model_version'])} "
                      f"{p['variant']:10} "
                      f"{'served' if p['served'] else 'not served'}  label={p['label']} "
                      f"value={_fmt(p['value'])}  "
                      f"({p['_topic']}[{p['_partition']}]@{p['_offset']})")
    for fb in chain["feedback"]:
        console.print(f"  feedback  label={fb['label']} verdict={fb['verdict']} "
                      f"value={fb['value']} at {_fmt(fb['ts'])}")
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
@click.option("--tombstones/--no-tombstones", default=True, show_default=True,
              help="Write tombstones (null values) for the subject's keys on compacted topics.")
@click.option("--block/--no-block", default=True, show_default=True,
              help="Add the subject (salted hashes) to the store's forgotten list, so lineage "
                   "never imports their messages again, even when it re-reads the topics from "
                   "offset 0 (later events under the key are not stored either).")
@click.option("--dry-run", is_flag=True,
              help="Only report what the store and Kafka hold; change nothing.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def forget_cmd(pipeline: str, key: str, tombstones: bool, block: bool, dry_run: bool,
               fmt: str) -> None:
    """Forget a data subject: store rows, forgotten list, tombstones; report what Kafka keeps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from loopline.services.lineage.forget import forget_subject

    settings = LineageSettings()
    kafka = KafkaConfig.from_settings(settings)
    columns = (TextColumn("scanning {task.fields[topic]}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=fmt == "json") as progress:
        tasks: dict[str, Any] = {}

        def show(topic: str, done: int, total: int) -> None:
            if topic not in tasks:
                tasks[topic] = progress.add_task("scan", topic=topic, total=total)
            progress.update(tasks[topic], completed=done, total=total)

        report = forget_subject(kafka, _store(settings), _registry(settings), pipeline, key,
                                tombstones=tombstones, block=block, dry_run=dry_run, progress=show)
    held = [h.summary() for h in report.holdings]
    if fmt == "json":
        doc = {"pipeline": pipeline, "dry_run": dry_run, "store": report.store, "topics": held,
               "forgotten_list": {"file": report.forgotten_file, "added": report.forgotten}}
        sys.stdout.write(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    store = report.store
    rows = ", ".join(f"{n} {t}" for t, n in store["removed"].items())
    console.print(f"{'dry run: ' if dry_run else ''}forget key {key!r} in {pipeline}: "
                  f"{len(store['event_ids'])} event(s), "
                  f"{len(store['prediction_ids'])} prediction(s)")
    console.print(f"lineage store: {'would remove' if dry_run else 'removed'} rows: {rows}")
    if report.forgotten is not None:
        added = report.forgotten
        console.print(f"forgotten list {report.forgotten_file}: added {added['keys']} key(s), "
                      f"{added['events']} event id(s), {added['predictions']} prediction id(s) "
                      "(salted sha256): lineage will not import them again, nor new events "
                      "under this key")
    elif not dry_run:
        console.print("forgotten list: not updated (--no-block): a lineage rebuild from offset 0 "
                      "would import this subject again")
    table = Table("topic", "subject's messages", "newest", "cleanup", "tombstones", "kept",
                  title="what Kafka still holds of this subject")
    for h in held:
        table.add_row(h["topic"], str(h["messages"]) if h["exists"] else "-",
                      (h["newest"] or "")[:19], h["cleanup_policy"] or "(not reported)",
                      str(h["tombstones"]), h["kept_until"])
    console.print(table)
    noisy = sorted({h.kind for h in report.holdings if h.tombstones} & {"raw", "features"})
    if noisy:
        console.print(f"note: ingest and inference dead-letter null messages today, so the "
                      f"tombstones on {', '.join(noisy)} reach the deadletter topic with their key "
                      "(not their content)", style="yellow")
    trained = store["trained_on"]
    console.print("model versions trained on this key's data: "
                  + (", ".join(trained) + " (their weights may reflect it: retrain without it)"
                     if trained else "none"))
    console.print("not searched: service state snapshots (loopline.state.*: the trainer keeps "
                  "recent labeled events until they age out) and copies outside Loopline "
                  "(consumers of these topics)", style="dim")


@click.command("replay")
@click.argument("pipeline")
@click.option("--model", required=True,
              help="NAME/VERSION (or NAME@ALIAS: champion, challenger, shadow, canary) to re-score "
                   "the window with.")
@click.option("--against", help="NAME/VERSION or NAME@ALIAS to compare with.")
@click.option("--since", help="Start: ISO-8601, epoch ms, or a duration back from now (1h).")
@click.option("--until", help="End (exclusive), same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)
def replay_cmd(pipeline: str, model: str, against: str | None, since: str | None, until: str | None,
               fmt: str) -> None:
    """Re-score a logged window with model versions:
    agreement, metric deltas, reproducibility audit."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from loopline.services.lineage.replay import FLOAT32_ULPS, replay

    settings = LineageSettings()

    def version(text: str, what: str) -> tuple[str, int]:
        name, number = _model(settings, pipeline, text, what, need_version=True)
        assert number is not None  # need_version: resolved, or an error naming the forms
        return name, number

    chosen = version(model, "--model")
    other = version(against, "--against") if against else None

    with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), console=console,
                  disable=fmt == "json") as progress:
        task = progress.add_task("replay", total=None)
        report = replay(_store(settings), _registry(settings), pipeline, chosen,
                        other, q.parse_time(since) if since else None,
                        q.parse_time(until) if until else None,
                        progress=lambda done,
                        total: progress.update(task, completed=done, total=total),
                        artifacts=ArtifactStore.from_settings(settings))
    rows = []
    for side in report.sides:
        metric = report.metric(side)
        rows.append({"model": side.model, "labels": dict(sorted(side.distribution.items())) or "-",
                     "logged live": side.logged,
                     "reproduced exactly": f"{side.reproduced}/{side.logged}" if side.logged
                     else "-",
                     "within float32 rounding": side.within_rounding if side.logged else None,
                     "max |diff|": side.max_abs_diff if side.logged else None,
                     ("accuracy" if report.task == "classification" else "MAE"): metric})
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"pipeline": pipeline, "rows": report.rows,
                                       "labeled": report.labeled, "agreement": report.agreement,
                                       "events_per_s": report.events_per_s,
                                       "sides": rows}, default=str,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.print(_table(f"replay of {report.rows} events of {pipeline} ({report.labeled} with "
                         "feedback)", rows))
    if report.agreement is not None:
        console.print(f"agreement between {report.sides[0].model} and {report.sides[1].model}: "
                      f"{report.agreement:.2%}")
    if len(report.sides) == 2 and report.labeled:
        a, b = (report.metric(s) for s in report.sides)
        console.print(f"metric delta ({report.sides[1].model} - {report.sides[0].model}): "
                      f"{b - a:+.4f}")  # type: ignore[operator]  # both sides have the metric
    audit = report.sides[0]
    if audit.logged:
        # "2984/3000 ... NOT reproduced" read as 2984 failures: say how many match, then the rest.
        missed = audit.logged - audit.reproduced - audit.within_rounding
        rounding = "" if not audit.within_rounding else (
            f", {audit.within_rounding} within float32 rounding (at most {FLOAT32_ULPS} ulps: "
            "ONNX Runtime's float32 kernels round by batch make-up)")
        verdict = "" if not missed else f"; {missed} NOT reproduced"
        console.print(f"reproducibility audit of {audit.model}: {audit.reproduced}/{audit.logged} "
                      f"live scores reproduced exactly{rounding}{verdict} (max |diff| "
                      f"{audit.max_abs_diff:.3g})")
    console.print(f"{report.events_per_s:,.0f} events/s", style="dim")
