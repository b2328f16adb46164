"""`loopline feedback --file`: the true label under the spec's label name (or `label`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopline.app.tools import read_feedback
from loopline.errors import LooplineError
from loopline.spec import parse_spec

FRAUD = parse_spec({"name": "fraud", "features": [{"name": "amount", "type": "float"}],
                    "label": {"name": "is_fraud", "classes": ["0", "1"]}})
PRICE = parse_spec({"name": "price", "features": [{"name": "m2", "type": "float"}],
                    "label": {"name": "price", "task": "regression"}})


def test_csv_uses_the_spec_label_name_and_keeps_label(tmp_path: Path) -> None:
    f = tmp_path / "labels.csv"
    f.write_text("event_id,is_fraud\ne1,1\ne2,0\n")
    rows = read_feedback(f, FRAUD)
    assert [(r["event_id"], r["label"]) for r in rows] == [("e1", "1"), ("e2", "0")]
    f.write_text("prediction_id,label,verdict\np1,1,\np2,,reject\n")
    rows = read_feedback(f, FRAUD)
    assert [(r["prediction_id"], r["label"], r["verdict"]) for r in rows] == [
        ("p1", "1", None), ("p2", None, "reject")]


def test_jsonl_numbers_become_class_names_and_regression_values(tmp_path: Path) -> None:
    f = tmp_path / "labels.jsonl"
    f.write_text('{"event_id": "e1", "is_fraud": 1}\n\n{"event_id": "e2", "is_fraud": "0"}\n')
    assert [r["label"] for r in read_feedback(f, FRAUD)] == ["1", "0"]
    f.write_text('{"event_id": "e1", "price": 250000.5}\n')
    (row,) = read_feedback(f, PRICE)
    assert (row["value"], row["label"]) == (250000.5, None)


@pytest.mark.parametrize(("text", "says"), [
    ("event_id,isfraud\ne1,1\n", "unknown column(s) 'isfraud'; feedback columns are 'is_fraud'"),
    ("event_id,is_fraud,label\ne1,1,0\n", "row 1: is_fraud='1' and label='0' disagree"),
    ("event_id,value\ne1,lots\n", "row 1: value 'lots' is not a number"),
])
def test_bad_files_name_the_row_and_the_rule(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "labels.csv"
    f.write_text(text)
    with pytest.raises(LooplineError, match="rule: ") as info:
        read_feedback(f, FRAUD)
    assert says in str(info.value)
