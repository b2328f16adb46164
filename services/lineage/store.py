"""The lineage store: Parquet files per pipeline, table and topic-partition offset range.

Layout: ``<root>/<pipeline>/<table>/<topic>~<topic id>~<partition>~<first>~<last>.parquet`` with
tables ``features``, ``predictions`` and ``feedback``. A file is written to a temporary name,
fsynced and renamed into place, so it exists whole or not at all; its name says which offsets of
which incarnation of the topic it holds (the topic id changes when a broker restarts empty or a
topic is created again, and offsets start at 0 again), so after a crash the writer skips exactly
what is already stored and a retry never duplicates a row, while a new incarnation's rows are never
mistaken for stored ones. Files of the older layout (no topic id) are read as incarnation
``legacy``. DuckDB reads the files for queries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from loopline.services.lineage.errors import StoreMismatch

TABLES = ("features", "predictions", "feedback")
_NAME = re.compile(r"^(?P<topic>[^~]+)(?:~(?P<topic_id>[A-Za-z0-9_-]+))?"
                   r"~(?P<partition>\d+)~(?P<first>\d+)~(?P<last>\d+)\.parquet$")
LEGACY = "legacy"


def safe_id(topic_id: str) -> str:
    """A topic id as it appears in file names (URL-safe base64: no '/' or '+')."""
    return topic_id.replace("/", "_").replace("+", "-").rstrip("=") or LEGACY


class LineageStore:
    """Idempotent Parquet writer and the file index queries read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def table_dir(self, pipeline: str, table: str) -> Path:
        """Folder of one table of one pipeline."""
        return self.root / pipeline / table

    def files(self, pipeline: str, table: str) -> list[Path]:
        """Every complete file of a table."""
        folder = self.table_dir(pipeline, table)
        return sorted(p for p in folder.glob("*.parquet")
                      if _NAME.match(p.name)) if folder.exists() else []

    def pipelines(self) -> list[str]:
        """Pipelines with data in the store."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir()) if self.root.exists() else []

    def stored_upto(self, pipeline: str, table: str, topic: str, topic_id: str, partition: int,
                    end_offset: int | None = None) -> int:
        """Highest offset of this incarnation of ``topic``/``partition`` stored in ``table`` (-1:
        none).

        With the partition's ``end_offset`` (exact on Kafka), a store holding offsets the topic
        never reached raises :class:`StoreMismatch`: that is another topic's data, not ours to skip
        over.
        """
        wanted = safe_id(topic_id)
        high = -1
        for path in self.files(pipeline, table):
            m = _NAME.match(path.name)
            if (m and m["topic"] == topic and (m["topic_id"] or LEGACY) == wanted
                    and int(m["partition"]) == partition):
                high = max(high, int(m["last"]))
        if end_offset is not None and high >= end_offset:
            raise StoreMismatch(f"the store holds {topic} (id {topic_id}) partition {partition} up "
                                f"to offset {high}, but the topic ends at {end_offset}: the store "
                                "belongs to other data (a restored copy?); move "
                                f"{self.table_dir(pipeline, table)} aside")
        return high

    def write(self, pipeline: str, table: str, topic: str, topic_id: str, partition: int,
              rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
        """Write rows (each with ``_offset``) of one partition as one file, atomically."""
        offsets = [r["_offset"] for r in rows]
        folder = self.table_dir(pipeline, table)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / (f"{topic}~{safe_id(topic_id)}~{partition}"
                          f"~{min(offsets)}~{max(offsets)}.parquet")
        tmp = folder / f".{final.name}.tmp"
        pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return final

    def rewrite(self, path: Path, table: pa.Table) -> None:
        """Replace a file's content atomically (used to forget rows); removes it when empty."""
        if table.num_rows == 0:
            path.unlink()
            return
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
