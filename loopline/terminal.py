"""The consoles the command line prints through: the terminal's width, or whole lines when piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

#: Width of output that is not a terminal (a pipe, a file, a test's capture): wide enough that
#: no table row is cut or wrapped (a stage change's reason is at most 1000 characters).
PIPED_WIDTH = 8192


class AdaptiveConsole(Console):
    """A rich Console as wide as its terminal, and :data:`PIPED_WIDTH` when it writes elsewhere.

    Rich falls back to 80 columns (or the width of whichever standard stream is a terminal, or
    ``COLUMNS``) when stdout is piped, which cuts tables meant for ``grep`` or a file. ``COLUMNS``
    describes a terminal, so it sets the width only of output that goes to one (shells and CI
    runners often export it); an explicit ``width=`` always wins.
    """

    def __init__(self, *args: Any, width: int | None = None, **options: Any) -> None:
        super().__init__(*args, width=width, **options)
        self._explicit_width = width is not None  # rich also sets its width from COLUMNS

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size; :data:`PIPED_WIDTH` columns when the output is not a terminal."""
        measured = super().size
        if not self._explicit_width and not self.is_terminal:
            return ConsoleDimensions(PIPED_WIDTH, measured.height)
        return measured

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size
        self._explicit_width = True


def make_console(*, stderr: bool = False, **options: Any) -> Console:
    """A console for the command line (no highlighting of numbers and paths in our own text)."""
    return AdaptiveConsole(stderr=stderr, highlight=False, **options)
