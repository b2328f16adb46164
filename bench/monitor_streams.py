"""Realistic streams for the monitor, and a driver that feeds them through ``PipelineMonitor``.

The driver does what the services do: a first model (scikit-learn, exported to ONNX) is trained
on the first ``train`` rows and registered through the registry's own validation, which scores
the rows with ONNX Runtime and builds the reference profile; then every later row is a feature
event, the model's prediction (ONNX Runtime, as inference writes it) and, ``delay`` events
later, the feedback with the truth. Offsets are positions in the stream, so an alert's
``first_offset`` and the position it was raised at are in events.

Streams:

- :func:`weather`: daily weather with seasons (a year is 365 events) and persistent anomalies;
  the label is "rain tomorrow". A real change at ``change_at``: a thermometer reading 6 degrees
  too warm (``sensor``), or a wetter climate (``climate``: more humid, more rain).
- :func:`moving_concept`: i.i.d. features, a nonlinear concept whose boundary rotates from
  ``change_at`` on over ``width`` events: only the errors show it.
- :func:`friedman`: river's FriedmanDrift regression (nonlinear), global abrupt drift.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry

from loopline.models import validate_model
from loopline.registry import RegistryState, spec_event
from loopline.scoring import Scorer
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch, PipelineMonitor, Tuning
from loopline.spec import PipelineSpec, parse_spec

Rows = list[dict[str, Any]]


@dataclass
class Stream:
    """Feature rows, their truth, and where the real change begins (None: stationary)."""

    spec: PipelineSpec
    rows: Rows
    truth: list[Any]
    change_at: int | None
    train: int = 2000


def _ar(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """A stationary AR(1) series with standard deviation ``sd``."""
    e = rng.normal(0, sd * np.sqrt(1 - phi**2), n)
    out = np.empty(n)
    x = rng.normal(0, sd)
    for i in range(n):
        x = phi * x + e[i]
        out[i] = x
    return out


WEATHER_SPEC = {
    "name": "weather",
    "partitions": 1,
    "features": [
        {"name": "temperature", "type": "float"},
        {"name": "humidity", "type": "float"},
        {"name": "pressure", "type": "float"},
        {"name": "wind", "type": "float"},
        {"name": "sky", "type": "string"},
    ],
    "label": {"name": "rain_tomorrow", "classes": ["no", "yes"], "positive": "yes"},
}


def weather(seed: int, n: int = 8000, change_at: int | None = 6000, kind: str = "sensor") -> Stream:
    """Daily weather with seasons; a real change at ``change_at`` (``sensor`` or ``climate``)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n + 1)
    season = np.sin(2 * np.pi * t / 365.25 + rng.uniform(0, 2 * np.pi))
    wet = np.zeros(n + 1)
    if change_at is not None and kind == "climate":
        wet[change_at:] = 1.0
    temperature = 11 + 8 * season + _ar(rng, n + 1, 0.75, 3.0)
    humidity = np.clip(72 - 10 * season + 8 * wet + _ar(rng, n + 1, 0.6, 8.0), 15, 100)
    pressure = 1013 - 2 * season - 3 * wet + _ar(rng, n + 1, 0.8, 7.0)
    wind = np.exp(1.2 - 0.25 * season + _ar(rng, n + 1, 0.5, 0.45))
    # Rain depends on humidity, falling pressure and wind, nonlinearly.
    drop = np.r_[0.0, np.diff(pressure)]
    logit = (
        -1.2
        + 0.12 * (humidity - 72)
        - 0.18 * drop
        - 0.05 * (pressure - 1013)
        + 0.4 * np.tanh(wind - 3)
        + 0.02 * np.maximum(humidity - 85, 0) ** 2 * 0.1
    )
    rain = rng.random(n + 1) < 1 / (1 + np.exp(-logit))
    sky = np.where(rain, "rain", np.where(humidity > 75, "cloudy", "clear"))
    reading = temperature.copy()
    if change_at is not None and kind == "sensor":
        reading[change_at:] += 6.0
    rows = [
        {
            "temperature": round(float(reading[i]), 1),
            "humidity": round(float(humidity[i]), 1),
            "pressure": round(float(pressure[i]), 1),
            "wind": round(float(wind[i]), 2),
            "sky": str(sky[i]),
        }
        for i in range(n)
    ]
    truth = ["yes" if rain[i + 1] else "no" for i in range(n)]
    return Stream(parse_spec(WEATHER_SPEC), rows, truth, change_at)


CONCEPT_SPEC = {
    "name": "concept",
    "partitions": 1,
    "features": [{"name": f"x{i}", "type": "float"} for i in range(4)],
    "label": {"name": "y", "classes": ["no", "yes"], "positive": "yes"},
}


