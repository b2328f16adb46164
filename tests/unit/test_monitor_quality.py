"""Data-quality rates per feature from features and dead letters."""

from __future__ import annotations

import numpy as np
import pytest

from loopline.services.monitor.quality import EVENT, Columns, QualityTracker, classify_rule
from loopline.spec import parse_spec

SPEC = parse_spec({"name": "q", "features": [
    {"name": "amount", "type": "float", "min": 0, "max": 100},
    {"name": "country", "type": "string", "required": False, "values": ["fr", "de"]}]})


@pytest.mark.parametrize(("rule", "kind"), [("type", "type_error"), ("nan", "type_error"),
                                            ("range", "out_of_range"),
                                            ("max", "out_of_range"), ("required", "missing"),
                                            ("size", "other")])
def test_dead_letter_rules_map_to_kinds(rule: str, kind: str) -> None:
    assert classify_rule(rule) == kind


def test_rates_over_a_window_of_good_and_dead_events() -> None:
    q = QualityTracker(SPEC, window=10)
    assert q.add_features({"amount": [1.0, 2.0, 500.0, 3.0, 4.0, 5.0],
                           "country": ["fr", None, None, "xx", "de", "fr"]}, list(range(6))) == []
    reports = q.add_dead_letters([{"field": "amount", "rule": "type"},
                                  {"field": None, "rule": "json"},
                                  {"field": "amount", "rule": "type"},
                                  {"field": "country", "rule": "required"}],
                                 [100, 101, 102, 103])
    assert len(reports) == 1
    r = reports[0].rates
    assert reports[0].events == 10
    assert r[("amount", "out_of_range")] == pytest.approx(0.1)
    assert r[("amount", "type_error")] == pytest.approx(0.2)
    assert r[("country", "missing")] == pytest.approx(0.3)
    assert r[("country", "out_of_range")] == pytest.approx(0.1)
    assert r[(EVENT, "other")] == pytest.approx(0.1)
    assert r[("amount", "missing")] == 0.0
    assert q.events == 0  # a new window starts


def test_a_paused_stream_closes_its_partial_window() -> None:
    q = QualityTracker(SPEC, window=1000)
    q.add_dead_letters([{"field": "amount", "rule": "type"}] * 30, list(range(30)))
    assert q.flush(min_events=50) == []
    q.add_features({"amount": [1.0] * 30, "country": ["fr"] * 30}, list(range(30)))
    [report] = q.flush(min_events=50)
    assert report.events == 60 and report.rates[("amount", "type_error")] == 0.5


def test_columns_of_events_count_nulls_as_missing_and_sent_nans_as_present() -> None:
    nan, inf = float("nan"), float("inf")
    records = [{"features": {"amount": 1.0, "country": "fr"}},
               {"features": {"amount": None, "country": None}},
               {"features": {"amount": nan, "country": "xx"}},
               {"features": {"amount": inf, "country": "de"}},
               {"features": {"amount": -inf}},  # written before 'country' existed
               {"features": {"amount": 7, "country": "fr"}}]
    columns = Columns.of_events(records, SPEC.features)
    assert columns.missing == {"amount": 1, "country": 2}
    assert isinstance(columns.values["amount"],
                      np.ndarray) and columns.values["amount"].dtype == float
    assert columns.raw["amount"][1] is None and columns.values["country"] == columns.raw["country"]
    from_events = QualityTracker(SPEC, window=6).add_features(columns, list(range(6)))
    by_lists = QualityTracker(SPEC, window=6).add_features(columns.raw, list(range(6)))
    assert from_events == by_lists
    rates = from_events[0].rates
    assert rates[("amount", "missing")] == pytest.approx(1 / 6)
    # inf and -inf; NaN is not compared
    assert rates[("amount", "out_of_range")] == pytest.approx(2 / 6)
    assert rates[("country", "missing")] == pytest.approx(2 / 6)
    assert rates[("country", "out_of_range")] == pytest.approx(1 / 6)
