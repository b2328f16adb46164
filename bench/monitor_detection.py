"""Detection benchmark of the monitor's drift detectors on streams with a known drift position.

Run: ``.venv/bin/python -m bench.monitor_detection [--seeds N]`` (about a minute with 5 seeds).

- Feature detectors (adwin, page_hinkley, kswin, and the windowed PSI/KS test) on a gaussian
  stream whose mean shifts by 1 standard deviation at a known position.
- Error-stream detectors (ddm, eddm, hddm_a, hddm_w, adwin) on river's SEA and Agrawal generators
  with an abrupt concept change (one generator's concept, then another's), fed with the 0/1 errors of a
  river logistic regression learning prequentially (predict, then learn). Feature detectors cannot
  see this drift: only the labels change.

Reported per detector and stream: median detection delay (events after the drift to the first
signal at or after it), false alarms before the drift (total over seeds; on error streams only
after the first 1000 events, while the learner converges its error rate really does change) and
misses (no signal after the drift). The detectors are the ones the service builds (services/monitor/detectors.py),
with the same parameters and seeds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
from river import compose, linear_model, preprocessing
from river.datasets import synth

from loopline.profile import numeric_profile
from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.windowed import Thresholds, WindowedDrift

FEATURE_DETECTORS = ("adwin", "page_hinkley", "kswin")
ERROR_DETECTORS = ("ddm", "eddm", "hddm_a", "hddm_w", "adwin")
WARMUP = 1000  # error streams: the learner's own convergence (error falling) is not counted as a false alarm


def gaussian_shift(seed: int, position: int, total: int, shift: float = 1.0) -> np.ndarray:
    """N(0, 1) until ``position``, then N(shift, 1)."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(0, 1, position), rng.normal(shift, 1, total - position)]


def lr_errors(stream: Iterator[tuple[dict, bool]], total: int) -> np.ndarray:
    """0/1 prequential errors of a river logistic regression on ``stream``."""
    model = compose.Pipeline(preprocessing.StandardScaler(), linear_model.LogisticRegression())
    errors = np.empty(total)
    for i, (x, y) in enumerate(stream):
        if i >= total:
            break
        errors[i] = float(model.predict_one(x) != y)
        model.learn_one(x, y)
    return errors


def abrupt(before: Iterator[tuple[dict, bool]], after: Iterator[tuple[dict, bool]],
           position: int) -> Iterator[tuple[dict, bool]]:
    """``position`` samples of one concept, then the other (an abrupt drift; river's
    ConceptDriftStream overflows with width=1)."""
    return itertools.chain(itertools.islice(before, position), after)


def sea(seed: int, position: int) -> Iterator[tuple[dict, bool]]:
    """SEA concept 0 -> concept 1 (threshold 8 -> 9) at ``position``, no label noise."""
    return abrupt(iter(synth.SEA(variant=0, seed=seed)), iter(synth.SEA(variant=1, seed=seed + 1000)), position)


def agrawal(seed: int, position: int) -> Iterator[tuple[dict, bool]]:
    """Agrawal classification function 0 -> function 2 at ``position``."""
    return abrupt(iter(synth.Agrawal(0, seed=seed)), iter(synth.Agrawal(2, seed=seed + 1000)), position)


def score(hits: np.ndarray, position: int, warmup: int = 0) -> tuple[int | None, int]:
    """(delay of the first signal at/after the drift or None, false alarms in [warmup, drift))."""
    after = hits[hits >= position]
    return (int(after[0] - position) if after.size else None), int(((hits >= warmup) & (hits < position)).sum())


def windowed_hits(values: np.ndarray, reference: np.ndarray, window: int = 1000, every: int = 250,
                  batch: int = 50) -> np.ndarray:
    """Positions where the windowed PSI/KS test (spec defaults) first reaches 'alert' per evaluation."""
    w = WindowedDrift(numeric_profile(reference), window, every, Thresholds(0.1, 0.25, 0.001))
    hits = []
    for start in range(0, values.size, batch):
        r = w.add(values[start:start + batch])
        if r is not None and r.level == "alert":
            hits.append(start + batch - 1)
    return np.asarray(hits, dtype=np.int64)


