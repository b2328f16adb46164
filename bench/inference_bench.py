"""Inference benchmark: the service against the raw batched loop and the raw broker round-trip.

Run: ``.venv/bin/python -m bench.inference_bench [--engine tansu|kafka]`` (starts its own broker,
~1 minute; the service runs at-least-once on both engines, like the raw loop).
Throughput: N pre-loaded feature events, rate from the predictions' ``scored_at`` spread (so the
consumer-group join is not counted). Latency: a fixed moderate rate for a few seconds, event
time -> prediction read back by a consumer, p50/p99. Each service number is printed as a ratio
to (a) the raw consume->decode->ORT->produce loop and (b) the raw broker round-trip, both
measured in the same run on the same broker.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from bench.common import add_engine_argument, bench_broker
from loopline import avro
from loopline.apply import apply_spec
from loopline.artifacts import ArtifactStore
from loopline.kafka import KafkaConfig, StopFlag
from loopline.models import ModelRegistry
from loopline.registry import now_ms
from loopline.runtime.loop import consume_available, positions_after
from loopline.settings import LooplineSettings
from loopline.spec import PipelineSpec, parse_spec

N = int(os.environ.get("BENCH_EVENTS", "60000"))
RATE = int(os.environ.get("BENCH_RATE", "2000"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
COLUMNS = ["amount", "merchant_risk", "hour", "card_present", "x5", "x6"]


def say(msg: str) -> None:
    """Progress on stdout (this is a command-line tool, not a service)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_spec(name: str) -> PipelineSpec:
    feats = [{"name": "customer", "type": "string"}, {"name": "amount", "type": "float", "min": 0},
             {"name": "merchant_risk", "type": "float"}, {"name": "hour", "type": "int"},
             {"name": "card_present", "type": "bool"}, {"name": "x5", "type": "float"},
             {"name": "x6", "type": "float"}]
    return parse_spec({"name": name, "key": "customer", "partitions": 3, "features": feats,
                       "label": {"classes": ["0", "1"], "positive": "1"}})


def make_model() -> bytes:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.random((1000, len(COLUMNS))).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 1).astype(int)
    return to_onnx(LogisticRegression().fit(x, y), x[:1],
                   options={"zipmap": False}).SerializeToString()


def events(spec: PipelineSpec, n: int, start: int) -> list[tuple[bytes, bytes]]:
    codec = avro.Codec(spec.features_schema())
    rng = np.random.default_rng(start)
    vals = rng.random((n, 5))
    out = []
    ts = now_ms()
    for i in range(n):
        key = f"c{(start + i) % 5000}"
        v = vals[i]
        rec = {"event_id": f"e{start + i}", "key": key, "ts": ts, "ingested_at": ts,
               "source": {"topic": spec.topics.raw, "partition": 0, "offset": start + i},
               "features": {"customer": key, "amount": float(v[0]) * 100,
                            "merchant_risk": float(v[1]),
                            "hour": int(v[2] * 23), "card_present": bool(v[3] > 0.5),
                            "x5": float(v[4]), "x6": 0.5}}
        out.append((key.encode(), codec.encode(rec)))
    return out


