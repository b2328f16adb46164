"""The monitor's errors."""

from __future__ import annotations

from loopline.errors import LooplineError


class DetectorError(LooplineError):
    """A detector name is unknown or does not fit the stream it is asked to watch."""
