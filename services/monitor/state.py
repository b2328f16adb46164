"""Checkpoints of the monitor's state in the state folder (never on a topic), written atomically.

The file is a pickle of the monitor's own objects (river detectors, windows, joins) and the
offsets they include. It lives only on the monitor's local disk under LOOPLINE_HOME; it is
never read from Kafka or from anyone else. A checkpoint written by another river version is
ignored (river's pickles are not promised to be stable across versions).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import river

log = logging.getLogger(__name__)

# Bumped whenever the pickled objects change shape; a checkpoint of another format is ignored.
# 2: categorical windows hold integer codes, numeric windows a sorted KS sample.
# 3: the feedback join holds predictions as tuples, not Pending objects.
FORMAT = 3


class Checkpoint:
    """Save and load one state object at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, state: Any) -> int:
        """Write ``state`` atomically (temp file, fsync, rename); return the bytes written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = pickle.dumps({"format": FORMAT, "river": river.__version__, "state": state},
                            protocol=pickle.HIGHEST_PROTOCOL)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(data)

    def load(self) -> Any | None:
        """The saved state, or None if there is none or it cannot be used (kept aside as ``.bad``)."""
        if not self.path.exists():
            return None
        try:
            envelope = pickle.loads(self.path.read_bytes())  # noqa: S301 - our own local file
            if envelope.get("format") != FORMAT or envelope.get("river") != river.__version__:
                log.warning("checkpoint_incompatible", extra={
                    "path": str(self.path), "format": envelope.get("format"), "river": envelope.get("river")})
                return None
            return envelope["state"]
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: start fresh
            bad = self.path.with_suffix(".bad")
            os.replace(self.path, bad)
            log.error("checkpoint_unreadable", extra={"path": str(self.path), "moved_to": str(bad),
                                                      "error": f"{type(e).__name__}: {e}"})
            return None
