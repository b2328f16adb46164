"""Monitor throughput as a ratio to the inference service's, on the same pipeline, broker and run.

Run: ``.venv/bin/python -m bench.monitor_throughput [--engine tansu|kafka] [--events N] [--rounds R]
[--shadow]``
(defaults N = 60000, R = 3: about 70 s on 2 cores, 90 s with ``--shadow``).

Starts its own broker (``--engine``; inference runs with that engine's default delivery:
at-least-once on Tansu, transactions on Kafka) and applies examples/fraud.yaml (7 features;
adwin + page_hinkley per numeric feature, ddm on errors, window 1000). Then:

1. registers through the real model registry (validation, artifact store, reference profiles of
   5000 reference records, so the monitor runs PSI/KS on features and outputs) a champion and a
   challenger taking 50 % of the keys (``--shadow``: a shadow that scores every event instead):
   two scikit-learn logistic regressions, exported with skl2onnx, learned from a ground truth;
2. writes N feature events (amount drifted by +20 against the reference) and runs the real
   inference service (``loopline run inference`` as a subprocess, as bench/inference_bench.py does)
   until it has scored them all. Its rate is N over the spread of the predictions' ``scored_at``,
   so the group join and model loading are not counted;
3. writes feedback (a label drawn from the same ground truth) for every second event;
4. per round, in fresh consumer groups, over the features, the predictions inference actually
   wrote and the feedback:

   - raw: consume every message of the three topics and count it (the broker-side limit);
   - monitor: the monitor's hot path on the same messages (consume, decode, quality, online
     detectors, windowed PSI/KS, feedback join, alerts): ``MonitorService.handle`` as ``run``
     calls it;
   - handle only: the same ``handle`` on messages already in memory, timed in CPU seconds of the
     thread (the monitor's own cost, insensitive to other load on the machine).

Monitor rates are events/s: feature events per second, each with its predictions (1, or 2 with
``--shadow``) and its feedback (every second event). The monitor keeps up with inference on one
core when the ratio monitor / inference is at least 1. Monitor times run from the first batch to
the last message; group joins are excluded. Inference is measured once (one subprocess), the
monitor and the raw loop once per round (medians reported).
"""

from __future__ import annotations

import argparse
import logging
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from bench.common import add_engine_argument, bench_broker
from bench.inference_bench import Collector, produce_all, say
from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import KafkaConfig
from loopline.models import ModelRegistry, NewVersion
from loopline.registry import RegistryReader, RegistryState, now_ms
from loopline.scoring import tabular_features
from loopline.services.monitor.metrics import MonitorMetrics
from loopline.services.monitor.service import MonitorService, tune_gc
from loopline.services.monitor.settings import MonitorSettings
from loopline.spec import PipelineSpec, load_spec

REPO = Path(__file__).resolve().parent.parent
REFERENCE = 5000  # reference records behind both versions' profiles


def features_of(rng: np.random.Generator, n: int,
                shift: float = 0.0) -> dict[str, list]:  # type: ignore[type-arg]  # any records
    """Columns of n fraud-like events."""
    return {"customer_id": [f"c{i}" for i in rng.integers(0, 1000, n)],
            "amount": np.abs(rng.normal(100 + shift, 50, n)).tolist(),
            "merchant_risk": rng.random(n).tolist(), "hour": rng.integers(0, 24, n).tolist(),
            "country": rng.choice(["DE", "FR", "GB", "NL", "US"], n).tolist(),
            "card_present": (rng.random(n) < 0.7).tolist(),
            "device_age_days": [None if r < 0.1 else int(d)
                                for r, d in zip(rng.random(n), rng.integers(0, 900, n))]}


def truth(rng: np.random.Generator,
          cols: dict[str, list]) -> np.ndarray:  # type: ignore[type-arg]  # any records
    """Ground-truth labels ("0"/"1") of events: fraud
    likelier for big amounts, risky merchants, card absent."""
    logit = ((np.asarray(cols["amount"]) - 100) / 40 + 4 * (np.asarray(cols["merchant_risk"]) - 0.7)
             - 1.5 * np.asarray(cols["card_present"], dtype=float))
    return np.where(rng.random(logit.size) < 1 / (1 + np.exp(-logit)), "1", "0")


def records_of(cols: dict[str, list]) -> list[dict[str, Any]]:  # type: ignore[type-arg]  # any records
    """Feature records from columns."""
    return [dict(zip(cols, row)) for row in zip(*cols.values())]


