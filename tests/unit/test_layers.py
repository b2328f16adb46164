"""The layers a newcomer can see: application (loopline/app) above services above the core.

The core (``loopline/`` except ``loopline/app``) never imports a service or the application; a
service never imports the application. Every import is absolute (ruff's TID252 keeps it so), so
reading the import statements of each file is enough.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
CORE = REPO / "loopline"
APP = CORE / "app"
SERVICES = REPO / "services"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file, ``from x import y`` giving ``x`` and
    ``x.y``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; use absolute imports"
            base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for every import of a forbidden package (or a module in it)."""
    return [
        f"{path}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path)
        if any(module == name or module.startswith(name + ".") for name in forbidden)
    ]


def core_files() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if APP not in p.parents)


def service_files() -> list[Path]:
    return sorted(SERVICES.rglob("*.py"))


def test_the_walk_sees_the_layers() -> None:
    assert len(core_files()) > 20 and len(service_files()) > 20
    assert any(p.name == "errors.py" for p in core_files())


def test_the_core_imports_no_service_and_not_the_application() -> None:
    assert violations(core_files(), ("services", "loopline.services", "loopline.app")) == []


def test_services_do_not_import_the_application() -> None:
    assert violations(service_files(), ("loopline.app",)) == []


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("from loopline.services.trainer import Learner", True),
        ("import loopline.app.cli", True),
        ("from loopline import app", True),
        ("from loopline import services", True),
        ("import services.monitor", True),
        ("from loopline.kafka import KafkaConfig", False),
        ("from loopline import apply", False),
    ],
)
def test_the_check_catches_each_form(tmp_path: Path, source: str, caught: bool) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    assert bool(violations([path], ("services", "loopline.services", "loopline.app"))) is caught


def test_every_python_folder_is_an_installed_package() -> None:
    """A folder of modules missing from pyproject's packages is left out of a wheel install."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {p.parent
               for p in [*(REPO / "loopline").rglob("*.py"), *(REPO / "services").rglob("*.py")]}
    for folder in folders:
        rel = folder.relative_to(REPO).parts
        name = ".".join(("loopline", *rel) if rel[0] == "services" else rel)
        assert name in listed, f"{folder} is not in [tool.setuptools] packages"
        assert (folder / "__init__.py").exists(), f"{folder} has no __init__.py"
