"""The replay's columnar path builds exactly the
tensors the inference service built from records."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression

from loopline.scoring import Scorer
from loopline.services.lineage import rows
from loopline.services.lineage.replay import _feature_columns
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "unit", "features": [
    {"name": "city", "type": "string"}, {"name": "x", "type": "float"},
    {"name": "n", "type": "int"},
    {"name": "flag", "type": "bool"}, {"name": "opt", "type": "float", "required": False},
    {"name": "opt_n", "type": "int", "required": False}],
    "label": {"classes": ["0", "1"], "positive": "1"}})


def model(dtype: type) -> bytes:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)).astype(dtype)
    return to_onnx(LogisticRegression().fit(x, (x[:, 0] > 0).astype(int)), x[:1],
                   options={"zipmap": False}).SerializeToString()


def records(n: int) -> list[dict]:  # type: ignore[type-arg]  # any records
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        out.append({"city": "a", "x": float(rng.normal()) * 10.0 ** int(rng.integers(-8, 9)),
                    # ints that float32 cannot hold, some that float64 cannot either (double
                    # rounding)
                    "n": int(rng.integers(-2**62, 2**62)) if i % 3 else int(rng.integers(0, 2**25)),
                    "flag": bool(i % 2), "opt": None if i % 4 == 0 else float(rng.normal()),
                    "opt_n": None if i % 5 == 0 else int(rng.integers(-2**60, 2**60))})
    for r in out[40:60]:  # int64 -> float32 directly rounds these differently than via a double
        r["n"] = 2**60 + 2**36 + 1
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_columns_from_arrow_give_bit_identical_feeds(dtype: type) -> None:
    scorer = Scorer(model(dtype), SPEC, {"opt": 0.125, "opt_n": 7.0})
    recs = records(300)
    struct = pa.Table.from_pylist([{"features": r} for r in recs],
                                  schema=pa.schema([rows.features_schema(SPEC).field("features")]))
    # A slice has an offset into its children: the columns must still line up with the rows.
    sliced = struct.column("features").combine_chunks().slice(37, 200)
    columns = _feature_columns(sliced, [scorer])
    assert columns is not None
    got = scorer.feeds_columns(columns, 200)["X"]
    want = scorer.feeds(recs[37:237])["X"]
    assert got.dtype == want.dtype == dtype
    assert got.tobytes() == want.tobytes()
    result = scorer.parse(scorer.run({"X": got}), 200, with_scores=False)
    full = scorer.score(recs[37:237])
    assert result.scores is None and result.labels == full.labels and result.values == full.values


def test_columns_need_a_single_input_model_and_every_input() -> None:
    scorer = Scorer(model(np.float32), SPEC, {"opt": 0.0, "opt_n": 0.0})
    with pytest.raises(Exception, match="input_name"):
        scorer.feeds_columns({"x": np.zeros(2)}, 2)