def run(name: str, seeds: list[int], position: int, make: Callable[[int], np.ndarray],
        detect: Callable[[np.ndarray, int], np.ndarray], warmup: int = 0) -> dict[str, object]:
    """One detector on one stream over every seed."""
    delays, false_alarms, misses = [], 0, 0
    for seed in seeds:
        hits = detect(make(seed), seed)
        delay, fa = score(hits, position, warmup)
        false_alarms += fa
        if delay is None:
            misses += 1
        else:
            delays.append(delay)
    return {"detector": name, "median_delay": statistics.median(delays) if delays else None,
            "false_alarms": false_alarms, "misses": misses, "runs": len(seeds)}


def main() -> None:
    """Run every detector on every stream and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    seeds = list(range(args.seeds))
    rows: list[tuple[str, dict[str, object]]] = []
    t0 = time.perf_counter()

    position, total = 5000, 8000
    gauss = {s: gaussian_shift(s, position, total) for s in seeds}
    for name in FEATURE_DETECTORS:
        rows.append(("gaussian +1sd @5000", run(name, seeds, position, gauss.__getitem__,
                                                lambda v, s, n=name: Detector(n, seed=s).update_many(v))))
    rows.append(("gaussian +1sd @5000", run("psi_ks (window 1000/250)", seeds, position, gauss.__getitem__,
                 lambda v, s: windowed_hits(v, np.random.default_rng(s + 99).normal(0, 1, 5000)))))

    # A long stationary stretch: a detector with forgetting (river's Page-Hinkley default alpha)
    # drifts into false alarms only after ~10k events, which the 5000-event stream never shows.
    position, total = 50_000, 53_000
    long_gauss = {s: gaussian_shift(s, position, total) for s in seeds}
    for name in ("adwin", "page_hinkley"):
        rows.append(("gaussian +1sd @50000", run(name, seeds, position, long_gauss.__getitem__,
                                                 lambda v, s, n=name: Detector(n, seed=s).update_many(v))))
    rows.append(("gaussian +1sd @50000", run("psi_ks (window 1000/250)", seeds, position,
                                             long_gauss.__getitem__,
                 lambda v, s: windowed_hits(v, np.random.default_rng(s + 99).normal(0, 1, 5000)))))

    for label, gen, pos, n in (("SEA 0->1 @5000 (LR errors)", sea, 5000, 10000),
                               ("Agrawal 0->2 @5000 (LR errors)", agrawal, 5000, 10000)):
        errs = {s: lr_errors(gen(s, pos), n) for s in seeds}
        for name in ERROR_DETECTORS:
            rows.append((label, run(name, seeds, pos, errs.__getitem__,
                                    lambda v, s, d=name: Detector(d, seed=s, binary_stream=True).update_many(v),
                                    warmup=WARMUP)))
        rows.append((label, run("adwin on features (blind to concept drift)", seeds, pos,
                                lambda s, g=gen, p=pos, k=n: np.asarray(
                                    [x[next(iter(x))] for x, _ in (t for _, t in zip(range(k), g(s, p)))]),
                                lambda v, s: Detector("adwin", seed=s).update_many((v - v[:1000].mean())
                                                                                  / (v[:1000].std() or 1)))))

    print(f"{'stream':32} {'detector':44} {'median delay':>12} {'false alarms':>12} {'misses':>7}")
    for stream, r in rows:
        delay = "-" if r["median_delay"] is None else f"{r['median_delay']:.0f}"
        print(f"{stream:32} {r['detector']!s:44} {delay:>12} {r['false_alarms']!s:>12} "
              f"{r['misses']!s:>4}/{r['runs']}")
    print(f"({len(seeds)} seeds, {time.perf_counter() - t0:.0f}s; delays in events after the drift; "
          "false alarms summed over seeds)")


if __name__ == "__main__":
    main()
