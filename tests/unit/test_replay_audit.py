"""The reproducibility audit: exact matches, float32 rounding, and real differences told apart."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from loopline.scoring import ScoreResult
from loopline.services.lineage.replay import FLOAT32_ULPS, Side, _compare


def audit(now: list[float], logged: list[float], float32: bool) -> Side:
    """Compare a replay's values with logged ones as the replay does, one label for all."""
    values = np.asarray(now, dtype=np.float64)
    result = ScoreResult(["1"] * len(now), values.tolist(), None, values, float32)
    chunk = pa.RecordBatch.from_pydict({"v_value": logged, "v_label": ["1"] * len(logged)})
    side = Side("m/1")
    none = np.zeros(len(now), dtype=bool)
    _compare(side, result, chunk, "v", np.array([None] * len(now), dtype=object), none, True)
    return side


def test_float32_values_within_a_few_ulps_are_rounding_not_a_different_model() -> None:
    logged = np.float32([0.25, 0.5, 0.75, 0.9])
    ulp = np.spacing(logged)
    now = [float(logged[0]), float(logged[1] + ulp[1]), float(logged[2] + FLOAT32_ULPS * ulp[2]),
           float(logged[3]) + 1e-3]
    side = audit(now, [float(x) for x in logged], float32=True)
    # 1e-3 is a real change
    assert (side.logged, side.reproduced, side.within_rounding) == (4, 1, 2)
    assert side.max_abs_diff > 9e-4


def test_a_float64_model_must_reproduce_exactly() -> None:
    side = audit([0.5 + 1e-16 * 4, 0.25], [0.5, 0.25], float32=False)
    assert (side.reproduced, side.within_rounding) == (1, 0)
