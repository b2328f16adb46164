"""Reference profiles: the distribution of each feature and model output in reference data.

Stored with each model version (``reference_profile_json``); the monitor compares recent
windows against it (PSI on the bins, two-sample KS on the sample).

Numeric columns: ``{"kind": "numeric", "count", "missing", "mean", "std", "min", "max",
"edges": [quantile cut points], "fractions": [share per bin, len(edges) + 1; the first and
last bins are the outlier bins below/above the reference range], "sample": [<= SAMPLE values]}``.
Categorical columns: ``{"kind": "categorical", "count", "missing", "fractions": {value: share}}``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BINS = 10
SAMPLE = 1000


def numeric_profile(values: Sequence[float | None] | np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Profile of a numeric column (None/NaN count as missing)."""
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    present = arr[np.isfinite(arr)]
    missing = int(arr.size - present.size)
    if present.size == 0:
        return {"kind": "numeric", "count": 0, "missing": missing, "mean": None, "std": None,
                "min": None, "max": None, "edges": [], "fractions": [1.0], "sample": []}
    inner = np.unique(np.quantile(present, np.linspace(0, 1, BINS + 1)[1:-1]))
    edges = np.concatenate([[present.min()], inner, [present.max()]])
    edges = np.unique(edges)
    fractions = bin_fractions(present, edges.tolist())
    rng = np.random.default_rng(seed)
    sample = present if present.size <= SAMPLE else rng.choice(present, SAMPLE, replace=False)
    return {"kind": "numeric", "count": int(present.size), "missing": missing,
            "mean": float(present.mean()), "std": float(present.std()),
            "min": float(present.min()), "max": float(present.max()),
            "edges": [float(e) for e in edges], "fractions": fractions,
            "sample": [float(v) for v in np.sort(sample)]}


def bin_fractions(values: np.ndarray | Sequence[float], edges: Sequence[float]) -> list[float]:
    """Share of ``values`` per bin: below edges[0], each
    [e_i, e_i+1), the last closed, above edges[-1]."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    e = np.asarray(edges, dtype=float)
    if arr.size == 0:
        return [0.0] * (len(e) + 1)
    # side="right" puts v == edges[-1] past the end; clip it back into the last inner bin.
    idx = np.searchsorted(e, arr, side="right")
    idx[arr == e[-1]] = len(e) - 1
    counts = np.bincount(idx, minlength=len(e) + 1)
    return [float(c) / arr.size for c in counts]


def categorical_profile(values: Sequence[Any]) -> dict[str, Any]:
    """Profile of a categorical column (None counts as missing)."""
    present = [str(v) for v in values if v is not None]
    counts = Counter(present)
    n = len(present)
    return {"kind": "categorical", "count": n, "missing": len(values) - n,
            "fractions": {k: c / n for k, c in sorted(counts.items())} if n else {}}


def build_profile(features: Mapping[str, Sequence[Any]], feature_types: Mapping[str, str],
                  outputs: Mapping[str, Sequence[Any]] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Profile every feature (``feature_types``: float/int numeric, else categorical) and output.

    Outputs named ``label`` are categorical; any other output is numeric (scores, values).
    """
    profile: dict[str, Any] = {"features": {}, "outputs": {}}
    for name, values in features.items():
        numeric = feature_types.get(name) in ("float", "int")
        profile["features"][name] = (numeric_profile(values, seed) if numeric
                                     else categorical_profile(values))
    for name, values in (outputs or {}).items():
        profile["outputs"][name] = (categorical_profile(values) if name == "label"
                                    else numeric_profile(values, seed))
    return profile
