"""Zombie models: a deployed version (champion, challenger, canary, shadow) with no traffic for too long."""

from __future__ import annotations

from dataclasses import dataclass, field

DEPLOYED = ("champion", "challenger", "canary", "shadow")

VersionKey = tuple[str, int]


@dataclass(frozen=True)
class ZombieStatus:
    """How long one deployed version has been idle, and whether that makes it a zombie."""

    model_name: str
    model_version: int
    stage: str
    idle_s: float
    zombie: bool


@dataclass
class ZombieWatch:
    """Last traffic per deployed version (when the monitor read it); idle time counts from deployment,
    from when the monitor started reading, or from the last prediction, whichever is latest."""

    after_s: float
    deployed: dict[VersionKey, tuple[str, float]] = field(default_factory=dict)  # stage, since (epoch s)
    last_seen: dict[VersionKey, float] = field(default_factory=dict)

    def set_deployed(self, versions: dict[VersionKey, tuple[str, float]]) -> None:
        """Replace the deployed set: ``{(name, version): (stage, deployed_at_s)}``."""
        self.deployed = dict(versions)

    def traffic(self, name: str, version: int, at_s: float) -> None:
        """Record a prediction of (name, version) made at ``at_s``."""
        key = (name, version)
        if at_s > self.last_seen.get(key, 0.0):
            self.last_seen[key] = at_s

    def check(self, now_s: float, watching_since_s: float) -> list[ZombieStatus]:
        """Idle time of every deployed version now.

        A version is not idle before the monitor started reading its topics
        (``watching_since_s``): it may simply not have read the predictions yet.
        """
        out = []
        for key, (stage, since) in sorted(self.deployed.items()):
            last = max(since, watching_since_s, self.last_seen.get(key, 0.0))
            idle = max(0.0, now_s - last)
            out.append(ZombieStatus(key[0], key[1], stage, idle, idle >= self.after_s))
        return out
