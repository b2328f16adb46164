"""Trainer quality: served accuracy after a nonlinear concept drift, vs the frozen first model.

Each stream starts with a nonlinear first model (scikit-learn, exported with skl2onnx and a
float32 input, registered as champion the way a user would) and then changes its concept. The
loop runs the real code of every service except the broker: inference's plan (``build_plan`` and
its ``ModelLoader``) serves and shadows, the monitor's ``PipelineMonitor`` raises the alerts, and
a ``TrainerService`` is fed the encoded features, predictions, feedback and alerts through its own
``handle`` and decides with its own ``act`` (tournament, validation, registration, live trial,
promotion, probation, rollback), at DEFAULT trainer settings. The registry is the real
``ModelRegistry`` (validation, artifacts, stage events) over an in-memory ``RegistryState``
instead of the ``loopline.models`` topic. Labels come back ``LABEL_DELAY`` events late; inference
sees registry changes ``RELOAD_LAG`` events late.

Reported per stream: the frozen first model's accuracy and the served accuracy over the measured
events (the 1,000 events after the drift settles; on the 2,000-event circle, all 1,000 events
after the drift), the served accuracy on the events served by the trainer's promoted versions vs
the frozen model on the same events, the labels the first candidate had, and who won.
Run: ``.venv/bin/python -m bench.trainer_quality`` (``--stream circle`` for one; about 2 minutes).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from bench.common import add_engine_argument
from loopline import avro, topics
from loopline.artifacts import ArtifactStore
from loopline.models import ModelRegistry, champion, versions_of
from loopline.registry import RegistryState, now_ms, spec_event
from loopline.scoring import Scorer
from loopline.services.inference.plan import ModelLoader, Plan, build_plan
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.pipeline import Batch, PipelineMonitor, Tuning
from loopline.services.trainer.metrics import TrainerMetrics
from loopline.services.trainer.service import TrainerService, new_state
from loopline.services.trainer.settings import TrainerSettings
from loopline.spec import PipelineSpec, parse_spec

LABEL_DELAY = 200  # labels come back this many events after their event
RELOAD_LAG = 25  # inference applies registry changes this many events late (its registry poll)
STEP = 25  # events per micro-batch
Row = tuple[dict[str, Any], str]


# ---- streams -------------------------------------------------------------------------------------
def circle(n_before: int, n_after: int, seed: int, moves: bool = True) -> Iterator[Row]:
    """Points in the unit square, "in" inside a circle whose centre moves after ``n_before``."""
    rnd = random.Random(seed)
    for i in range(n_before + n_after):
        cx, cy = (0.35, 0.4) if i < n_before or not moves else (0.6, 0.6)
        x, y = rnd.random(), rnd.random()
        yield {"x": x, "y": y}, "in" if (x - cx) ** 2 + (y - cy) ** 2 < 0.3**2 else "out"


def _river(
    make: Callable[[int, int], Any],
    n_before: int,
    n_after: int,
    seed: int,
    names: list[str] | None = None,
) -> Iterator[Row]:
    for phase, count in ((0, n_before), (1, n_after)):
        for x, y in make(phase, seed + phase).take(count):
            yield (
                {(names[k] if names else str(k)): float(v) for k, v in enumerate(x.values())},
                str(y).lower(),
            )


def sine(n_before: int, n_after: int, seed: int) -> Iterator[Row]:
    """River's Sine: y < sin(x), then y < 0.5 + 0.3 sin(3 pi x) (the boundary bends)."""
    from river.datasets import synth

    return _river(
        lambda phase, s: synth.Sine(classification_function=2 * phase, seed=s),
        n_before,
        n_after,
        seed,
        ["x", "y"],
    )


AGRAWAL = ["salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears", "loan"]


def agrawal(n_before: int, n_after: int, seed: int) -> Iterator[Row]:
    """River's Agrawal loan rules: function 1 (age and salary bands), then 4 (with the loan)."""
    from river.datasets import synth

    return _river(
        lambda phase, s: synth.Agrawal(classification_function=(1, 4)[phase], seed=s),
        n_before,
        n_after,
        seed,
        AGRAWAL,
    )


