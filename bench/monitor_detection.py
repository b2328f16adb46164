"""Detection benchmark of the monitor at its default settings: false alarms and delays.

Run: ``.venv/bin/python -m bench.monitor_detection [--seeds N] [--parts 123]`` (no broker; about
three minutes).

1. False alarms per 10,000 events on streams with no change, each fed through ``PipelineMonitor``
   as the service feeds it (batches of 100 feature events; the reference profile is the stream's
   first rows, as a model trained on them would store): seasonal streams (periods of 24 to 1000
   events, noise levels from a clean wave to noise twice its amplitude, white and AR(1) noise),
   AR(1) streams (phi 0.9, 0.95, 0.99), simulated daily weather (bench/monitor_streams.py), and real
   data that ships with installed packages, in file order (river's WaterFlow, SP500 returns,
   Shuttle, Bananas) or resampled (scikit-learn's breast cancer, wine, diabetes). Every raised
   event counts, warnings included.
2. Detection delay on i.i.d. streams with a change at event 5000 (5 seeds, medians): mean shifts,
   a doubled standard deviation, a category mix change, and concept drift seen through a fixed
   model's 0/1 errors (SEA, Agrawal) and absolute errors (FriedmanDrift), against river's ADWIN
   alone on the same stream (the values; each category's 0/1 indicator, first to fire; the errors).
   The monitor's delay is where its first verdict (warning or alert) was reached: the end of the
   segment its confirming test ran on.
3. End to end (bench/monitor_streams.py): seasonal weather whose first model (gradient boosting,
   ONNX) is trained on its first 2000 rows, with a real change at event 6000; a nonlinear concept
   that rotates; FriedmanDrift. Features, ONNX predictions and feedback 50 events late go through
   ``PipelineMonitor``: false alarms before the change, the first alert's delay after it.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry
from river import drift
from river.datasets import synth

from bench import monitor_streams as ms
from bench.common import add_engine_argument
from loopline.profile import build_profile
from loopline.registry import RegistryState, spec_event
from loopline.services.monitor.degradation import ErrorWatch
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch, PipelineMonitor, Tuning
from loopline.services.monitor.streams import ColumnWatch
from loopline.services.monitor.windowed import Thresholds
from loopline.spec import Monitor, parse_spec

DEFAULTS = Monitor()
THRESHOLDS = Thresholds(DEFAULTS.psi_warning, DEFAULTS.psi_alert, DEFAULTS.p_value)
REFERENCE = 2000


# ---- 1. false alarms -----------------------------------------------------------------------------
def seasonal(seed: int, n: int, period: float, noise: float, phi: float = 0.0) -> np.ndarray:
    """A sine wave of amplitude 1 plus noise (AR(1) with ``phi``) of sd ``noise``."""
    rng = np.random.default_rng(seed)
    wave = np.sin(2 * np.pi * np.arange(n) / period + rng.uniform(0, 2 * np.pi))
    return wave + ar1(rng, n, phi, noise)


def ar1(rng: np.random.Generator, n: int, phi: float, sd: float = 1.0) -> np.ndarray:
    """A stationary AR(1) series."""
    from scipy.signal import lfilter

    e = rng.normal(0, sd * np.sqrt(1 - phi**2), n + 1000)
    return lfilter([1.0], [1.0, -phi], e)[1000:]  # type: ignore[no-any-return]  # scipy is untyped


def monitor_for(columns: dict[str, list[Any]], reference: int) -> PipelineMonitor:
    """A monitor of these columns whose champion's profile is their first ``reference`` rows."""
    columns = {_name(c): v for c, v in columns.items()}
    types = {c: "float" if isinstance(v[0], float) else "string" for c, v in columns.items()}
    spec = parse_spec(
        {
            "name": "bench",
            "features": [{"name": c, "type": t} for c, t in types.items()],
            "label": {"classes": ["no", "yes"]},
        }
    )
    profile = build_profile({c: v[:reference] for c, v in columns.items()}, types)
    state = RegistryState()
    state.apply(spec_event(spec)[1], 0)
    state.apply(
        {
            "kind": "model_version",
            "pipeline": spec.name,
            "at": 0,
            "spec": None,
            "stage_change": None,
            "model": {
                "name": "m",
                "version": 1,
                "sha256": "0",
                "uri": "u",
                "stage": "champion",
                "traffic": 1.0,
                "created_at": 0,
                "reference_profile_json": orjson.dumps(profile).decode(),
            },
        },
        1,
    )
    pm = PipelineMonitor(spec, Tuning())
    pm.refresh(state)
    return pm


