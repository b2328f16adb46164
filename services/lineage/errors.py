"""The lineage service's errors."""

from __future__ import annotations

from loopline.errors import LooplineError


class StoreMismatch(LooplineError):
    """The store holds offsets of a topic incarnation that the topic does not have."""