def rbf(n_before: int, n_after: int, seed: int) -> Iterator[Row]:
    """River's RandomRBF (2 features, 4 centroids); after the drift its centroids move for
    ``RBF_MOVING`` events (RandomRBFDrift), then stay where they went (the drift settles).

    With more centroids the classes overlap so much that even a model trained on the settled
    concept gains little over the frozen one (8 centroids in 4 dimensions: frozen 0.85, best 0.88),
    which would measure the stream rather than the trainer."""
    from river.datasets import synth

    common = {
        "seed_model": 7,
        "seed_sample": seed,
        "n_classes": 2,
        "n_features": 2,
        "n_centroids": 4,
    }
    names = ["a", "b"]
    for x, y in synth.RandomRBF(**common).take(n_before):
        yield {names[k]: float(v) for k, v in enumerate(x.values())}, str(y)
    # Same seed_model: the moving generator starts from the static one's centroids.
    moving = synth.RandomRBFDrift(
        **{**common, "seed_sample": seed + 1}, change_speed=RBF_SPEED, n_drift_centroids=4
    )
    for i, (x, y) in enumerate(moving.take(n_after)):
        if i == RBF_MOVING:
            moving.change_speed = 0.0  # river reads it on every sample
        yield {names[k]: float(v) for k, v in enumerate(x.values())}, str(y)


RBF_MOVING = 500  # events during which the centroids move
RBF_SPEED = 0.002  # distance per event (features are in [0, 1]): 1.0 in all


@dataclass(frozen=True)
class Stream:
    """A benchmark stream: its generator, sizes, first model and measured window."""

    name: str
    make: Callable[[int, int, int], Iterator[Row]]
    before: int
    after: int
    first: str  # "poly_logistic" or "boosting"
    settle: int  # measured events start this many events after the drift

    @property
    def total(self) -> int:
        """Events in the stream."""
        return self.before + self.after


def still(n_before: int, n_after: int, seed: int) -> Iterator[Row]:
    """The circle that does not move: a control, where the trainer must not make things worse."""
    return circle(n_before, n_after, seed, moves=False)


STREAMS = [
    Stream("circle", circle, 1000, 1000, "poly_logistic", 0),
    Stream("no_drift", still, 1000, 2000, "poly_logistic", 1000),
    Stream("sine", sine, 1000, 2000, "boosting", 1000),
    Stream("agrawal", agrawal, 1000, 2000, "boosting", 1000),
    Stream("rbf_moving", rbf, 1000, 2000, "boosting", 1000),
]


def spec_for(name: str, rows: list[Row]) -> PipelineSpec:
    """The stream's pipeline: float features, two classes, auto promotion, trainer defaults."""
    x0 = rows[0][0]
    classes = sorted({y for _, y in rows})
    return parse_spec(
        {
            "name": f"bench-{name.replace('_', '-')}",
            "partitions": 1,
            "features": [{"name": k, "type": "float"} for k in x0],
            "label": {"name": "y", "classes": classes, "positive": classes[-1]},
            "deployment": {"promotion": "auto"},
        }
    )


def first_model(kind: str, spec: PipelineSpec, rows: list[Row]) -> bytes:
    """A user's nonlinear first model, trained on pre-drift data, exported with a float32 input."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    from loopline.services.trainer.batch import _tree_converter  # skl2onnx 1.20 + protobuf 7

    names = [f.name for f in spec.features]
    x = np.array([[r[n] for n in names] for r, _ in rows], dtype=np.float32)
    y = np.array([lab for _, lab in rows])
    if kind == "poly_logistic":
        model = make_pipeline(
            PolynomialFeatures(2), StandardScaler(), LogisticRegression(max_iter=1000)
        ).fit(x, y)
        custom = None
    else:
        model = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(x, y)
        custom = {
            HistGradientBoostingClassifier: _tree_converter("SklearnHistGradientBoostingClassifier")
        }
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, len(names)]))],
        options={id(model): {"zipmap": False}}
        if kind != "poly_logistic"
        else {id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
        custom_conversion_functions=custom,
    )
    return onx.SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped


# ---- the pieces around the trainer ---------------------------------------------------------------
class InMemoryRegistry(ModelRegistry):
    """The real ModelRegistry (validation, artifacts, stage rules) over an in-memory state."""

    def __init__(self, store: ArtifactStore, state: RegistryState, actor: str) -> None:
        self.store, self._state, self.actor = store, state, actor
        self.codec = avro.codec("registry")

    def state(self) -> RegistryState:
        """The live registry state."""
        return self._state

    def _publish(self, events: list[tuple[bytes, dict[str, Any]]]) -> None:
        for _, event in events:  # through the registry's Avro codec, as a reader would see it
            self._state.apply(self.codec.decode(self.codec.encode(event)), self._state.offset + 1)


class Reader:
    """What the trainer reads of the registry: its state."""

    def __init__(self, state: RegistryState) -> None:
        self.state = state


class Msg:
    """A consumed Kafka message, as the trainer's ``handle`` reads it."""

    def __init__(self, topic: str, value: bytes, offset: int, ts: int) -> None:
        self._topic, self._value, self._offset, self._ts = topic, value, offset, ts

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return 1, self._ts

    def error(self) -> None:
        return None


