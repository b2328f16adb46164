"""The demo's closing hint: how to get `loopline` on PATH when the shell would not find it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loopline.app.demo import path_hint


def test_the_hint_says_how_to_get_loopline_on_path(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh shell: .venv/bin is not on PATH
    hint = path_hint()
    assert hint is not None and f"source {venv_bin / 'activate'}" in hint and "make shell" in hint
    monkeypatch.setenv("PATH", f"{venv_bin}:{tmp_path}")
    assert path_hint() is None  # activated: nothing to say
