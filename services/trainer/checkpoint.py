"""Atomic checkpoints of the trainer: learners, joins, triggers and consumed offsets in one file.

Everything is written together (temp file, fsync, rename), so after a crash the trainer resumes
from a state and the exact input offsets that produced it: no example is learned twice and none
is skipped. The file is local state, never sent through a topic (it is a pickle of river models).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from loopline.errors import LooplineError

FORMAT = 1


class CheckpointError(LooplineError):
    """A checkpoint cannot be read or written."""


def save(path: Path, offsets: dict[tuple[str, int], int], pipelines: dict[str, Any]) -> None:
    """Write the checkpoint atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = pickle.dumps({"format": FORMAT, "offsets": offsets, "pipelines": pipelines},
                        protocol=pickle.HIGHEST_PROTOCOL)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"cannot write trainer checkpoint {path}: {e}") from e


def load(path: Path) -> tuple[dict[tuple[str, int], int], dict[str, Any]]:
    """Read a checkpoint: (offsets, pipeline states); empty if there is none yet."""
    if not path.exists():
        return {}, {}
    try:
        data = pickle.loads(path.read_bytes())  # noqa: S301 - our own local state file
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
        raise CheckpointError(f"cannot read trainer checkpoint {path}: {type(e).__name__}: {e}; move it "
                              "away to start from the beginning of the topics") from e
    if data.get("format") != FORMAT:
        raise CheckpointError(f"trainer checkpoint {path} has format {data.get('format')}, expected {FORMAT}")
    return data["offsets"], data["pipelines"]
