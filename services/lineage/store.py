"""The lineage store: Parquet files per pipeline, table and topic-partition offset range.

Layout: ``<root>/<pipeline>/<table>/<topic>~<partition>~<first>~<last>.parquet`` with tables
``features``, ``predictions`` and ``feedback``. A file is written to a temporary name, fsynced and
renamed into place, so it exists whole or not at all; its name says which offsets it holds, so
after a crash the writer skips what is already stored and a retry never duplicates a row.
DuckDB reads the files for queries.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TABLES = ("features", "predictions", "feedback")
_NAME = re.compile(r"^(?P<topic>.+)~(?P<partition>\d+)~(?P<first>\d+)~(?P<last>\d+)\.parquet$")


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
        return sorted(p for p in folder.glob("*.parquet") if _NAME.match(p.name)) if folder.exists() else []

    def pipelines(self) -> list[str]:
        """Pipelines with data in the store."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.exists() else []

    def stored_upto(self, pipeline: str, table: str, topic: str, partition: int) -> int:
        """Highest offset of ``topic``/``partition`` already stored in ``table`` (-1 if none)."""
        high = -1
        for path in self.files(pipeline, table):
            m = _NAME.match(path.name)
            if m and m["topic"] == topic and int(m["partition"]) == partition:
                high = max(high, int(m["last"]))
        return high

    def write(self, pipeline: str, table: str, topic: str, partition: int, rows: Sequence[dict[str, Any]],
              schema: pa.Schema | None = None) -> Path:
        """Write rows (each with ``_offset``) of one partition as one file, atomically."""
        offsets = [r["_offset"] for r in rows]
        folder = self.table_dir(pipeline, table)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{topic}~{partition}~{min(offsets)}~{max(offsets)}.parquet"
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
