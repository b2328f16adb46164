"""Settings of the lineage service (LOOPLINE_* environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from loopline.settings import ServiceSettings


class LineageSettings(ServiceSettings):
    """Where the lineage store lives and how often it writes."""

    lineage_dir: Path | None = Field(
        None, description="Lineage store folder (default: $LOOPLINE_HOME/lineage).")
    flush_rows: int = Field(20_000, ge=1,
                            description="Rows buffered per partition before a file is written.")
    flush_interval_s: float = Field(
        5.0, gt=0, description="Longest time a row waits in memory before its file is written.")

    def store_dir(self) -> Path:
        """The lineage store folder."""
        return self.lineage_dir or self.home / "lineage"
