"""``loopline run monitor``: the monitor service process."""

from __future__ import annotations

from loopline.kafka import ensure_topics
from loopline.registry import GLOBAL_TOPICS
from loopline.runtime.service import ServiceRuntime
from loopline.services.monitor.service import create, serve
from loopline.services.monitor.settings import MonitorSettings

__all__ = ["create", "main", "serve"]


def main() -> None:
    """Run the monitor until SIGINT/SIGTERM."""
    settings = MonitorSettings()
    with ServiceRuntime("monitor", settings) as rt:
        ensure_topics(rt.kafka.admin(), list(GLOBAL_TOPICS), settings.replication_factor)
        serve(rt, settings)


if __name__ == "__main__":
    main()
