"""Drift watchers of one column (a feature or a model output): online detectors plus a windowed test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopline.services.monitor.detectors import Detector
from loopline.services.monitor.windowed import RingBuffer, Thresholds, WindowedDrift, WindowResult

WARMUP = 200  # values used to standardise a column that has no reference profile


@dataclass
class Finding:
    """What one batch of a column showed: online detections and a windowed comparison, if one was due."""

    detections: list[tuple[str, int]] = field(default_factory=list)  # (detector, index in batch)
    quiet: dict[str, int] = field(default_factory=dict)  # events since each detector's last detection
    windowed: WindowResult | None = None


class ColumnWatch:
    """One column: z-scored values feed river detectors; raw values feed PSI/KS against the reference."""

    def __init__(self, name: str, reference: dict[str, Any] | None, numeric: bool, detectors: list[str],
                 seed: int, window: int, every: int, thresholds: Thresholds) -> None:
        self.name = name
        self.numeric = numeric
        self.reference = reference
        self.detectors = [Detector(d, seed) for d in detectors] if numeric else []
        self.quiet = {d.name: 0 for d in self.detectors}
        self.windowed = (WindowedDrift(reference, window, every, thresholds)
                         if reference and reference.get("count") else None)
        self.recent = RingBuffer(min(window, 500)) if numeric else None
        self._scale: tuple[float, float] | None = None
        if numeric and reference and reference.get("std"):
            self._scale = (float(reference["mean"]), float(reference["std"]))
        self._warmup: list[float] = []

    @property
    def reference_mean(self) -> float | None:
        """Mean of the reference (or of the warm-up values), for messages."""
        return None if self._scale is None else self._scale[0]

    @property
    def reference_std(self) -> float | None:
        """Standard deviation of the reference (or warm-up), for messages."""
        return None if self._scale is None else self._scale[1]

    def recent_mean(self) -> float | None:
        """Mean of the most recent values."""
        if self.recent is None or self.recent.total == 0:
            return None
        return float(np.mean(self.recent.values()))

    def update(self, values: list[Any] | np.ndarray, missing: int | None = None) -> Finding:
        """Feed one batch (None, or NaN in a float array: missing, ``missing`` of them if known)."""
        finding = Finding()
        if self.numeric:
            if isinstance(values, np.ndarray):
                arr = np.asarray(values, dtype=float)
            else:
                arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
            present = arr[np.isfinite(arr)]
            self.recent.extend(present)  # type: ignore[union-attr]
            z = self._standardise(arr)
            if z is not None:
                for d in self.detectors:
                    hits = d.update_many(z)
                    finding.detections.extend((d.name, int(i)) for i in hits)
                    self.quiet[d.name] = (len(z) - 1 - int(hits[-1])) if hits.size else self.quiet[d.name] + len(z)
            finding.quiet = dict(self.quiet)
            if self.windowed is not None:
                finding.windowed = self.windowed.add(present)
        elif self.windowed is not None:
            present = values if missing == 0 else [v for v in values if v is not None]
            finding.windowed = self.windowed.add(present)
        return finding

    def _standardise(self, arr: np.ndarray) -> np.ndarray | None:
        # Detectors see z-scores so their thresholds mean the same on every column's scale.
        if self._scale is None:
            self._warmup.extend(arr[np.isfinite(arr)].tolist())
            if len(self._warmup) < WARMUP:
                return None
            w = np.asarray(self._warmup)
            self._scale = (float(w.mean()), float(w.std()) or 1.0)
            self._warmup = []
        mean, std = self._scale
        return (arr - mean) / (std or 1.0)
