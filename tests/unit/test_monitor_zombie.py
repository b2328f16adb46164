"""Deployed versions without traffic become zombies;
idle time starts at deployment or monitor start."""

from __future__ import annotations

from loopline.services.monitor.zombie import ZombieWatch


def test_idle_counts_from_the_later_of_deployment_and_start_then_from_traffic() -> None:
    z = ZombieWatch(after_s=60)
    z.set_deployed({("m", 1): ("champion", 1000.0), ("m", 2): ("shadow", 900.0)})
    z.traffic("m", 1, 1030.0)
    status = {(s.model_name, s.model_version): s
              for s in z.check(now_s=1055.0, watching_since_s=950.0)}
    assert status[("m", 1)].idle_s == 25.0 and not status[("m", 1)].idle
    assert status[("m", 2)].idle_s == 105.0 and status[("m", 2)].idle
    assert status[("m", 2)].stage == "shadow"
    z.traffic("m", 2, 1050.0)
    assert not any(s.idle for s in z.check(now_s=1060.0, watching_since_s=950.0))
