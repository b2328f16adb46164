"""One small interface over river's drift detectors, for feature/output streams and 0/1 error
streams.

Every detector is built by name (the names a pipeline spec uses), seeded where river allows it,
and fed whole numpy arrays: :meth:`Detector.update_many` returns the positions that signalled a
drift, so callers do per-batch work. The river object underneath is reset after each detection,
on the next value, as river itself does (it starts learning the new distribution).

Two detectors skip river's per-value Python: Page-Hinkley runs vectorised over a batch (the same
algorithm and parameters, its state kept in the river object's own fields), and ADWIN calls the
Rust helper that river's ``ADWIN.update`` wraps. Both give river's detections; the others are
river's own ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift
from river.drift import binary
from scipy import signal

from loopline.services.monitor.errors import DetectorError


@dataclass(frozen=True)
class DetectorKind:
    """How to build one detector and which streams it accepts."""

    name: str
    build: Callable[[int], Any]
    binary: bool  # True: only 0/1 error streams (DDM family); False: any real-valued stream
    doc: str


# Parameters differ from river's defaults where the benchmark (bench/monitor_detection.py) showed
# false alarms on stationary streams: values reach feature detectors as z-scores against the
# reference profile, so thresholds are in units of reference standard deviations.
KINDS: dict[str, DetectorKind] = {
    "adwin": DetectorKind("adwin", lambda seed: drift.ADWIN(delta=0.002), False,
                          "ADWIN adaptive window (Bifet & Gavalda), delta=0.002"),
    "page_hinkley": DetectorKind("page_hinkley",
                                 # No forgetting (river's alpha is 0.9999): with it the sums of a
                                 # stationary stream swing by ~70 sd, a false alarm every ~12k
                                 # events.
                                 lambda seed: drift.PageHinkley(min_instances=30, delta=0.1,
                                                                threshold=50.0, alpha=1.0),
                                 False,
                                 "Page-Hinkley cumulative test, delta=0.1 sd, threshold=50 sd, "
                                 "no forgetting"),
    "kswin": DetectorKind("kswin", lambda seed: drift.KSWIN(alpha=1e-5, window_size=200,
                                                            stat_size=50, seed=seed),
                          False, "KSWIN sliding two-sample KS, alpha=1e-5 "
                          "(costly: one KS test per event)"),
    "ddm": DetectorKind("ddm", lambda seed: binary.DDM(warm_start=100), True,
                        "DDM error-rate test (Gama et al.), warm start 100"),
    "eddm": DetectorKind("eddm", lambda seed: binary.EDDM(warm_start=300, alpha=0.9, beta=0.85),
                         True,
                         "EDDM distance-between-errors test, warm start 300, alpha=0.9, beta=0.85"),
    "hddm_a": DetectorKind("hddm_a", lambda seed: binary.HDDMA(), True,
                           "HDDM_A Hoeffding bound on averages"),
    "hddm_w": DetectorKind("hddm_w", lambda seed: binary.HDDMW(), True,
                           "HDDM_W Hoeffding bound on weighted averages"),
}


class Detector:
    """A named, seeded river detector fed in batches; counts what it has seen and detected."""

    def __init__(self, name: str, seed: int = 0, binary_stream: bool = False) -> None:
        kind = KINDS.get(name)
        if kind is None:
            raise DetectorError(f"unknown detector {name!r}; known: {sorted(KINDS)}")
        if kind.binary and not binary_stream:
            raise DetectorError(
                f"detector {name!r} watches 0/1 error streams only, not real values")
        self.name = name
        self.seed = seed
        self.binary = kind.binary
        self._river = kind.build(seed)
        self.seen = 0
        self.detections = 0

    def update_many(self, values: np.ndarray) -> np.ndarray:
        """Feed values in order; return the indices
        (into ``values``) where a drift was signalled."""
        values = np.asarray(values, dtype=float)
        # NaN (missing) values are not learned: drop them once here and map the hits back.
        missing = np.isnan(values)
        kept = np.flatnonzero(~missing) if missing.any() else None
        present = values if kept is None else values[kept]
        if self.name == "page_hinkley" and present.size >= PH_VECTOR_MIN:
            hits = _page_hinkley_many(self._river, present)
        elif self.name == "adwin":
            hits = _adwin_many(self._river, present.tolist())
        else:
            hits = _river_many(self._river, present.tolist())
        self.seen += len(values)
        self.detections += len(hits)
        out = np.asarray(hits, dtype=np.int64)
        return out if kept is None else kept[out]

    @property
    def warning(self) -> bool:
        """Whether the detector is in its warning zone (DDM family), else False."""
        return bool(getattr(self._river, "warning_detected", False))


def error_detector_names(names: list[str], task: str) -> list[str]:
    """The error-stream detectors usable for a task:
    binary ones need 0/1 errors (classification)."""
    if task == "classification":
        return list(names)
    return [n for n in names if not KINDS[n].binary]


# Below this many values a Page-Hinkley batch goes through river's own update: numpy's fixed cost
# per batch (about 40 us) is more than river's per-value cost (about 1.3 us) on small batches.
PH_VECTOR_MIN = 32


def _river_many(det: Any, values: list[float]) -> list[int]:
    """River's own ``update`` per value; the positions that signalled a drift."""
    update = det.update
    state = det.__dict__
    hits: list[int] = []
    # Reading the flag behind river's `drift_detected` property (base.DriftDetector._drift_detected)
    # saves a property call per value.
    for i, v in enumerate(values):
        update(v)
        if state["_drift_detected"]:
            hits.append(i)
    return hits