# ---- the raw loop (runs in its own process) ---------------------------------------------------
def raw_loop(bootstrap: str, profile: str, home: str, pipeline: str, model_path: str) -> None:
    """Minimal batched consume -> decode -> ORT -> encode -> produce -> flush -> store offsets."""
    import onnxruntime as ort

    from loopline.scoring import session_options

    stop = StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    settings = LooplineSettings(bootstrap_servers=bootstrap, kafka_profile=profile, home=Path(home),
                                session_timeout_ms=6000, delivery="at-least-once")
    kafka = KafkaConfig.from_settings(settings)
    spec = make_spec(pipeline)
    consumer = kafka.consumer("bench-raw", f"bench-raw-{uuid.uuid4().hex[:6]}")
    consumer.subscribe([spec.topics.features])
    producer = kafka.producer("bench-raw")
    decode = avro.Codec(spec.features_schema()).decode
    encode = avro.codec("prediction").encode
    sess = ort.InferenceSession(Path(model_path).read_bytes(), session_options(1))
    out_topic = spec.topics.predictions
    try:
        while not stop.is_set():
            msgs = [m for m in consume_available(consumer, 1000, 0.05) if m.error() is None]
            if not msgs:
                continue
            evs = [decode(m.value()) for m in msgs]
            x = np.array([[e["features"][c] for c in COLUMNS] for e in evs], dtype=np.float32)
            labels, probs = sess.run(None, {"X": x})
            scored = now_ms()
            for m, e, lab, p in zip(msgs, evs, labels.tolist(), probs.tolist()):
                rec = {"prediction_id": e["event_id"], "event_id": e["event_id"], "key": e["key"],
                       "pipeline": pipeline, "model_name": "raw", "model_version": 1,
                       "model_sha256": "",
                       "variant": "champion", "served": True, "label": str(lab), "value": p[1],
                       "scores": {"0": p[0], "1": p[1]},
                       "source": {"topic": m.topic(), "partition": m.partition(),
                                  "offset": m.offset()},
                       "event_ts": e["ts"], "scored_at": scored}
                producer.produce(out_topic, encode(rec), key=m.key())
            producer.flush(30)
            consumer.store_offsets(offsets=positions_after(msgs))
    finally:
        consumer.close()


# ---- measurement helpers ----------------------------------------------------------------------
def produce_all(kafka: KafkaConfig, topic: str, msgs: list[tuple[bytes, bytes]]) -> None:
    p = kafka.producer("bench-load")
    for k, v in msgs:
        while True:
            try:
                p.produce(topic, v, key=k)
                break
            except BufferError:
                p.poll(0.05)
    p.flush(60)


class Collector:
    """Reads a topic from the start in a thread;
    records (arrival ms, decoded or raw) per message."""

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int, decode: bool) -> None:
        self.consumer = kafka.reader(f"bench-read-{uuid.uuid4().hex[:6]}")
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING)
                              for p in range(partitions)])
        self.codec = avro.codec("prediction") if decode else None
        self.arrivals: list[int] = []
        self.event_ts: list[int] = []
        self.scored: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for m in consume_available(self.consumer, 2000, 0.05):
                if m.error() is not None:
                    continue
                now = now_ms()
                if self.codec is not None:
                    r = self.codec.decode(m.value())
                    self.event_ts.append(r["event_ts"])
                    self.scored.append(r["scored_at"])
                else:
                    self.event_ts.append(int(m.key()))
                self.arrivals.append(now)

    def wait(self, n: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.arrivals) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.arrivals)} of {n} messages arrived")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()


