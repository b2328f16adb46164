"""``loopline models``: register, list, promote and roll back model versions."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from loopline.errors import LooplineError
from loopline.model_ref import ModelRef, parse_ref, resolve, version_id
from loopline.terminal import make_console

if TYPE_CHECKING:
    from loopline.model_profile import ModelProfile

console = make_console(soft_wrap=True)
notes = make_console(stderr=True)

_STAGES = click.Choice(["champion", "challenger", "shadow", "canary", "candidate"])


def _registry(artifact_uri: str | None = None):
    from loopline.artifacts import ArtifactStore
    from loopline.kafka import KafkaConfig
    from loopline.models import ModelRegistry
    from loopline.observability import configure_logging
    from loopline.settings import LooplineSettings

    settings = LooplineSettings()
    configure_logging("WARNING", "console")  # the CLI speaks through its own output
    return ModelRegistry(KafkaConfig.from_settings(settings),
                         ArtifactStore.from_settings(settings, artifact_uri))


def _metrics(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name:
                raise ValueError(pair)
            out[name] = float(value)
        except ValueError:
            raise LooplineError(
                f"--metrics {pair!r}: expected NAME=NUMBER (rule: metric_format)") from None
    return out


def version_ref(text: str, version: int | None = None, name: str | None = None,
                what: str = "PIPELINE") -> tuple[str, ModelRef]:
    """(pipeline, model ref) from ``PIPELINE``, ``PIPELINE/2`` or ``PIPELINE@ALIAS`` (+ --name)."""
    from loopline.topics import check_model_name

    ref = parse_ref(text, what=what, version=version)
    if ref.note:
        notes.print(ref.note, style="yellow", soft_wrap=True)
    model = check_model_name(name) if name else ref.name
    return ref.name, ModelRef(model, ref.version, ref.alias)


def origin(record: dict[str, Any]) -> str:
    """Who made a version: ``trainer`` (its record carries a trigger or scorecard) or ``user``."""
    return "trainer" if record.get("trigger") or record.get("scorecard_json") else "user"


#: Stages a version must not reach without --force when it was rejected or never validated.
_TAKES_TRAFFIC = ("champion", "challenger", "canary")


def _force_needed(state: Any, pipeline: str, record: dict[str, Any], to_stage: str) -> str | None:
    """Why promoting ``record`` to ``to_stage`` needs --force, or None when it does not."""
    from loopline.models import stage_history

    if to_stage not in _TAKES_TRAFFIC or record["stage"] not in ("rejected", "candidate"):
        return None
    vid = version_id(record["name"], record["version"])
    made = f"a {origin(record)} upload" if origin(record) == "user" else "made by the trainer"
    if record["stage"] == "rejected":
        last = next((c for c in reversed(stage_history(state, pipeline))
                     if (c["name"], c["version"]) == (record["name"], record["version"])
                     and c["to_stage"] == "rejected"), None)
        why = f" by {last['actor']}: {last['reason']}" if last else ""
        return f"{vid} ({made}) was rejected{why}"
    return (f"{vid} ({made}) is a candidate: it was never validated against the champion; "
            f"`--to shadow` compares it live first")


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def print_rejected(out: Console, state: Any, shown: int = 5) -> None:
    """Say plainly that invalid registry records were skipped, and the first few reasons."""
    total = state.rejected_total
    if not total:
        return
    out.print(Text(f"registry: {total} invalid record(s) on loopline.models skipped (not applied); "
                   "the rest of the registry is shown", style="yellow"), soft_wrap=True)
    for record in state.rejected[:shown]:
        out.print(Text(f"  - {record.summary()}", style="yellow"), soft_wrap=True)
    if total > shown:
        out.print(Text(f"  ... and {total - shown} more (see the services' "
                       "registry_record_rejected log lines)", style="yellow"), soft_wrap=True)


def _profile_cells(measured: ModelProfile | None) -> list[str | Text]:
    """The profile columns of `models list`: latencies, rows/s, size, memory, champion ratio."""
    from loopline.model_profile import human_bytes

    if measured is None:
        return ["-", "-", "-", "-", "-"]
    m = measured
    ratio: str | Text = "-"
    if m.slowdown is not None:
        ratio = Text(f"{m.slowdown:.1f}x v{m.champion_version}",
                     style="bold yellow" if m.slow else "")
    latency = (f"{m.latency_p50_ms:.3g}/{m.latency_p99_ms:.3g} ms | {m.batch_latency_p50_ms:.3g}/"
               f"{m.batch_latency_p99_ms:.3g} ms @{m.batch_size}")
    return [latency, f"{m.rows_per_s:,.0f}",
            human_bytes(m.model_bytes),
            human_bytes(m.peak_memory_bytes) if m.peak_memory_bytes is not None else "-", ratio]


@click.group()
def models() -> None:
    """Model versions: register, list, promote, roll back (all recorded in loopline.models)."""


@models.command()
@click.argument("pipeline")
@click.option("--onnx", "onnx_file", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The ONNX model file.")
@click.option("--reference", type=click.Path(path_type=Path),
              help="Reference data (CSV or Parquet with one column per feature): test batch and "
                   "profile.")
@click.option("--stage", type=_STAGES, default="champion", show_default=True)
@click.option("--traffic", type=float, help="Share of keys a challenger or canary serves (0..1].")
@click.option("--name", help="Model name (default: the pipeline's name).")
@click.option("--metrics", "metric_pairs", multiple=True, metavar="NAME=VALUE",
              help="Offline metrics; repeatable.")
@click.option("--sha256", "expected_sha256", help="Refuse the file unless it has this sha256.")
@click.option("--artifact-uri",
              help="Artifact store (default: LOOPLINE_ARTIFACT_URI, else "
              "$LOOPLINE_HOME/artifacts).")
@click.option("--max-slowdown", type=click.FloatRange(min=1.0, min_open=True), metavar="FACTOR",
              help="Refuse the version if it is more than FACTOR times slower than the champion "
                   "measured beside it (default: register it with a warning past 3x).")
def register(pipeline: str, onnx_file: Path, reference: Path | None, stage: str,
             traffic: float | None, name: str | None, metric_pairs: tuple[str, ...],
             expected_sha256: str | None, artifact_uri: str | None,
             max_slowdown: float | None) -> None:
    """Validate an ONNX model for PIPELINE, measure it in ONNX Runtime, store it and publish it."""
    from loopline.model_profile import ModelProfile
    from loopline.models import NewVersion, load_reference
    from loopline.topics import check_model_name, check_pipeline_name

    check_pipeline_name(pipeline)
    if name is not None:
        check_model_name(name)
    registry = _registry(artifact_uri)
    # This command prints the profile and its warning itself; the module's log line would repeat it.
    logging.getLogger("loopline.model_profile").setLevel(logging.ERROR)
    state = registry.state()
    spec = state.specs.get(pipeline)
    ref = load_reference(reference, spec) if reference is not None and spec is not None else None
    with console.status(f"validating and measuring {onnx_file.name} for {pipeline}..."):
        record = registry.register(pipeline, onnx_file.read_bytes(), NewVersion(
            name=name, stage=stage, traffic=traffic, reference=ref, metrics=_metrics(metric_pairs),
            expected_sha256=expected_sha256, max_slowdown=max_slowdown))
    console.print(f"registered [bold]{version_id(record['name'], record['version'])}[/] for "
                  f"{pipeline} as {record['stage']}"
                  + (f" (traffic {record['traffic']:g})"
                     if record["stage"] in ("challenger", "canary") else "")
                  + f"; sha256 {record['sha256'][:12]}, {record['uri']}"
                  + ("; reference profile stored" if record["reference_profile_json"] else ""))
    beside = registry.last_trial[1:]
    if beside:
        console.print(f"test batch of {registry.last_trial[0].rows} row(s) scored beside "
                      + ", ".join(f"{r.stage} {r.label}" + ("" if r.ok else f" (failed: {r.error})")
                                  for r in beside))
    measured = ModelProfile.from_metrics(record["metrics"])
    if measured is None:
        console.print("[yellow]not measured in ONNX Runtime (see the log): no profile stored[/]")
        return
    console.print(f"measured in ONNX Runtime: {measured.summary()}")
    if measured.slow:
        m, v = measured, version_id(record["name"], record["version"])
        where = (f"it serves as {record['stage']} now; `loopline models promote "
                 f"{pipeline}/{record['version']} --to retired` takes it out"
                 if record["stage"] in ("champion", "challenger", "canary", "shadow")
                 else "it takes no traffic yet")
        console.print(f"[bold yellow]warning:[/] {v} is {m.slowdown:.1f}x slower than champion "
                      f"v{m.champion_version} measured beside it (p99 at one row "
                      f"{m.latency_p99_ms:.3g} vs {m.champion_latency_p99_ms:.3g} ms; median at "
                      f"{m.batch_size:,} rows "
                      f"{m.batch_latency_p50_ms:.3g} vs {m.champion_batch_latency_p50_ms:.3g} ms); "
                      f"{where}; --max-slowdown refuses such versions", soft_wrap=True)


@models.command("list")
@click.argument("pipeline", required=False, metavar="[PIPELINE[/VERSION|@ALIAS]]")
@click.option("--history", is_flag=True, help="Show every stage change instead of the versions.")
def list_(pipeline: str | None, history: bool) -> None:
    """List model versions (of PIPELINE, one version of it, or of every pipeline).

    The origin column tells the trainer's versions (registered with a trigger and a scorecard)
    from user uploads: both share one sequence of version numbers.
    """
    from loopline.model_profile import PREFIX, ModelProfile
    from loopline.models import stage_history, versions_of

    ref = version_ref(pipeline)[1] if pipeline is not None else None
    state = _registry().state()
    print_rejected(console, state)
    pipelines = [ref.name] if ref else sorted({p for p, _, _ in state.versions})
    only = resolve(ref, state, ref.name) if ref and (ref.version or ref.alias) else None

    def shown(name: str, version: int) -> bool:
        return only is None or (only["name"], only["version"]) == (name, version)

    if history:
        table = Table("at", "pipeline", "version", "from", "to", "traffic", "reason", "actor")
        for p in pipelines:
            for c in stage_history(state, p):
                if shown(c["name"], c["version"]):
                    table.add_row(_when(c["at"]), p, version_id(c["name"], c["version"]),
                                  c["from_stage"] or "-", c["to_stage"], f"{c['traffic']:g}",
                                  c["reason"], c["actor"])
        console.print(table)
        return
    table = Table("pipeline", "version", "origin", "stage", "traffic", "sha256", "parent",
                  "created", "metrics", "latency p50/p99 1 row | batch", "rows/s", "size",
                  "memory", "vs champion")
    for p in pipelines:
        for v in versions_of(state, p):
            if not shown(v["name"], v["version"]):
                continue
            table.add_row(p, version_id(v["name"], v["version"]), origin(v), v["stage"],
                          f"{v['traffic']:g}", v["sha256"][:12],
                          (v["parent"] or "-").replace(":", "/"), _when(v["created_at"]),
                          " ".join(f"{k}={x:g}" for k, x in sorted(v["metrics"].items())
                                   if not k.startswith(PREFIX)),
                          *_profile_cells(ModelProfile.from_metrics(v["metrics"])))
    console.print(table)


@models.command()
@click.argument("pipeline", metavar="PIPELINE[/VERSION|@ALIAS]")
@click.argument("version", type=int, required=False)
@click.option("--version", "version_option", type=int, metavar="N",
              help="The version (same as PIPELINE/N).")
@click.option("--name", help="Model name (default: the pipeline's name).")
@click.option("--to", "to_stage",
              type=click.Choice(["champion", "challenger", "shadow", "canary", "retired"]),
              default="champion", show_default=True)
@click.option("--traffic", type=float, help="Share of keys for a challenger or canary.")
@click.option("--reason", default="promoted", show_default=True)
@click.option("--force", is_flag=True,
              help="Give traffic to a rejected or never-validated (candidate) version anyway.")
def promote(pipeline: str, version: int | None, version_option: int | None, name: str | None,
            to_stage: str, traffic: float | None, reason: str, force: bool) -> None:
    """Move a version to a stage (a new champion retires the old one).

    Name it PIPELINE/2 (or PIPELINE 2, --version 2) or by its stage: PIPELINE@challenger.
    """
    if version is not None and version_option is not None and version != version_option:
        raise LooplineError(f"version {version} and --version {version_option} differ; give one "
                            "(rule: model_ref)")
    pipeline, ref = version_ref(pipeline, version if version is not None else version_option,
                                name)
    registry = _registry()
    state = registry.state()
    if pipeline not in state.specs:
        raise LooplineError(f"pipeline {pipeline!r} is not in the registry; `loopline apply` it "
                            "first (rule: pipeline_exists)")
    record = resolve(ref, state, pipeline)
    why = _force_needed(state, pipeline, record, to_stage)
    if why is not None and not force:
        raise LooplineError(f"{why}. It would take traffic as {to_stage}: `--force` promotes it "
                            "anyway (rule: force_needed)")
    if why is not None:
        notes.print(f"warning: {why}; promoted anyway (--force)", style="yellow", soft_wrap=True)
    change = registry.promote(pipeline, record["version"], name=record["name"], to_stage=to_stage,
                              traffic=traffic, reason=reason)
    console.print(f"{pipeline}: {version_id(change['name'], change['version'])} "
                  f"{change['from_stage']} -> [bold]{change['to_stage']}[/]")


@models.command()
@click.argument("pipeline", metavar="PIPELINE[@champion]")
@click.option("--reason", default="rolled back", show_default=True)
def rollback(pipeline: str, reason: str) -> None:
    """Make PIPELINE's previous champion champion again; the current one is rejected."""
    pipeline, ref = version_ref(pipeline)
    if ref.version is not None or ref.alias not in (None, "champion"):
        raise LooplineError(f"rollback takes back the champion: write {pipeline} or "
                            f"{pipeline}@champion, not {ref} (rule: model_ref)")
    current, previous = _registry().rollback(pipeline, reason=reason)
    back, now = (version_id(v["name"], v["version"]) for v in (current, previous))
    console.print(f"{pipeline}: rolled back {back} -> champion is now [bold]{now}[/]")
