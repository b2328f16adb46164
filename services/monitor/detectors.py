"""One small interface over river's drift detectors, for feature/output streams and 0/1 error streams.

Every detector is built by name (the names a pipeline spec uses), seeded where river allows it,
and fed whole numpy arrays: :meth:`Detector.update_many` returns the positions that signalled a
drift, so callers do per-batch work. The river object underneath is reset by river itself after
each detection (it starts learning the new distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift
from river.drift import binary

from loopline.errors import LooplineError


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
                                 lambda seed: drift.PageHinkley(min_instances=30, delta=0.1, threshold=50.0),
                                 False, "Page-Hinkley cumulative test, delta=0.1 sd, threshold=50 sd"),
    "kswin": DetectorKind("kswin", lambda seed: drift.KSWIN(alpha=1e-5, window_size=200, stat_size=50,
                                                            seed=seed),
                          False, "KSWIN sliding two-sample KS, alpha=1e-5 (costly: one KS test per event)"),
    "ddm": DetectorKind("ddm", lambda seed: binary.DDM(warm_start=100), True,
                        "DDM error-rate test (Gama et al.), warm start 100"),
    "eddm": DetectorKind("eddm", lambda seed: binary.EDDM(warm_start=300, alpha=0.9, beta=0.85), True,
                         "EDDM distance-between-errors test, warm start 300, alpha=0.9, beta=0.85"),
    "hddm_a": DetectorKind("hddm_a", lambda seed: binary.HDDMA(), True, "HDDM_A Hoeffding bound on averages"),
    "hddm_w": DetectorKind("hddm_w", lambda seed: binary.HDDMW(), True,
                           "HDDM_W Hoeffding bound on weighted averages"),
}


class DetectorError(LooplineError):
    """A detector name is unknown or does not fit the stream it is asked to watch."""


class Detector:
    """A named, seeded river detector fed in batches; counts what it has seen and detected."""

    def __init__(self, name: str, seed: int = 0, binary_stream: bool = False) -> None:
        kind = KINDS.get(name)
        if kind is None:
            raise DetectorError(f"unknown detector {name!r}; known: {sorted(KINDS)}")
        if kind.binary and not binary_stream:
            raise DetectorError(f"detector {name!r} watches 0/1 error streams only, not real values")
        self.name = name
        self.seed = seed
        self.binary = kind.binary
        self._river = kind.build(seed)
        self.seen = 0
        self.detections = 0

    def update_many(self, values: np.ndarray) -> np.ndarray:
        """Feed values in order; return the indices (into ``values``) where a drift was signalled."""
        river_update = self._river.update
        state = self._river.__dict__
        hits: list[int] = []
        # The only per-event loop of the monitor: river detectors are sequential by nature. Reading
        # the flag behind river's `drift_detected` property (base.DriftDetector._drift_detected)
        # saves a property call per event.
        for i, v in enumerate(values.tolist()):
            if v != v:  # NaN (missing): a detector must not learn from it
                continue
            river_update(v)
            if state["_drift_detected"]:
                hits.append(i)
        self.seen += len(values)
        self.detections += len(hits)
        return np.asarray(hits, dtype=np.int64)

    @property
    def warning(self) -> bool:
        """Whether the detector is in its warning zone (DDM family), else False."""
        return bool(getattr(self._river, "warning_detected", False))


def error_detector_names(names: list[str], task: str) -> list[str]:
    """The error-stream detectors usable for a task: binary ones need 0/1 errors (classification)."""
    if task == "classification":
        return list(names)
    return [n for n in names if not KINDS[n].binary]
