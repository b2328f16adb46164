"""CLI tables: as wide as the terminal, whole when the output is piped or captured."""

from __future__ import annotations

import io

import pytest
from rich.table import Table

from loopline.terminal import make_console


def _table(reason: str) -> Table:
    table = Table("at", "version", "reason")
    table.add_row("2026-01-01 10:00:00", "fraud/2", reason)
    return table


@pytest.mark.parametrize("columns", [None, "60"])
def test_piped_output_prints_every_row_whole(monkeypatch: pytest.MonkeyPatch,
                                             columns: str | None) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:  # an exported COLUMNS describes the terminal, not the pipe
        monkeypatch.setenv("COLUMNS", columns)
    reason = "registered: accepted sklearn.linear; " + "contender 0.97, " * 40 + "the end"
    out = io.StringIO()
    make_console(file=out).print(_table(reason))
    rows = [line for line in out.getvalue().splitlines() if "fraud/2" in line]
    assert len(rows) == 1 and reason in rows[0]  # one line, not cut at 80 columns nor wrapped


def test_a_terminal_or_columns_sets_the_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    console = make_console(file=out, force_terminal=True, color_system=None)
    console.print(_table("x" * 200))
    assert console.width == 60
    assert max(len(line) for line in out.getvalue().splitlines()) <= 60
    monkeypatch.delenv("COLUMNS")
    terminal = make_console(file=io.StringIO(), force_terminal=True, width=100)
    assert terminal.width == 100
    assert make_console(file=io.StringIO(), width=70).width == 70  # explicit width, even piped