def _name(column: str) -> str:
    """A column name as a feature name (letters, digits, underscores; not starting with a digit)."""
    return re.sub(r"\W", "_", column if column[:1].isalpha() else f"f_{column}")


def false_alarms(
    columns: dict[str, list[Any]], reference: int = REFERENCE, batch: int = 100
) -> tuple[int, int]:
    """(raised events, live events) of a stationary stream of feature columns."""
    pm = monitor_for(columns, reference)
    columns = {_name(c): v for c, v in columns.items()}
    metrics = MonitorMetrics(CollectorRegistry())
    names = list(columns)
    n = len(columns[names[0]])
    raised = 0
    for lo in range(reference, n, batch):
        idx = list(range(lo, min(n, lo + batch)))
        records = [{"features": {c: columns[c][i] for c in names}} for i in idx]
        alerts = pm.on_features(
            Batch(records, idx, [0] * len(idx), "bench.features"), metrics, at=lo
        )
        raised += sum(a["state"] == "raised" for a in alerts)
    return raised, n - reference


def floats(x: np.ndarray) -> dict[str, list[Any]]:
    """One numeric column."""
    return {"x": [float(v) for v in x]}


def real_streams() -> dict[str, tuple[dict[str, list[Any]], int]]:
    """Real data shipped with installed packages: (columns, reference rows) per stream."""
    from river import datasets
    from sklearn import datasets as sk

    out: dict[str, tuple[dict[str, list[Any]], int]] = {}

    def columns(rows: list[dict[str, Any]], keep: list[str]) -> dict[str, list[Any]]:
        return {k: [float(r[k]) for r in rows] for k in keep}

    flow = [{"flow": y} for _, y in datasets.WaterFlow()]
    out["river WaterFlow (hourly, file order)"] = (columns(flow, ["flow"]), 500)
    sp = [x for x, _ in datasets.SP500Stocks()]
    out["river SP500 daily returns (10 stocks)"] = (columns(sp, list(sp[0])), 500)
    shuttle = [x for x, _ in datasets.Shuttle()]
    out["river Shuttle (9 sensors, file order)"] = (columns(shuttle, list(shuttle[0])), REFERENCE)
    bananas = [x for x, _ in datasets.Bananas()]
    out["river Bananas (file order)"] = (columns(bananas, list(bananas[0])), REFERENCE)
    rng = np.random.default_rng(0)
    for name, loader, keep in (
        ("breast cancer", sk.load_breast_cancer, 8),
        ("wine", sk.load_wine, 8),
        ("diabetes", sk.load_diabetes, 10),
    ):
        data = loader()
        rows = data.data[rng.integers(0, len(data.data), REFERENCE + 10_000)]
        out[f"sklearn {name} (resampled)"] = (
            {
                str(data.feature_names[j]).replace(" ", "_"): rows[:, j].astype(float).tolist()
                for j in range(min(keep, rows.shape[1]))
            },
            REFERENCE,
        )
    return out


def weather_columns(seed: int, n: int) -> dict[str, list[Any]]:
    """Simulated daily weather with no change (every feature, the categorical sky included)."""
    s = ms.weather(seed, n=n, change_at=None)
    return {c: [r[c] for r in s.rows] for c in s.rows[0]}


def stationary_table(seeds: list[int], n: int) -> Iterator[tuple[str, float, int]]:
    """False alarms per 10k events of every stationary stream."""
    synthetic: list[tuple[str, Callable[[int], dict[str, list[Any]]]]] = []
    for period in (24, 168, 365, 1000):
        for noise in (0.1, 0.5, 2.0):
            synthetic.append(
                (
                    f"seasonal period {period}, noise sd {noise}",
                    lambda s, p=period, e=noise: floats(seasonal(s, n, p, e)),
                )
            )
    synthetic.append(
        (
            "seasonal period 365, AR(0.8) noise sd 0.7",
            lambda s: floats(seasonal(s, n, 365, 0.7, 0.8)),
        )
    )
    for phi in (0.9, 0.95, 0.99):
        synthetic.append(
            (f"AR(1) phi {phi}", lambda s, f=phi: floats(ar1(np.random.default_rng(s), n, f)))
        )
    synthetic.append(("simulated daily weather (5 features)", lambda s: weather_columns(s, n)))
    for name, make in synthetic:
        raised = events = 0
        for seed in seeds:
            r, e = false_alarms(make(seed))
            raised, events = raised + r, events + e
        yield name, raised / events * 10_000, events
    for name, (cols, reference) in real_streams().items():
        r, e = false_alarms(cols, reference)
        yield name, r / e * 10_000, e


