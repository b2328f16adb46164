"""Avro decoding: the compiled readers against fastavro, on the messages the services exchange.

Run: ``.venv/bin/python -m bench.avro_decode [--records N] [--passes P]`` (defaults 20000 and
9 passes; about 25 s, no broker).

Per kind (a feature event of examples/fraud.yaml as ingest writes it, a prediction as inference
writes it, a feedback label), microseconds per message for ``Codec.decode_each`` with the
compiled reader (all fields, and only the fields the monitor reads) and for fastavro's
``schemaless_reader``, the limit this replaces, in the same run; best of 9 passes with garbage
collection off, the decoders taking turns in each pass.
"""

from __future__ import annotations

import argparse
import gc
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from bench.common import add_engine_argument
from bench.inference_bench import say
from bench.monitor_throughput import features_of, records_of
from loopline import avro
from loopline.services.monitor.service import READS
from loopline.spec import load_spec

REPO = Path(__file__).resolve().parent.parent


def messages(n: int) -> dict[str, tuple[avro.Codec, list[bytes], tuple[str, ...] | None]]:
    """Encoded messages of each kind, with the fields the monitor reads of them."""
    rng = np.random.default_rng(7)
    spec = load_spec(REPO / "examples" / "fraud.yaml")
    features = avro.Codec(spec.features_schema())
    events = [{"event_id": f"fraud-{i:08d}", "key": f"c{i % 1000}", "ts": 1_764_000_000_000 + i,
               "ingested_at": 1_764_000_000_050 + i, "features": f,
               "source": {"topic": "loopline.fraud.raw", "partition": i % 3, "offset": 10_000 + i}}
              for i, f in enumerate(records_of(features_of(rng, n)))]
    prediction = avro.codec("prediction")
    scores = rng.random(n).tolist()
    predictions = [{"prediction_id": f"p-{i:016x}{i:016x}", "event_id": e["event_id"],
                    "key": e["key"],
                    "pipeline": "fraud", "model_name": "fraud-lr", "model_version": 3,
                    "model_sha256": "ab" * 32, "variant": ("champion", "challenger")[i % 2],
                    "served": True, "label": str(int(s > 0.5)), "value": s,
                    "scores": {"0": 1 - s, "1": s}, "source": {"topic": "loopline.fraud.features",
                                                             "partition": i % 3,
                                                               "offset": 20_000 + i},
                    "event_ts": e["ts"], "scored_at": e["ts"] + 80}
                   for i, (e, s) in enumerate(zip(events, scores))]
    feedback = avro.codec("feedback")
    labels = [{"feedback_id": f"f{i}", "prediction_id": None, "event_id": e["event_id"],
               "label": "1", "value": None, "verdict": None, "ts": e["ts"] + 3_600_000}
              for i, e in enumerate(events)]
    return {"features": (features, [features.encode(r) for r in events], READS["features"]),
            "predictions": (prediction, [prediction.encode(r) for r in predictions],
                            READS["predictions"]),
            "feedback": (feedback, [feedback.encode(r) for r in labels], None)}


def per_message(runs: dict[str, Callable[[], Any]], n: int, passes: int) -> dict[str, float]:
    """Microseconds per message of each run, best of ``passes`` taken in turn, garbage collection
    off.

    This VM's speed drifts by up to 2x over seconds; running the decoders in turn within each pass
    lets every one meet the same fast and slow spells.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(passes):
        for name, run in runs.items():
            gc.collect()
            gc.disable()  # it would time the heap the records build up, not the decoding
            try:
                t0 = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t0)
            finally:
                gc.enable()
    return {name: t / n * 1e6 for name, t in best.items()}


def main() -> None:
    """Time each decoder on each kind and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--passes", type=int, default=9)
    add_engine_argument(parser, uses_broker=False)
    args = parser.parse_args()
    n = args.records
    say(f"encoding {n} messages of each kind")
    rows = []
    for kind, (codec, values, fields) in messages(n).items():
        bodies = [v[avro.HEADER_LEN:] for v in values]

        def by_fastavro() -> list[Any]:
            return [fastavro.schemaless_reader(io.BytesIO(b), codec.parsed, None)  # noqa: B023 - run in this iteration
                    for b in bodies]  # noqa: B023 - as above

        assert codec.decode_each(values) == by_fastavro(), (
            f"{kind}: compiled and fastavro records differ")
        runs = {"fastavro": by_fastavro,
                "compiled": lambda: codec.decode_each(values)}  # noqa: B023 - as above
        if fields:
            runs["projected"] = lambda: codec.decode_each(values, fields)  # noqa: B023 - as above
        us = per_message(runs, n, args.passes)
        rows.append((kind, len(values[0]), us))
        say(f"{kind}: " + ", ".join(f"{name} {t:.1f} us" for name, t in us.items()))
    say("results (us per message; fastavro / compiled in brackets):")
    for kind, size, us in rows:
        limit = us["fastavro"]
        line = (f"  {kind:<12} {size:>4} bytes   fastavro {limit:5.1f}   compiled "
                f"{us['compiled']:5.1f} ({limit / us['compiled']:.1f}x)")
        if "projected" in us:
            line += f"   monitor's fields {us['projected']:5.1f} ({limit / us['projected']:.1f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
