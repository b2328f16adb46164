"""Real streams through ``PipelineMonitor`` as the services feed it, at default settings.

A first model (gradient boosting, exported to ONNX) is trained on the first 2000 rows and
registered through registration's own validation (profile from ONNX Runtime's outputs); then
features, the model's predictions and feedback 50 events late (bench/monitor_streams.py). The
bar is the one the monitor is held to: at most one false alarm before a real change, an alert
within 500 events after it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench import monitor_streams as ms

CASES: dict[str, Callable[[int], ms.Stream]] = {
    "seasonal weather, thermometer reads 6 degrees warm": lambda s: ms.weather(s, kind="sensor"),
    "seasonal weather, wetter climate": lambda s: ms.weather(s, kind="climate"),
    "nonlinear concept rotating (errors only)": lambda s: ms.moving_concept(s),
    "FriedmanDrift regression (errors only)": lambda s: ms.friedman(s),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quiet_through_seasons_and_fast_on_a_real_change(case: str) -> None:
    stream = CASES[case](7)
    run = ms.drive(stream)
    change = stream.change_at
    assert change is not None
    before = [a for p, a in run.raised() if p <= change]
    after = [(p, a) for p, a in run.raised() if p > change and a["severity"] == "alert"]
    assert len(before) <= 1, [a["message"] for a in before]
    assert after, "no alert after the change"
    position, alert = after[0]
    assert position - change <= 500, alert["message"]
    assert (
        alert["action"] and alert["p_value"] is not None and alert["first_offset"] >= change - 200
    )


def test_a_stationary_seasonal_stream_raises_nothing_at_all() -> None:
    run = ms.drive(ms.weather(8, n=9000, change_at=None))
    assert run.raised() == []
    pm = run.monitor
    assert pm is not None and pm.performance.labeled, "feedback was joined and judged"