# ---- 2. delays -----------------------------------------------------------------------------------
def adwin_hits(values: np.ndarray) -> list[int]:
    """Positions where river's ADWIN (delta 0.002, its defaults otherwise) signals on ``values``."""
    det, hits = drift.ADWIN(delta=0.002), []
    for i, v in enumerate(values.tolist()):
        det.update(v)
        if det.drift_detected:
            hits.append(i)
    return hits


def first_after(hits: list[int], position: int) -> int | None:
    """Delay of the first signal at or after ``position``."""
    after = [h - position for h in hits if h >= position]
    return after[0] if after else None


def watch_delay(
    values: list[Any], reference: list[Any], numeric: bool, position: int
) -> int | None:
    """Delay of the monitor's drift verdict (ColumnWatch at defaults, batches of 100)."""
    from loopline.profile import categorical_profile, numeric_profile

    profile = numeric_profile(reference) if numeric else categorical_profile(reference)
    w = ColumnWatch(
        "x",
        profile,
        numeric,
        list(DEFAULTS.detectors),
        DEFAULTS.seed,
        DEFAULTS.window,
        DEFAULTS.window // 4,
        THRESHOLDS,
    )
    arr: Any = np.asarray(values, dtype=float) if numeric else values
    for lo in range(0, len(values), 100):
        chunk = arr[lo : lo + 100]
        f = w.update(chunk, list(range(lo, lo + len(chunk))), [0] * len(chunk))
        for c in (f.confirmed, f.windowed):
            if c is not None and c.level is not None and c.start + c.n > position:
                return c.start + c.n - 1 - position
    return None


def error_delay(errors: np.ndarray, position: int, regression: bool) -> int | None:
    """Delay of the monitor's degradation verdict on an error stream (ErrorWatch at defaults)."""
    names = [d for d in DEFAULTS.error_detectors if regression is False or d == "adwin"]
    w = ErrorWatch(
        regression,
        DEFAULTS.performance_window,
        names,
        DEFAULTS.seed,
        DEFAULTS.min_performance_drop,
        DEFAULTS.p_value,
    )
    for lo in range(0, errors.size, 100):
        chunk = errors[lo : lo + 100]
        f = w.add(chunk, np.arange(lo, lo + chunk.size))
        for r in (f.confirmed, f.windowed):
            if r is not None and r.degraded and r.end > position:
                return r.end - 1 - position
    return None


def fixed_model_errors(
    stream: Iterator[tuple[dict[str, Any], Any]], n: int, train: int, regression: bool = False
) -> np.ndarray:
    """Errors of a model trained on the first ``train`` rows, then fixed, on the next ``n``."""
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    rows = list(itertools.islice(stream, train + n))
    x = np.asarray([[float(v) for v in r.values()] for r, _ in rows])
    y = np.asarray([float(t) for _, t in rows])
    model: Any = (GradientBoostingRegressor if regression else GradientBoostingClassifier)(
        n_estimators=60, max_depth=3, random_state=0
    ).fit(x[:train], y[:train])
    pred = model.predict(x[train:])
    return np.abs(pred - y[train:]) if regression else (pred != y[train:]).astype(float)


def delay_table(seeds: list[int]) -> list[tuple[str, list[int | None], list[int | None], str]]:
    """(stream, monitor delays, ADWIN delays, what ADWIN watched) per change."""
    pos, n = 5000, 8000
    out = []

    def gaussian(s: int, mean: float, sd: float) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(s)
        live = np.r_[rng.normal(0, 1, pos), rng.normal(mean, sd, n - pos)]
        return live, rng.normal(0, 1, REFERENCE)

    for label, mean, sd in (
        ("mean +1 sd", 1.0, 1.0),
        ("mean +0.5 sd", 0.5, 1.0),
        ("standard deviation x2", 0.0, 2.0),
    ):
        ours, base = [], []
        for s in seeds:
            live, ref = gaussian(s, mean, sd)
            ours.append(watch_delay(live.tolist(), ref.tolist(), True, pos))
            base.append(first_after(adwin_hits(live), pos))
        out.append((label, ours, base, "values"))

    cats = np.array(["a", "b", "c", "d"])
    ours, base = [], []
    for s in seeds:
        rng = np.random.default_rng(s)
        live = np.r_[
            rng.choice(cats, pos, p=[0.4, 0.3, 0.2, 0.1]),
            rng.choice(cats, n - pos, p=[0.2, 0.2, 0.3, 0.3]),
        ]
        ref = rng.choice(cats, REFERENCE, p=[0.4, 0.3, 0.2, 0.1]).tolist()
        ours.append(watch_delay(live.tolist(), ref, False, pos))
        firsts = [first_after(adwin_hits((live == c).astype(float)), pos) for c in cats]
        base.append(min((d for d in firsts if d is not None), default=None))
    out.append(
        ("category mix .4/.3/.2/.1 -> .2/.2/.3/.3", ours, base, "each category's 0/1 indicator")
    )

    train = 2000
    concepts: list[tuple[str, Callable[[int], Iterator[tuple[dict[str, Any], Any]]], bool]] = [
        (
            "SEA 0->1 (fixed model's 0/1 errors)",
            lambda s: itertools.chain(
                itertools.islice(synth.SEA(variant=0, seed=s), train + pos),
                synth.SEA(variant=1, seed=s + 1000),
            ),
            False,
        ),
        (
            "Agrawal 0->2 (fixed model's 0/1 errors)",
            lambda s: itertools.chain(
                itertools.islice(synth.Agrawal(0, seed=s), train + pos),
                synth.Agrawal(2, seed=s + 1000),
            ),
            False,
        ),
        (
            "FriedmanDrift gra (fixed model's |errors|)",
            lambda s: iter(
                synth.FriedmanDrift(drift_type="gra", position=(train + pos, 10 * n), seed=s)
            ),
            True,
        ),
    ]
    for label, make, regression in concepts:
        ours, base = [], []
        for s in seeds:
            errors = fixed_model_errors(make(s), n, train, regression)
            ours.append(error_delay(errors, pos, regression))
            # Regression errors in units of their first 50's mean, as the monitor's detectors see.
            scale = (errors[:50].mean() or 1.0) if regression else 1.0
            base.append(first_after(adwin_hits(errors / scale), pos))
        out.append((label, ours, base, "the errors"))
    return out


