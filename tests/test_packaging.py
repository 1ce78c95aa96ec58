"""The wheel ships every package: ``[tool.setuptools].packages`` is listed by hand (because
``clients/`` and ``server/`` are mapped into ``jacfusion_fed``), so a new folder must be added
there; this test names any that is missing or listed without existing."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _setuptools() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as fh:
        table: dict[str, object] = tomllib.load(fh)["tool"]["setuptools"]
    return table


def _packages_on_disk(package_dir: dict[str, str]) -> set[str]:
    """Dotted names of every folder with Python files below each mapped root."""
    found: set[str] = set()
    for name, folder in package_dir.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.parent.relative_to(root)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_package_folder_is_listed() -> None:
    table = _setuptools()
    package_dir = dict(table["package-dir"])  # type: ignore[call-overload]
    assert package_dir == {
        "jacfusion_fed": "jacfusion_fed",
        "jacfusion_fed.clients": "clients",
        "jacfusion_fed.server": "server",
    }
    listed = set(table["packages"])  # type: ignore[call-overload]
    on_disk = _packages_on_disk(package_dir)
    assert sorted(on_disk - listed) == [], "add these to [tool.setuptools].packages"
    assert sorted(listed - on_disk) == [], "listed in [tool.setuptools].packages, not on disk"


def test_every_package_folder_has_an_init() -> None:
    """A folder without ``__init__.py`` would be a namespace package, easy to leave out."""
    table = _setuptools()
    for name in table["packages"]:  # type: ignore[attr-defined]
        parts = str(name).split(".")
        if parts[:2] == ["jacfusion_fed", "clients"]:
            folder = REPO / "clients" / Path(*parts[2:])
        elif parts[:2] == ["jacfusion_fed", "server"]:
            folder = REPO / "server" / Path(*parts[2:])
        else:
            folder = REPO / Path(*parts)
        assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py"
