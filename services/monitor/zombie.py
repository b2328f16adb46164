"""Zombie models: a deployed version (champion, challenger, canary, shadow) that serves no traffic,
or whose predictions nobody reads, for too long.

"Reads" is Kafka's own notion: a consumer group has committed an offset past the prediction on the
predictions topic. The monitor knows where each version's predictions landed (it consumes them) and
asks the broker, now and then, how far the reader groups have committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEPLOYED = ("champion", "challenger", "canary", "shadow")

VersionKey = tuple[str, int]
Position = tuple[int, float]  # offset on the predictions topic, when the monitor saw it (epoch s)


@dataclass(frozen=True)
class ZombieStatus:
    """How long one deployed version has been idle or unread, and whether that makes it a zombie."""

    model_name: str
    model_version: int
    stage: str
    idle_s: float
    # age of its oldest prediction no reader has consumed (0: none, or readers unknown)
    unread_s: float
    after_s: float

    @property
    def idle(self) -> bool:
        """No predictions for too long."""
        return self.idle_s >= self.after_s

    @property
    def unread(self) -> bool:
        """Predictions nobody has read for too long."""
        return self.unread_s >= self.after_s


@dataclass
class ZombieWatch:
    """Traffic and readership per deployed version, as the monitor saw them.

    Idle time counts from deployment, from when the monitor started reading, or from the last
    prediction, whichever is latest. Unread time counts from when the monitor saw the oldest
    prediction (per partition) that no reader group had committed past at the last check.
    """

    after_s: float
    # stage, since (epoch s)
    deployed: dict[VersionKey, tuple[str, float]] = field(default_factory=dict)
    last_seen: dict[VersionKey, float] = field(default_factory=dict)
    oldest_unread: dict[VersionKey, dict[int, Position]] = field(default_factory=dict)
    newest: dict[VersionKey, dict[int, Position]] = field(default_factory=dict)
    readers_checked: bool = False

    def set_deployed(self, versions: dict[VersionKey, tuple[str, float]]) -> None:
        """Replace the deployed set: ``{(name, version): (stage, deployed_at_s)}``."""
        self.deployed = dict(versions)
        for gone in set(self.newest) - set(versions):
            self.newest.pop(gone, None)
            self.oldest_unread.pop(gone, None)

    def traffic(self, name: str, version: int, at_s: float,
                offsets: dict[int, tuple[int, int]] | None = None) -> None:
        """Record predictions of (name, version) seen at
        ``at_s``: ``offsets`` is partition -> (first, last)."""
        key = (name, version)
        if at_s > self.last_seen.get(key, 0.0):
            self.last_seen[key] = at_s
        if not offsets:
            return
        unread, newest = self.oldest_unread.setdefault(key, {}), self.newest.setdefault(key, {})
        for partition, (first, last) in offsets.items():
            unread.setdefault(partition, (first, at_s))
            if last >= newest.get(partition, (-1, 0.0))[0]:
                newest[partition] = (last, at_s)

    def read(self, committed: dict[int, int]) -> None:
        """Fold in how far reader groups have read: partition
        -> furthest committed offset (next to read)."""
        self.readers_checked = True
        for key, unread in self.oldest_unread.items():
            for partition, (offset, _) in list(unread.items()):
                upto = committed.get(partition, -1)
                if upto <= offset:
                    continue
                last = self.newest[key][partition]
                if upto > last[0]:
                    del unread[partition]
                else:
                    # Read partway: the oldest unread one lies between; the newest's time never
                    # overstates.
                    unread[partition] = last

    def check(self, now_s: float, watching_since_s: float) -> list[ZombieStatus]:
        """Idle and unread time of every deployed version now.

        A version is not idle before the monitor started reading its topics
        (``watching_since_s``): it may simply not have read the predictions yet.
        """
        out = []
        for key, (stage, since) in sorted(self.deployed.items()):
            last = max(since, watching_since_s, self.last_seen.get(key, 0.0))
            oldest = min((at for _, at in self.oldest_unread.get(key, {}).values()), default=now_s)
            unread = max(0.0, now_s - oldest) if self.readers_checked else 0.0
            out.append(ZombieStatus(key[0], key[1], stage, max(0.0, now_s - last), unread,
                                    self.after_s))
        return out