def _adwin_many(det: drift.ADWIN, values: list[float]) -> list[int]:
    """River's ``ADWIN.update`` per value, minus its Python wrapper; the signalling positions."""
    hits: list[int] = []
    start, n = 0, len(values)
    while start < n:
        # ADWIN.update is "reset if the last value was a detection, then ask the Rust helper";
        # the reset can only be pending before the first value of a run.
        if det._drift_detected:
            det._reset()
        update = det._helper.update
        for i in range(start, n):
            if update(values[i]):
                hits.append(i)
                det._drift_detected = True
                start = i + 1
                break
        else:
            break
    return hits


def _page_hinkley_many(det: drift.PageHinkley, x: np.ndarray) -> list[int]:
    """River's ``PageHinkley.update`` over a batch of present values, vectorised; the detections.

    The state stays in the river object's own fields (so small batches can keep using river's
    update and checkpoints keep their shape). Float results differ from river's per-value
    arithmetic only by rounding (a running mean from a cumulative sum, the forgetting sums from
    ``lfilter``): about 1e-12 relative, against a threshold crossed by steps of about one unit.
    """
    alpha, delta, threshold = det.alpha, det.delta, det.threshold
    rows = {"up": slice(0, 1), "down": slice(1, 2)}.get(det.mode, slice(0, 2))
    b, a = np.array([1.0]), np.array([1.0, -alpha])
    hits: list[int] = []
    start = 0
    while start < x.size:
        if det._drift_detected:  # river resets on the first value after a detection
            det._reset()
        mean0 = det._x_mean
        n0, m0 = mean0.n, mean0._mean
        seg = x[start:]
        n = np.arange(1.0, seg.size + 1.0)
        n += n0
        # An infinite value turns the mean and sums into inf/NaN for good, silently, as river's
        # float arithmetic does.
        with np.errstate(invalid="ignore", over="ignore"):
            mean = np.cumsum(seg - m0)
            mean /= n
            mean += m0
            dev = seg - mean
            # Row 0: s_inc[k] = alpha * s_inc[k-1] + dev[k] - delta; row 1: s_dec, + delta.
            steps = np.empty((2, seg.size))
            np.subtract(dev, delta, out=steps[0])
            np.add(dev, delta, out=steps[1])
            sums = signal.lfilter(b, a, steps, axis=1,
                                  zi=[[alpha * det._sum_increase], [alpha * det._sum_decrease]])[0]
            # Row 0: s_inc - min(s_inc); row 1: max(s_dec) - s_dec. fmin/fmax skip NaN as river's
            # `<`/`>` comparisons do, and fmax of the two rows is river's `or` of the two tests.
            extreme = np.empty_like(sums)
            np.fmin(np.fmin.accumulate(sums[0]), det._min_increase, out=extreme[0])
            np.fmax(np.fmax.accumulate(sums[1]), det._max_decrease, out=extreme[1])
            tests = sums - extreme
        tests[1] *= -1.0
        # No test before min_instances values (n[k] = n0 + k + 1).
        first_tested = max(0, math.ceil(det.min_instances - n0 - 1))
        over = np.flatnonzero(np.fmax.reduce(tests[rows], axis=0)[first_tested:] > threshold)
        last = first_tested + int(over[0]) if over.size else seg.size - 1
        mean0.n, mean0._mean = float(n[last]), float(mean[last])
        det._sum_increase, det._sum_decrease = float(sums[0, last]), float(sums[1, last])
        det._min_increase, det._max_decrease = float(extreme[0, last]), float(extreme[1, last])  # type: ignore[assignment]  # river's stubs say int; it holds floats
        if not over.size:
            break
        det._drift_detected = True
        hits.append(start + last)
        start += last + 1
    return hits