def paced(kafka: KafkaConfig, topic: str, make, rate: int,
          seconds: float) -> int:  # type: ignore[no-untyped-def]  # any event factory
    """Produce at ``rate`` per second in 10 ms ticks for ``seconds``; return how many."""
    p = kafka.producer("bench-paced", **{"linger.ms": 1})
    per_tick = max(1, rate // 100)
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        for k, v in make(sent, per_tick):
            p.produce(topic, v, key=k)
        sent += per_tick
        p.poll(0)
        time.sleep(max(0.0, sent / rate - (time.monotonic() - t0)))
    p.flush(30)
    return sent


def pct(values: list[int] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def measure_loop(kafka: KafkaConfig, spec: PipelineSpec, start_proc,
                 label: str) -> dict[str, float]:  # type: ignore[no-untyped-def]  # any process starter
    """Throughput on N pre-loaded events, then latency at RATE, for one system under test."""
    say(f"{label}: pre-loading {N} feature events")
    produce_all(kafka, spec.topics.features, events(spec, N, 0))
    col = Collector(kafka, spec.topics.predictions, spec.partitions, decode=True)
    proc = start_proc()
    try:
        col.wait(N)
        span_s = (max(col.scored) - min(col.scored)) / 1000
        tput = N / span_s
        say(f"{label}: throughput {tput:,.0f} events/s ({N} events scored in {span_s:.2f}s)")
        base = len(col.arrivals)
        sent = paced(kafka, spec.topics.features, lambda s, k: events(spec, k, N + s), RATE,
                     SECONDS)
        col.wait(base + sent)
        lat = np.asarray(col.arrivals[base:]) - np.asarray(col.event_ts[base:])
        say(f"{label}: at {RATE}/s for {SECONDS:.0f}s: end-to-end p50 {pct(lat, 50):.1f} ms, "
            f"p99 {pct(lat, 99):.1f} ms")
        return {"throughput": tput, "p50": pct(lat, 50), "p99": pct(lat, 99)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        col.close()


def measure_broker(kafka: KafkaConfig, spec: PipelineSpec) -> dict[str, float]:
    """The raw broker round-trip: produce -> consume, no processing."""
    topic = spec.topics.raw
    say(f"broker: pre-loading {N} messages")
    payload = b"x" * 120
    col = Collector(kafka, topic, spec.partitions, decode=False)
    t0 = time.monotonic()
    produce_all(kafka, topic, [(str(now_ms()).encode(), payload) for _ in range(N)])
    col.wait(N)
    tput = N / (time.monotonic() - t0)
    say(f"broker: produce->consume throughput {tput:,.0f} messages/s")
    sent = paced(kafka, topic, lambda s, k: [(str(now_ms()).encode(), payload)] * k, RATE, SECONDS)
    col.wait(N + sent)
    lat = np.asarray(col.arrivals[N:]) - np.asarray(col.event_ts[N:])
    col.close()
    say(f"broker: at {RATE}/s: round-trip p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms")
    return {"throughput": tput, "p50": pct(lat, 50), "p99": pct(lat, 99)}


def main() -> None:
    """Run the whole benchmark and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-loop", nargs=5,
                        metavar=("BOOTSTRAP", "PROFILE", "HOME", "PIPELINE", "MODEL"),
                        help="internal: run the raw loop (the bench starts it)")
    add_engine_argument(parser)
    args = parser.parse_args()
    if args.raw_loop:
        raw_loop(*args.raw_loop)
        return
    with tempfile.TemporaryDirectory(prefix="loopline-bench-") as tmp, \
            bench_broker(args.engine, Path(tmp)) as broker:
        home, bootstrap = broker.home, broker.bootstrap_servers
        kafka = broker.kafka()
        specs = {n: make_spec(n) for n in ("benchraw", "benchsvc", "benchrt")}
        for s in specs.values():
            apply_spec(kafka, s)
        model = make_model()
        model_path = home / "model.onnx"
        model_path.write_bytes(model)
        ModelRegistry(kafka, ArtifactStore(str(home / "artifacts")),
                      actor="bench").register("benchsvc", model)
        # At-least-once on both engines: like for like with the raw loop (no transactions).
        env = broker.env(LOOPLINE_PIPELINES="benchsvc", LOOPLINE_DELIVERY="at-least-once")
        broker_numbers = measure_broker(kafka, specs["benchrt"])
        raw = measure_loop(kafka, specs["benchraw"], lambda: subprocess.Popen(
            [sys.executable, "-m", "bench.inference_bench", "--raw-loop", bootstrap, broker.profile,
             str(home), "benchraw", str(model_path)], env=env), "raw loop")
        svc = measure_loop(kafka, specs["benchsvc"], lambda: subprocess.Popen(
            [sys.executable, "-m", "loopline.app.cli", "run", "inference"], env=env),
                           "inference service")
        say("results (service / limit):")
        print(f"  throughput  {svc['throughput']:>10,.0f} ev/s   vs raw loop "
              f"{raw['throughput']:,.0f}: "
              f"{svc['throughput'] / raw['throughput']:.2f}   vs broker "
              f"{broker_numbers['throughput']:,.0f}: "
              f"{svc['throughput'] / broker_numbers['throughput']:.2f}")
        for q in ("p50", "p99"):
            print(f"  {q} latency {svc[q]:>8.1f} ms     vs raw loop {raw[q]:.1f} ms: "
                  f"{svc[q] / raw[q]:.2f}   vs broker {broker_numbers[q]:.1f} ms: "
                  f"{svc[q] / broker_numbers[q]:.2f}")


if __name__ == "__main__":
    main()