# ---- 3. end to end -------------------------------------------------------------------------------
def end_to_end(seeds: list[int]) -> list[tuple[str, int, int, list[int | None], int]]:
    """(stream, runs, false alarms before the change, first alert delays, events) rows."""
    cases: list[tuple[str, Callable[[int], ms.Stream]]] = [
        ("weather: thermometer +6 C from event 6000", lambda s: ms.weather(s, kind="sensor")),
        ("weather: wetter climate from event 6000", lambda s: ms.weather(s, kind="climate")),
        ("nonlinear concept rotating over 300 events", lambda s: ms.moving_concept(s)),
        ("FriedmanDrift gra at event 6000 (regression)", lambda s: ms.friedman(s)),
    ]
    rows = []
    for label, make in cases:
        fa, delays, events = 0, [], 0
        for s in seeds:
            stream = make(s)
            run = ms.drive(stream)
            change = stream.change_at or len(stream.rows)
            fa += sum(1 for p, a in run.raised() if p <= change)
            events += change - stream.train
            after = [p for p, a in run.raised() if p > change and a["severity"] == "alert"]
            delays.append(after[0] - change if after else None)
        rows.append((label, len(seeds), fa, delays, events))
    return rows


def _median(xs: list[int | None]) -> float | None:
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def main() -> None:
    """Run the three parts and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--events", type=int, default=20_000, help="Live events per synthetic stationary stream."
    )
    parser.add_argument("--parts", default="123", help="Which parts to run (1, 2, 3).")
    add_engine_argument(parser, uses_broker=False)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    if "1" in args.parts:
        print("False alarms per 10,000 events (defaults; every raised event counts)")
        print(f"{'stream':52} {'per 10k':>8} {'events':>8}")
        for name, rate, events in stationary_table(seeds, args.events + REFERENCE):
            print(f"{name:52} {rate:8.2f} {events:8d}", flush=True)
    if "2" in args.parts:
        print(
            "\nDetection delay, i.i.d. streams, change at event 5000 (median of 5 seeds; - missed)"
        )
        print(f"{'change':44} {'monitor':>8} {'ADWIN':>8} {'ratio':>6}  ADWIN watched")
        for name, ours, base, what in delay_table(list(range(5))):
            a, b = _median(ours), _median(base)
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            print(
                f"{name:44} {'-' if a is None else a:>8} {'-' if b is None else b:>8} {ratio:>6}  "
                f"{what}; misses {sum(x is None for x in ours)}/{sum(x is None for x in base)}",
                flush=True,
            )
    if "3" in args.parts:
        print(
            "\nEnd to end through PipelineMonitor (first model on the first 2000 rows; feedback 50 "
            "events late)"
        )
        print(f"{'stream':48} {'runs':>4} {'false alarms before':>20} {'alert delays':>20}")
        for name, runs, fa, delays, events in end_to_end(seeds):
            shown = ",".join("-" if d is None else str(d) for d in delays)
            print(f"{name:48} {runs:4d} {fa:8d} in {events:6d} ev {shown:>20}", flush=True)
    print(f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
