"""Trainer hot path throughput: decode + join + learn, as a ratio to river's bare learn_one loop.

No broker: the same encoded features, predictions and feedback messages are fed to the trainer's
join and learner in batches, exactly as the service folds a consumed batch, and compared with a
loop that only calls ``learn_one`` on pre-built dicts (the learner's own limit). Run:
``.venv/bin/python -m bench.trainer_throughput``
"""

from __future__ import annotations

import argparse
import time

from river import datasets

from bench.common import add_engine_argument
from loopline import avro
from loopline.services.trainer.data import Holdout
from loopline.services.trainer.join import FeedbackJoin
from loopline.services.trainer.learner import Learner
from loopline.spec import parse_spec

N = 30_000


def main() -> None:
    """Print examples/s of both loops and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_argument(parser, uses_broker=False)
    parser.parse_args()
    spec = parse_spec({"name": "bench",
                       "features": [{"name": f"x{i}", "type": "float"} for i in range(3)],
                       "label": {"classes": ["false", "true"], "positive": "true"}})
    rows = [({f"x{i}": float(v) for i, v in x.items()}, str(y).lower())
            for x, y in datasets.synth.SEA(seed=1).take(N)]
    fcodec, pcodec, bcodec = (avro.Codec(spec.features_schema()), avro.codec("prediction"),
                              avro.codec("feedback"))
    feats, preds, fbs = [], [], []
    for i, (x, y) in enumerate(rows):
        feats.append(fcodec.encode({"event_id": f"e{i}", "key": None, "ts": i, "ingested_at": i,
                                    "source": {"topic": "raw", "partition": 0, "offset": i},
                                    "features": x}))
        preds.append(pcodec.encode({"prediction_id": f"p{i}", "event_id": f"e{i}", "key": None,
                                    "pipeline": "bench",
                                    "model_name": "m", "model_version": 1, "model_sha256": "0",
                                    "variant": "champion",
                                    "served": True, "label": "true", "value": 0.5, "scores": {},
                                    "source": {"topic": "f", "partition": 0, "offset": i},
                                    "event_ts": i, "scored_at": i}))
        fbs.append(bcodec.encode({"feedback_id": f"f{i}", "prediction_id": f"p{i}",
                                  "event_id": None, "label": y,
                                  "value": None, "verdict": None, "ts": i}))

    bare = Learner(spec)
    xs = [bare.x(x) for x, _ in rows]
    ys = [bare.y(y) for _, y in rows]
    t0 = time.perf_counter()
    for x, y in zip(xs, ys):
        bare.model.learn_one(x, y)
    raw_rate = N / (time.perf_counter() - t0)

    learner, join, holdout = Learner(spec), FeedbackJoin("classification", ["false", "true"],
                                                         10**9), Holdout(500)
    t0 = time.perf_counter()
    for start in range(0, N, 1000):
        join.advance(start)
        for i in range(start, min(N, start + 1000)):
            join.add_event(fcodec.decode(feats[i]), 0, i, i)
        for i in range(start, min(N, start + 1000)):
            join.add_prediction(pcodec.decode(preds[i]), i)
        for i in range(start, min(N, start + 1000)):
            for ex in join.add_feedback(bcodec.decode(fbs[i]), i):
                out = holdout.push(ex)
                if out is not None:
                    learner.learn(out.features, out.target)
    rate = N / (time.perf_counter() - t0)
    print(f"bare river learn_one: {raw_rate:,.0f} examples/s")
    print(f"trainer decode+join+learn (3 messages per example): {rate:,.0f} examples/s")
    print(f"ratio: {rate / raw_rate:.2f}  (joined {join.counts.joined}, learned {learner.learned})")


if __name__ == "__main__":
    main()
