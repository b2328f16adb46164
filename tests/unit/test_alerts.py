"""Alert records fit the schema and have stable ids per episode."""

from __future__ import annotations

import pytest

from loopline import avro
from loopline.alerts import alert_event


def test_alert_round_trips_and_id_is_stable_per_episode() -> None:
    a = alert_event("fraud", "drift", "amount drifted", feature="amount", detector="adwin",
                    statistic=0.4, threshold=0.25, episode="p0:1200", at=1)
    b = alert_event("fraud", "drift", "amount drifted", feature="amount", detector="adwin",
                    statistic=0.5, threshold=0.25, episode="p0:1200", at=2)
    assert a["alert_id"] == b["alert_id"]
    assert avro.codec("alert").decode(avro.codec("alert").encode(a)) == a
    c = alert_event("fraud", "drift", "again", feature="amount", detector="adwin",
                    episode="p0:9000")
    assert c["alert_id"] != a["alert_id"]


def test_unknown_field_is_refused() -> None:
    with pytest.raises(TypeError, match="colour"):
        alert_event("fraud", "drift", "x", colour="red")