def moving_concept(
    seed: int, n: int = 8000, change_at: int | None = 6000, width: int = 300
) -> Stream:
    """i.i.d. features; a nonlinear boundary that rotates by 90 degrees over ``width`` events."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 4))
    angle = np.zeros(n)
    if change_at is not None:
        angle = np.clip((np.arange(n) - change_at) / max(1, width), 0, 1) * np.pi / 2
    u = x[:, 0] * np.cos(angle) + x[:, 1] * np.sin(angle)
    v = -x[:, 0] * np.sin(angle) + x[:, 1] * np.cos(angle)
    score = np.sin(3 * u) + v**2 - 0.5 * x[:, 2] * x[:, 3] - 0.3
    flip = rng.random(n) < 0.05  # label noise
    y = (score > 0) ^ flip
    rows = [{f"x{j}": float(x[i, j]) for j in range(4)} for i in range(n)]
    return Stream(parse_spec(CONCEPT_SPEC), rows, ["yes" if b else "no" for b in y], change_at)


FRIEDMAN_SPEC = {
    "name": "friedman",
    "partitions": 1,
    "features": [{"name": f"x{i}", "type": "float"} for i in range(10)],
    "label": {"name": "y", "task": "regression"},
}


def friedman(seed: int, n: int = 8000, change_at: int | None = 6000) -> Stream:
    """River's FriedmanDrift (global recurring abrupt): the function changes at ``change_at``."""
    from river.datasets import synth

    position = (change_at if change_at is not None else n * 10, n * 10)
    gen = synth.FriedmanDrift(drift_type="gra", position=position, seed=seed)
    rows, truth = [], []
    for x, y in itertools.islice(gen, n):
        rows.append({f"x{i}": float(x[i]) for i in range(10)})
        truth.append(float(y))
    return Stream(parse_spec(FRIEDMAN_SPEC), rows, truth, change_at)


def train_onnx(stream: Stream) -> bytes:
    """A gradient-boosted model of the first ``train`` rows, exported to ONNX (float32 input)."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    spec = stream.spec
    cols = [f.name for f in spec.features if f.type != "string"]
    x = np.asarray([[r[c] for c in cols] for r in stream.rows[: stream.train]], dtype=np.float32)
    y = np.asarray(stream.truth[: stream.train])
    if spec.label.task == "regression":
        model: Any = GradientBoostingRegressor(n_estimators=80, max_depth=3, random_state=0).fit(
            x, y
        )
        return to_onnx(model, x[:1]).SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped
    model = GradientBoostingClassifier(n_estimators=80, max_depth=3, random_state=0).fit(x, y)
    return to_onnx(model, x[:1], options={id(model): {"zipmap": False}}).SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped


def registry(spec: PipelineSpec, model: bytes, reference: Rows) -> tuple[RegistryState, Scorer]:
    """A registry with the spec and the model as champion, profiled by registration's validation."""
    checked = validate_model(model, spec, reference)
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
                "sha256": "0" * 64,
                "uri": "file:///m",
                "stage": "champion",
                "traffic": 1.0,
                "created_at": 0,
                "reference_profile_json": orjson.dumps(checked.profile).decode(),
            },
        },
        1,
    )
    return state, Scorer(model, spec, checked.fill_values)


@dataclass
class Run:
    """Alerts a stream raised, with the position (event index) each was raised at."""

    alerts: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    monitor: PipelineMonitor | None = None

    def raised(self) -> list[tuple[int, dict[str, Any]]]:
        """Raised events, in order."""
        return [(p, a) for p, a in self.alerts if a["state"] == "raised"]


def drive(
    stream: Stream,
    batch: int = 100,
    delay: int = 50,
    spec: PipelineSpec | None = None,
    on_batch: Callable[[PipelineMonitor, int], None] | None = None,
) -> Run:
    """Train, register and monitor ``stream`` after its training rows, as the services would."""
    spec = spec or stream.spec
    state, scorer = registry(spec, train_onnx(stream), stream.rows[: stream.train])
    pm = PipelineMonitor(spec, Tuning())
    pm.refresh(state)
    metrics = MonitorMetrics(CollectorRegistry())
    run = Run(monitor=pm)
    t = spec.topics
    start = stream.train
    regression = spec.label.task == "regression"
    for lo in range(start, len(stream.rows), batch):
        hi = min(lo + batch, len(stream.rows))
        idx = list(range(lo, hi))
        rows = stream.rows[lo:hi]
        events = [{"features": r} for r in rows]
        result = scorer.score(rows)
        preds = [
            {
                "prediction_id": f"p{i}",
                "event_id": f"e{i}",
                "model_name": "m",
                "model_version": 1,
                "variant": "champion",
                "served": True,
                "label": result.labels[j] if result.labels is not None else None,
                "value": result.values[j] if result.values is not None else None,
                "scores": result.scores[j] if result.scores is not None else {},
                "scored_at": i,
            }
            for j, i in enumerate(idx)
        ]
        out = pm.on_features(Batch(events, idx, [0] * len(idx), t.features), metrics, at=hi)
        out += pm.on_predictions(
            Batch(preds, idx, [0] * len(idx), t.predictions), metrics, at=hi, now_s=1.0
        )
        labeled = [i - delay for i in idx if i - delay >= start]
        if labeled:
            fb = [
                {
                    "feedback_id": f"f{i}",
                    "prediction_id": f"p{i}",
                    "event_id": None,
                    "label": None if regression else stream.truth[i],
                    "value": stream.truth[i] if regression else None,
                    "verdict": None,
                    "ts": i,
                }
                for i in labeled
            ]
            out += pm.on_feedback(
                Batch(fb, labeled, [0] * len(labeled), t.feedback), metrics, at=hi
            )
        run.alerts += [(hi, a) for a in out]
        if on_batch is not None:
            on_batch(pm, hi)
    return run
