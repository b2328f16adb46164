"""Reference profiles: bins cover the data, outlier bins catch what lies outside."""

from __future__ import annotations

import numpy as np

from loopline.profile import bin_fractions, build_profile


def test_numeric_profile_bins_sum_to_one_and_reference_has_no_outliers() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(5, 2, 5000)
    p = build_profile({"x": values, "c": ["a", "b", "a", None]}, {"x": "float", "c": "string"},
                      {"score": rng.random(100), "label": ["1", "0", "1"]})
    x = p["features"]["x"]
    assert abs(sum(x["fractions"]) - 1) < 1e-9
    assert x["fractions"][0] == 0 and x["fractions"][-1] == 0  # outlier bins empty on the reference
    assert len(x["fractions"]) == len(x["edges"]) + 1 and len(x["sample"]) == 1000
    assert abs(x["mean"] - 5) < 0.1
    assert p["features"]["c"] == {"kind": "categorical", "count": 3, "missing": 1,
                                  "fractions": {"a": 2 / 3, "b": 1 / 3}}
    assert p["outputs"]["label"]["kind"] == "categorical"
    assert p["outputs"]["score"]["kind"] == "numeric"


def test_values_outside_the_reference_fall_in_outlier_bins() -> None:
    assert bin_fractions([-1, 0, 5, 10, 11], [0, 5, 10]) == [0.2, 0.2, 0.4, 0.2]


def test_missing_values_are_counted_not_binned() -> None:
    p = build_profile({"x": [1.0, None, float("nan"), 2.0]}, {"x": "float"})
    assert p["features"]["x"]["count"] == 2 and p["features"]["x"]["missing"] == 2
