"""Prometheus metrics of the inference service, updated once per batch (not per event)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)


class BulkHistogram(Collector):
    """A labelled histogram fed whole numpy arrays at
    once (prometheus_client observes one value)."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)
        self.edges = np.asarray(buckets, dtype=float)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe_many(self, values: np.ndarray, *labels: str) -> None:
        """Add every value of ``values`` to the series with ``labels``."""
        idx = np.searchsorted(self.edges, values, side="left")  # le-buckets: v <= edge
        counts = np.bincount(idx, minlength=len(self.edges) + 1)
        with self._lock:
            if labels in self._counts:
                self._counts[labels] += counts
            else:
                self._counts[labels] = counts.astype(np.int64)
            self._sums[labels] = self._sums.get(labels, 0.0) + float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Prometheus exposition (cumulative buckets)."""
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            items = [(k, v.copy(), self._sums[k]) for k, v in self._counts.items()]
        for labels, counts, total in items:
            cum = np.cumsum(counts)
            buckets = [(str(e), float(c)) for e, c in zip(self.edges.tolist(), cum[:-1].tolist())]
            buckets.append(("+Inf", float(cum[-1])))
            family.add_metric(list(labels), buckets, total)
        yield family


class InferenceMetrics:
    """Every metric the service exposes, registered on the service's private registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("loopline_inference_events", "Feature events scored", ["pipeline"],
                              registry=registry)
        self.predictions = Counter("loopline_inference_predictions",
                                   "Predictions written per variant",
                                   ["pipeline", "variant", "served"], registry=registry)
        self.bad_events = Counter("loopline_inference_bad_events",
                                  "Feature messages that could not be decoded (sent to the "
                                  "dead-letter topic)",
                                  ["pipeline"], registry=registry)
        self.batch_size = Histogram("loopline_inference_batch_size", "Events per batch",
                                    registry=registry,
                                    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000))
        self.scoring = Histogram("loopline_inference_scoring_seconds",
                                 "One ORT run (per variant per batch)",
                                 ["pipeline", "variant"], registry=registry,
                                 buckets=LATENCY_BUCKETS)
        self.end_to_end = BulkHistogram("loopline_inference_end_to_end_seconds",
                                        "Event time to prediction produced", ["pipeline"],
                                        LATENCY_BUCKETS)
        registry.register(self.end_to_end)
        self.model_info = Gauge("loopline_inference_model_info",
                                "Model versions taking traffic (1)",
                                ["pipeline", "variant", "model_name", "model_version", "sha256"],
                                registry=registry)
        self.model_loads = Counter("loopline_inference_model_loads",
                                   "Model version loads by outcome",
                                   ["pipeline", "outcome"], registry=registry)
        self.swaps = Counter("loopline_inference_plan_changes", "Deployment plan changes applied",
                             ["pipeline"], registry=registry)
        self.isolated = Counter("loopline_inference_isolated_versions",
                                "Versions taken out of the plan "
                                "because they failed at run time", ["pipeline", "variant"],
                                registry=registry)
        self.row_failures = Counter("loopline_inference_row_failures",
                                    "Events a version failed to score "
                                    "(served by the champion instead, or dead-lettered)",
                                    ["pipeline", "variant"], registry=registry)