def make_trainer(
    spec: PipelineSpec, state: RegistryState, store: ArtifactStore, home: Path
) -> TrainerService:
    """A TrainerService with its decision code intact and no Kafka client (fed by ``handle``)."""
    svc = TrainerService.__new__(TrainerService)
    svc.settings = TrainerSettings(home=home, pipelines=[spec.name])
    svc.metrics = TrainerMetrics(CollectorRegistry())
    svc.reader = Reader(state)  # type: ignore[assignment]  # a stand-in reader
    svc.models = InMemoryRegistry(store, state, "trainer")
    svc.path = home / "trainer.ckpt"
    svc.offsets, svc.states = {}, {spec.name: new_state(spec, svc.settings)}
    svc.codecs = {spec.name: avro.Codec(spec.features_schema())}
    svc.specs = {spec.name: spec}
    t = spec.topics
    svc.topic_kind = {
        t.features: (spec.name, "features"),
        t.predictions: (spec.name, "predictions"),
        t.feedback: (spec.name, "feedback"),
        topics.ALERTS: (None, "alerts"),
    }
    svc._champions, svc._last_poll, svc._last_ckpt, svc._dirty = {}, 0.0, 0.0, False
    return svc


@dataclass
class Outcome:
    """What one stream run produced."""

    name: str
    served: dict[int, tuple[int, str]] = field(default_factory=dict)  # event -> (version, label)
    frozen: list[str] = field(default_factory=list)
    truth: list[str] = field(default_factory=list)
    alerts: list[tuple[int, str]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    stage_events: list[tuple[int, int, str, str]] = field(
        default_factory=list
    )  # (event, version, to, reason)


def run_stream(
    stream: Stream,
    seed: int,
    home: Path,
    label_fraction: float = 1.0,
    label_delay: int = LABEL_DELAY,
) -> Outcome:
    """Run one stream end to end; return what was served and decided."""
    rows = list(stream.make(stream.before, stream.after, seed))
    train = list(stream.make(2000, 0, seed + 1000))
    spec = spec_for(stream.name, rows + train)
    state = RegistryState()
    state.apply(spec_event(spec)[1], 0)
    store = ArtifactStore(str(home / "artifacts"))
    user = InMemoryRegistry(store, state, "user")
    first = first_model(stream.first, spec, train)
    v1 = user.register(spec.name, first, stage="champion", reference=[r for r, _ in train[:1000]])
    trainer = make_trainer(spec, state, store, home)
    monitor = PipelineMonitor(spec, Tuning())
    monitor.refresh(state)
    mmetrics = MonitorMetrics(CollectorRegistry())
    loader = ModelLoader()
    plan: Plan | None = build_plan(spec.name, spec, state, loader, None)
    seen_offset = state.offset
    pending_plan: tuple[int, Plan | None] | None = None
    fcodec, pcodec = avro.Codec(spec.features_schema()), avro.codec("prediction")
    bcodec, acodec = avro.codec("feedback"), avro.codec("alert")
    out = Outcome(stream.name, truth=[y for _, y in rows])
    out.frozen = Scorer(first, spec).score([r for r, _ in rows]).labels or []
    t = spec.topics
    offsets = {t.features: 0, t.predictions: 0, t.feedback: 0, topics.ALERTS: 0}
    predictions: dict[int, list[dict[str, Any]]] = {}
    stage_seen = len(state.stage_changes)

    def msg(topic: str, value: bytes) -> Msg:
        offsets[topic] += 1
        return Msg(topic, value, offsets[topic] - 1, now_ms())

    for start in range(0, len(rows), STEP):
        ids = list(range(start, min(start + STEP, len(rows))))
        # Inference applies registry changes RELOAD_LAG events after they happen.
        if state.offset != seen_offset:
            seen_offset = state.offset
            pending_plan = (start + RELOAD_LAG, None)
        if pending_plan is not None and start >= pending_plan[0]:
            plan, pending_plan = build_plan(spec.name, spec, state, loader, plan), None
            monitor.refresh(state)
        assert plan is not None
        feats = [rows[i][0] for i in ids]
        events, preds = [], []
        ts = now_ms()
        for i in ids:
            events.append(
                {
                    "event_id": f"e{i}",
                    "key": f"k{i}",
                    "ts": ts,
                    "ingested_at": ts,
                    "source": {"topic": "raw", "partition": 0, "offset": i},
                    "features": rows[i][0],
                }
            )
        route = plan.route([f"k{i}" for i in ids])
        for j, variant in enumerate([*plan.served, *plan.shadows]):
            result = variant.scorer.score(feats)
            served_variant = variant in plan.served
            for k, i in enumerate(ids):
                if (
                    served_variant
                    and (route[k] if route is not None else len(plan.served) - 1) != j
                ):
                    continue
                name, version, sha = variant.ident
                p = {
                    "prediction_id": f"e{i}/{name}/{version}/{variant.variant}",
                    "event_id": f"e{i}",
                    "key": f"k{i}",
                    "pipeline": spec.name,
                    "model_name": name,
                    "model_version": version,
                    "model_sha256": sha,
                    "variant": variant.variant,
                    "served": served_variant,
                    "label": (result.labels or [None] * len(ids))[k],
                    "value": (result.values or [None] * len(ids))[k],
                    "scores": {},
                    "source": {"topic": t.features, "partition": 0, "offset": i},
                    "event_ts": ts,
                    "scored_at": now_ms(),
                }
                preds.append(p)
                predictions.setdefault(i, []).append(p)
                if served_variant:
                    out.served[i] = (version, p["label"])
        # Which events get a label is fixed per event (the same in every run of a seed).
        labeled = [
            i - label_delay
            for i in ids
            if i - label_delay >= 0
            and random.Random(f"{seed}/{i - label_delay}").random() < label_fraction
        ]
        fbs = [
            {
                "feedback_id": f"f{i}",
                "prediction_id": None,
                "event_id": f"e{i}",
                "label": rows[i][1],
                "value": None,
                "verdict": None,
                "ts": ts,
            }
            for i in labeled
        ]
        batch = [msg(t.features, fcodec.encode(e)) for e in events]
        batch += [msg(t.predictions, pcodec.encode(p)) for p in preds]
        batch += [msg(t.feedback, bcodec.encode(f)) for f in fbs]
        trainer.handle(batch)  # type: ignore[arg-type]  # stand-in messages
        alerts = monitor.on_features(
            Batch(events, list(range(len(events))), [0] * len(events), t.features), mmetrics, ts
        )
        alerts += monitor.on_predictions(
            Batch(preds, list(range(len(preds))), [0] * len(preds), t.predictions), mmetrics, ts
        )
        alerts += monitor.on_feedback(
            Batch(fbs, list(range(len(fbs))), [0] * len(fbs), t.feedback), mmetrics, ts
        )
        if alerts:
            out.alerts += [
                (ids[-1], f"{a['signal']}:{a['state']}:{a.get('detector') or a.get('feature')}")
                for a in alerts
            ]
            encoded = [msg(topics.ALERTS, acodec.encode(a)) for a in alerts]
            trainer.handle(encoded)  # type: ignore[arg-type]  # stand-in messages
        trainer.act()
        for c in state.stage_changes[stage_seen:]:
            out.stage_events.append((ids[-1], c["version"], c["to_stage"], c["reason"]))
        stage_seen = len(state.stage_changes)
    out.versions = [v for v in versions_of(state, spec.name) if v["version"] > v1["version"]]
    final = champion(state, spec.name)
    out.stage_events.append((len(rows), final["version"] if final else -1, "final champion", ""))
    return out


# ---- report --------------------------------------------------------------------------------------
def _acc(pairs: list[tuple[str, str]]) -> float:
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else math.nan


def report(stream: Stream, o: Outcome) -> dict[str, Any]:
    """The stream's row of the table."""
    import orjson

    lo = stream.before + stream.settle
    measured = range(lo, min(lo + 1000, stream.total))
    frozen = _acc([(o.frozen[i], o.truth[i]) for i in measured])
    served = _acc([(o.served[i][1], o.truth[i]) for i in measured])
    trainer_events = [i for i in range(stream.before, stream.total) if o.served[i][0] > 1]
    promoted_acc = _acc([(o.served[i][1], o.truth[i]) for i in trainer_events])
    frozen_same = _acc([(o.frozen[i], o.truth[i]) for i in trainer_events])
    first = o.versions[0] if o.versions else None
    card = orjson.loads(first["scorecard_json"]) if first else {}
    winners = [
        (v["version"], orjson.loads(v["scorecard_json"])["winner"], v["stage"]) for v in o.versions
    ]
    return {
        "stream": stream.name,
        "events": f"{stream.before}+{stream.after}",
        "measured": f"{measured.start}-{measured.stop}",
        "frozen": frozen,
        "served": served,
        "gain_points": 100 * (served - frozen),
        "served_by_trainer": len(trainer_events),
        "trainer_acc": promoted_acc,
        "frozen_same_events": frozen_same,
        "first_alert": next((a for a in o.alerts if ":raised:" in a[1]), None),
        "first_candidate_labels": (card.get("window") or {}).get("usable"),
        "first_candidate_holdout": (card.get("evidence") or {}).get("holdout"),
        "versions": winners,
        "stages": o.stage_events,
        "first_scorecard": card.get("summary"),
        "cards": [
            (
                v["version"],
                {k: orjson.loads(v["scorecard_json"]).get(k) for k in ("summary", "window")},
            )
            for v in o.versions
        ],
    }


def main() -> None:
    """Run every stream (or ``--stream``) and print one table row per stream."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stream", choices=[s.name for s in STREAMS])
    parser.add_argument("--seed", type=int, default=1, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (runs per stream)")
    parser.add_argument(
        "--short",
        action="store_true",
        help="every stream 1000 + 1000 events, measured over the 1000 after the drift",
    )
    parser.add_argument("--label-fraction", type=float, default=1.0, help="share of events labeled")
    parser.add_argument(
        "--label-delay", type=int, default=LABEL_DELAY, help="events until a label arrives"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    add_engine_argument(parser, uses_broker=False)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for stream, seed in [(s, args.seed + k) for s in STREAMS for k in range(args.seeds)]:
        if args.stream and stream.name != args.stream:
            continue
        if args.short:
            stream = Stream(stream.name, stream.make, 1000, 1000, stream.first, 0)
        with tempfile.TemporaryDirectory() as tmp:
            r = report(
                stream, run_stream(stream, seed, Path(tmp), args.label_fraction, args.label_delay)
            )
        print(
            f"seed {seed} {r['stream']:<11} events {r['events']:<10} measured {r['measured']:<10} "
            f"frozen {r['frozen']:.3f} "
            f"served {r['served']:.3f} ({r['gain_points']:+.1f} pts); trainer versions served "
            f"{r['served_by_trainer']} post-drift events at {r['trainer_acc']:.3f} vs frozen "
            f"{r['frozen_same_events']:.3f}; first alert {r['first_alert']}; first candidate from "
            f"{r['first_candidate_labels']} labels (holdout {r['first_candidate_holdout']})",
            flush=True,
        )
        print(f"    versions {r['versions']}", flush=True)
        if args.verbose:
            for s in r["stages"]:
                print(f"    at event {s[0]}: v{s[1]} -> {s[2]}: {s[3][:200]}")
            print(f"    first scorecard: {r['first_scorecard']}")
            for v in r["cards"]:
                print(f"    v{v[0]}: {v[1]}")


if __name__ == "__main__":
    main()
