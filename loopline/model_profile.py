"""How fast and how big a model version is in ONNX Runtime, measured when it is registered.

A profile holds latency percentiles of one ORT ``run`` at batch 1 and at the inference service's
batch size, rows per second at that batch size, the artifact's size and the peak memory the
session adds to a process. It is measured in a fresh child process (``python -m
loopline.model_profile``), so the registering process's threads neither slow the runs nor blur the
memory figure, with the scorer the inference service uses (one intra-op thread, the same feeds).

When the pipeline has a champion, the champion is measured in the same child, its runs interleaved
with the new version's: machines differ and load changes, so only a side-by-side measurement says
whether a version is slower. A version more than :data:`SLOWER_WARNING` times slower than the
champion (p99 at one row, or median at the batch size) is flagged before it takes traffic, and
refused when the caller sets ``max_slowdown``.

The profile travels in the version's ``metrics`` map under ``profile.*`` keys (numbers only): that
map already exists in every registry record, so no reader needs a new schema to see it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loopline.errors import ProfileError

log = logging.getLogger(__name__)

#: Latency this many times the champion's (p99 at one row, or median at the batch size): a warning.
SLOWER_WARNING = 3.0
#: Prefix of the profile's entries in a version's metrics map.
PREFIX = "profile."
#: Wall time the child may spend timing each model, per batch size (seconds).
BUDGET_S = 0.3
_CHILD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ModelProfile:
    """One version's measurement (milliseconds per ORT run; bytes)."""

    batch_size: int
    latency_p50_ms: float  # one row per run
    latency_p99_ms: float
    batch_latency_p50_ms: float  # batch_size rows per run
    batch_latency_p99_ms: float
    rows_per_s: float  # batch_size / median batch latency
    model_bytes: int
    peak_memory_bytes: int | None  # resident memory the session adds at its peak (None: unknown)
    runs: int  # timed runs in all, both batch sizes
    cpus: int  # of the machine that measured it
    champion_version: int | None = None  # the champion measured beside it, if any
    champion_latency_p99_ms: float | None = None
    champion_batch_latency_p50_ms: float | None = None
    slowdown: float | None = None  # the larger of the p99 ratio at 1 row and the p50 ratio at batch

    def to_metrics(self) -> dict[str, float]:
        """The profile as ``profile.*`` entries of a version's metrics map (unknowns left out)."""
        return {PREFIX + k: float(v) for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> ModelProfile | None:
        """The profile stored in a version's metrics map (None: it has none)."""
        values = {k[len(PREFIX) :]: v for k, v in metrics.items() if k.startswith(PREFIX)}
        if not set(_REQUIRED) <= set(values):
            return None
        kwargs: dict[str, Any] = {n: values.get(n) for n in cls.__dataclass_fields__}
        for n in _INTEGERS:
            if kwargs[n] is not None:
                kwargs[n] = int(kwargs[n])
        return cls(**kwargs)

    def summary(self) -> str:
        """One line for a person: latencies, throughput, size, memory, and the champion ratio."""
        text = (
            f"p50/p99 {_ms(self.latency_p50_ms)}/{_ms(self.latency_p99_ms)} at 1 row, "
            f"{_ms(self.batch_latency_p50_ms)}/{_ms(self.batch_latency_p99_ms)} at "
            f"{self.batch_size:,} rows; {self.rows_per_s:,.0f} rows/s; "
            f"{human_bytes(self.model_bytes)}"
            + (
                f", +{human_bytes(self.peak_memory_bytes)} peak memory"
                if self.peak_memory_bytes is not None
                else ""
            )
        )
        if self.slowdown is not None:
            text += f"; {self.slowdown:.1f}x the champion's latency"
        return text

    @property
    def slow(self) -> bool:
        """Whether it is far slower than the champion measured beside it."""
        return self.slowdown is not None and self.slowdown > SLOWER_WARNING


_REQUIRED = (
    "batch_size",
    "latency_p50_ms",
    "latency_p99_ms",
    "batch_latency_p50_ms",
    "batch_latency_p99_ms",
    "rows_per_s",
    "model_bytes",
    "runs",
    "cpus",
)
_INTEGERS = ("batch_size", "model_bytes", "peak_memory_bytes", "runs", "cpus", "champion_version")


def _ms(value: float) -> str:
    return f"{value:.3g} ms"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop returns


# ---- the parent's side --------------------------------------------------------------------
@dataclass(frozen=True)
class Subject:
    """A model to measure and its input tensors at batch 1 and at the batch size."""

    model: bytes
    one: Mapping[str, np.ndarray]
    batch: Mapping[str, np.ndarray]


def subject(
    model: bytes,
    spec: Any,
    rows: Sequence[Mapping[str, Any]],
    batch_size: int,
    fill_values: Mapping[str, float] | None = None,
    input_features: Sequence[str] | None = None,
) -> Subject:
    """Feeds built the way inference builds them (its :class:`~loopline.scoring.Scorer`)."""
    from loopline.scoring import Scorer

    scorer = Scorer(
        model, spec, fill_values, label="profiled", input_features=input_features or None
    )
    batch = [rows[i % len(rows)] for i in range(batch_size)]
    return Subject(model, scorer.feeds(batch[:1]), scorer.feeds(batch))


def measure(subjects: Sequence[Subject], budget_s: float = BUDGET_S) -> list[dict[str, Any]]:
    """Time and size every subject in one child process, interleaved; one result per subject."""
    with tempfile.TemporaryDirectory(prefix="loopline-profile-") as tmp:
        job = []
        for i, sub in enumerate(subjects):
            path = Path(tmp) / f"{i}"
            path.with_suffix(".onnx").write_bytes(sub.model)
            for size, feeds in (("one", sub.one), ("batch", sub.batch)):
                # Strings as fixed-width text: object arrays would need pickle to cross over.
                arrays: dict[str, Any] = {
                    k: v.astype(str) if v.dtype == object else v for k, v in feeds.items()
                }
                np.savez(path.with_suffix(f".{size}.npz"), **arrays)
            job.append(str(path))
        try:
            done = subprocess.run(
                [sys.executable, "-m", "loopline.model_profile"],
                input=json.dumps({"models": job, "budget_s": budget_s}),
                capture_output=True,
                text=True,
                timeout=_CHILD_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ProfileError(f"measuring took longer than {_CHILD_TIMEOUT_S:.0f}s") from e
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        raise ProfileError(f"the measuring process failed: {tail[0][:300]}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]  # JSON is Any


def profile_of(
    measured: Sequence[dict[str, Any]],
    subjects: Sequence[Subject],
    batch_size: int,
    champion_version: int | None = None,
) -> ModelProfile:
    """The first subject's profile; the second, if any, is the champion it is compared with."""
    mine = measured[0]
    other = measured[1] if len(measured) > 1 else None
    ratio = None
    if other is not None:
        # At the batch size the median: a few dozen runs of a slow model leave its p99 to whichever
        # run the scheduler interrupted. At one row, thousands of runs make the p99 a fair judge.
        ratio = max(
            mine["latency_p99_ms"] / max(other["latency_p99_ms"], 1e-9),
            mine["batch_latency_p50_ms"] / max(other["batch_latency_p50_ms"], 1e-9),
        )
    return ModelProfile(
        batch_size=batch_size,
        latency_p50_ms=mine["latency_p50_ms"],
        latency_p99_ms=mine["latency_p99_ms"],
        batch_latency_p50_ms=mine["batch_latency_p50_ms"],
        batch_latency_p99_ms=mine["batch_latency_p99_ms"],
        rows_per_s=batch_size / (mine["batch_latency_p50_ms"] / 1000),
        model_bytes=len(subjects[0].model),
        peak_memory_bytes=mine["peak_memory_bytes"],
        runs=mine["runs"],
        cpus=os.cpu_count() or 1,
        champion_version=champion_version if other is not None else None,
        champion_latency_p99_ms=other["latency_p99_ms"] if other else None,
        champion_batch_latency_p50_ms=other["batch_latency_p50_ms"] if other else None,
        slowdown=ratio,
    )


def service_batch_size() -> int:
    """The batch size services run with here (``LOOPLINE_BATCH_SIZE``, else the default)."""
    from loopline.settings import ServiceSettings  # read when measuring, never at import

    return ServiceSettings().batch_size


def at_registration(
    model: bytes,
    spec: Any,
    rows: Sequence[Mapping[str, Any]] | None,
    fill_values: Mapping[str, float],
    input_features: Sequence[str],
    champion: Mapping[str, Any] | None,
    label: str,
    max_slowdown: float | None = None,
    read: Callable[[str, str], bytes] | None = None,
) -> dict[str, float]:
    """Measure a version being registered beside the champion; return its ``profile.*`` metrics.

    Logs a warning when it is more than :data:`SLOWER_WARNING` times slower than the champion, and
    raises :class:`ProfileError` (rule: max_slowdown) past ``max_slowdown``. A model that cannot be
    measured is still registered, without a profile: validation, not speed, decides acceptance.
    """
    from loopline.artifacts import read_artifact
    from loopline.scoring import synthetic_batch

    read = read or read_artifact
    batch = list(rows) if rows else synthetic_batch(spec, 64)
    size = service_batch_size()
    subjects = [subject(model, spec, batch, size, fill_values, input_features)]
    if champion is not None:
        try:
            subjects.append(
                subject(
                    read(champion["uri"], champion["sha256"]),
                    spec,
                    batch,
                    size,
                    champion.get("fill_values") or {},
                    champion.get("input_features") or [],
                )
            )
        except Exception as e:  # noqa: BLE001 - an unloadable champion only loses the comparison
            log.warning(
                "profile_champion_unreadable", extra={"version": label, "error": str(e)[:300]}
            )
    try:
        prof = profile_of(
            measure(subjects),
            subjects,
            size,
            int(champion["version"]) if champion is not None else None,
        )
    except ProfileError as e:
        log.warning("profile_failed", extra={"version": label, "error": str(e)})
        return {}
    if prof.slow:
        log.warning(
            "profile_slower_than_champion",
            extra={
                "version": label,
                "slowdown": round(prof.slowdown or 0, 2),
                "p99_ms": prof.latency_p99_ms,
                "champion_p99_ms": prof.champion_latency_p99_ms,
            },
        )
    if max_slowdown is not None and prof.slowdown is not None and prof.slowdown > max_slowdown:
        raise ProfileError(
            f"{label}: latency is {prof.slowdown:.1f}x the champion's "
            f"(v{prof.champion_version}) measured beside it, more than the "
            f"{max_slowdown:g}x allowed (rule: max_slowdown)"
        )
    return prof.to_metrics()


# ---- the child's side ---------------------------------------------------------------------
def _resident_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak resident size to its current one (Linux); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {
            k: data[k].astype(object) if data[k].dtype.kind == "U" else data[k] for k in data.files
        }


def _child(paths: Sequence[str], budget_s: float) -> list[dict[str, Any]]:
    """Load every model, note the memory each adds, then time their runs interleaved."""
    import onnxruntime as ort

    from loopline.scoring import session_options  # the service's options: one intra-op thread

    loaded = []
    for path in paths:
        one, batch = _load(path + ".one.npz"), _load(path + ".batch.npz")
        exact = _reset_peak()
        before = _resident_kib("VmRSS")
        session = ort.InferenceSession(
            path + ".onnx", sess_options=session_options(1), providers=["CPUExecutionProvider"]
        )
        for _ in range(3):  # warm-up: the first runs allocate the arena and plan the graph
            session.run(None, one)
            session.run(None, batch)
        after = _resident_kib("VmHWM") if exact else None
        peak = max(0, after - before) * 1024 if after is not None and before is not None else None
        loaded.append((session, one, batch, peak))
    timings: list[tuple[list[float], list[float]]] = [([], []) for _ in loaded]
    # Round-robin: each round runs every model once, so load that comes and goes hits all alike.
    for which, (least, most) in ((0, (50, 5000)), (1, (10, 500))):
        deadline = time.perf_counter() + budget_s * len(loaded)
        rounds = 0
        while rounds < least or (time.perf_counter() < deadline and rounds < most):
            for (session, one, batch, _), times in zip(loaded, timings, strict=True):
                feeds = batch if which else one
                start = time.perf_counter_ns()
                session.run(None, feeds)
                times[which].append((time.perf_counter_ns() - start) / 1e6)
            rounds += 1
    out = []
    for (_, _, _, peak), (single, batched) in zip(loaded, timings, strict=True):
        out.append(
            {
                "latency_p50_ms": float(np.percentile(single, 50)),
                "latency_p99_ms": float(np.percentile(single, 99)),
                "batch_latency_p50_ms": float(np.percentile(batched, 50)),
                "batch_latency_p99_ms": float(np.percentile(batched, 99)),
                "peak_memory_bytes": peak,
                "runs": len(single) + len(batched),
            }
        )
    return out


if __name__ == "__main__":  # the measuring child: a job on stdin, results on stdout
    _job = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps(_child(_job["models"], float(_job["budget_s"]))))