def train(reference: list[dict[str, Any]], labels: np.ndarray, columns: list[str],
          c: float) -> bytes:
    """A logistic regression on the reference records, exported as ONNX (single float input)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.array([[r[k] for k in columns] for r in reference], dtype=np.float32)  # None -> NaN
    x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(C=c, max_iter=2000).fit(x, labels.astype(int))
    return to_onnx(lr, x[:1],
                   options={"zipmap": False}).SerializeToString()  # type: ignore[no-any-return]  # onnx is untyped


def register(kafka: KafkaConfig, spec: PipelineSpec, home: Path, shadow: bool) -> None:
    """Champion and challenger (or shadow) through the real registry, with reference profiles."""
    rng = np.random.default_rng(1)
    cols = features_of(rng, REFERENCE)
    reference, labels = records_of(cols), truth(rng, cols)
    columns = tabular_features(spec)
    registry = ModelRegistry(kafka, ArtifactStore(str(home / "artifacts")), actor="bench")
    registry.register(spec.name, train(reference, labels, columns, 1.0),
                      NewVersion(name="lr", stage="champion", reference=reference))
    half = REFERENCE // 2  # the second version learned from fewer records, more regularised
    registry.register(spec.name, train(reference[:half], labels[:half], columns, 0.05), NewVersion(
        name="lr", stage="shadow" if shadow else "challenger", traffic=0.0 if shadow else 0.5,
        reference=reference))


def write_events(kafka: KafkaConfig, spec: PipelineSpec, n: int) -> np.ndarray:
    """Write n feature events keyed by customer; return their ground-truth labels."""
    rng = np.random.default_rng(0)
    cols = features_of(rng, n, shift=20.0)
    encode = avro.Codec(spec.features_schema()).encode
    ts = now_ms()
    msgs = []
    for i, rec in enumerate(records_of(cols)):
        key = rec["customer_id"]
        msgs.append((key.encode(), encode({
            "event_id": f"e{i}", "key": key, "ts": ts, "ingested_at": ts,
            "source": {"topic": spec.topics.raw, "partition": 0, "offset": i}, "features": rec})))
    produce_all(kafka, spec.topics.features, msgs)
    return truth(rng, cols)


def write_feedback(kafka: KafkaConfig, spec: PipelineSpec, labels: np.ndarray) -> int:
    """Feedback (label by event id) for every second event; return how many were written."""
    encode = avro.codec("feedback").encode
    msgs = [(f"e{i}".encode(), encode({"feedback_id": f"f{i}", "prediction_id": None,
                                       "event_id": f"e{i}",
                                        "label": str(labels[i]), "value": None, "verdict": None,
                                       "ts": now_ms()}))
            for i in range(0, labels.size, 2)]
    produce_all(kafka, spec.topics.feedback, msgs)
    return len(msgs)


def run_inference(kafka: KafkaConfig, spec: PipelineSpec, env: dict[str, str], n: int,
                  expected: int) -> float:
    """Score the n pre-loaded events with the real inference service; return its events/s."""
    col = Collector(kafka, spec.topics.predictions, spec.partitions, decode=True)
    proc = subprocess.Popen([sys.executable, "-m", "loopline.app.cli", "run", "inference"], env=env)
    try:
        col.wait(expected, timeout_s=300)
        span_s = (max(col.scored) - min(col.scored)) / 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        col.close()
    if len(col.arrivals) != expected:
        raise RuntimeError(f"inference wrote {len(col.arrivals)} predictions, expected {expected}")
    rate = n / span_s
    say(f"inference service: {rate:,.0f} events/s ({n} events, {expected} predictions, scored in "
        f"{span_s:.2f}s)")
    return rate


def consume_all(kafka: KafkaConfig, topics: list[str], group: str, target: int, batch_size: int,
                handle=None) -> tuple[float, list[Message]]:  # type: ignore[no-untyped-def]  # any batch handler
    """Consume ``target`` messages (handing each batch
    to ``handle``); messages/s from the first batch."""
    consumer = kafka.consumer("bench", group)
    consumer.subscribe(topics)
    got: list[Message] = []
    first = 0.0
    try:
        while len(got) < target:
            batch = [m for m in consumer.consume(batch_size, 0.05) if m.error() is None]
            if not batch:
                continue
            if not first:
                first = time.perf_counter()
            if handle is not None:
                handle(batch)
            got.extend(batch)
        return len(got) / (time.perf_counter() - first), got
    finally:
        consumer.close()


def service(settings: MonitorSettings, state: RegistryState) -> MonitorService:
    """A fresh monitor that knows the registry and holds every pipeline (as after catch-up)."""
    svc = MonitorService(settings, MonitorMetrics(CollectorRegistry()))
    svc.sync(state)
    for name in svc.wanted(state):
        svc.adopt(name, None)  # fresh state: the monitor's own changelog is not what is measured
    tune_gc()  # as MonitorService.run does once the registry is read
    return svc


def measure_monitor(kafka: KafkaConfig, settings: MonitorSettings, state: RegistryState, home: Path,
                    topics: list[str], total: int, events_per_message: float,
                    rounds: int) -> list[list[float]]:
    """Per round: raw consume and monitor msg/s, handle-only msg per CPU-second."""
    raw, mon, mem = [], [], []
    for r in range(rounds):
        rate, messages = consume_all(kafka, topics, f"bench-raw-{r}", total, settings.batch_size)
        raw.append(rate)
        svc = service(settings, state)
        alerts: list[dict] = []  # type: ignore[type-arg]
        rate, _ = consume_all(kafka, topics, f"bench-mon-{r}", total, settings.batch_size,
                              lambda b: alerts.extend(svc.handle(b)))  # noqa: B023 - called before the loop moves on
        mon.append(rate)
        svc = service(settings, state)
        t0 = time.thread_time()  # CPU of this thread only: robust to other load on the machine
        for i in range(0, len(messages), settings.batch_size):
            svc.handle(messages[i:i + settings.batch_size])
        mem.append(len(messages) / (time.thread_time() - t0))
        say(f"round {r + 1}: raw consume {raw[-1]:,.0f} msg/s, monitor {mon[-1]:,.0f} msg/s "
            f"= {mon[-1] * events_per_message:,.0f} ev/s ({mon[-1] / raw[-1]:.0%} of raw), handle "
            f"only {mem[-1] * events_per_message:,.0f} ev per CPU-second; {len(alerts)} alert "
            "events")
    return [raw, mon, mem]


def main() -> None:
    """Run the benchmark and print events/s and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000, help="feature events")
    parser.add_argument("--rounds", type=int, default=3, help="monitor and raw-consume rounds")
    parser.add_argument("--shadow", action="store_true",
                        help="second version as a shadow scoring every event (2 predictions per "
                             "event)")
    add_engine_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    n = args.events
    preds = 2 * n if args.shadow else n
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        with bench_broker(args.engine, home) as broker:
            settings = broker.settings(MonitorSettings)
            kafka = KafkaConfig.from_settings(settings)
            spec = load_spec(REPO / "examples" / "fraud.yaml").model_copy(
                update={"name": "benchmon"})
            apply_spec(kafka, spec)
            say("registering champion + "
                f"{'shadow' if args.shadow else 'challenger (50 % traffic)'} "
                "(ONNX logistic regressions, reference profiles)")
            register(kafka, spec, home, args.shadow)
            say(f"writing {n} feature events")
            labels = write_events(kafka, spec, n)
            say("running the inference service on them")
            inference = run_inference(kafka, spec, broker.env(LOOPLINE_PIPELINES=spec.name), n,
                                      preds)
            feedback = write_feedback(kafka, spec, labels)
            say(f"wrote {feedback} feedback records")
            reader = RegistryReader(kafka, "bench-registry")
            state = reader.catch_up()
            reader.close()
            total = n + preds + feedback
            topics = [spec.topics.features, spec.topics.predictions, spec.topics.feedback]
            raw, mon, mem = (statistics.median(x) for x in measure_monitor(
                kafka, settings, state, home, topics, total, n / total, args.rounds))
    e_mon, e_mem = mon * n / total, mem * n / total
    say(f"results ({n} events = {n} feature messages + {preds} predictions + {feedback} feedback; "
        f"monitor: median of {args.rounds} rounds):")
    for line in (f"inference service      {inference:>9,.0f} ev/s",
                 f"monitor end-to-end     {e_mon:>9,.0f} ev/s               monitor / inference: "
                 f"{e_mon / inference:.2f}",
                 f"monitor handle only    {e_mem:>9,.0f} ev per CPU-second  monitor / inference: "
                 f"{e_mem / inference:.2f}  ({1e6 / e_mem:.0f} us per event, {1e6 / mem:.1f} us "
                 "per message)",
                 f"monitor vs raw consume {mon:>9,.0f} msg/s              vs {raw:,.0f} msg/s: "
                 f"{mon / raw:.0%}",
                 f"keeps up with inference on one core: {'yes' if e_mon >= inference else 'no'}"):
        print(f"  {line}", flush=True)


if __name__ == "__main__":
    main()
