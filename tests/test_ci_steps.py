"""CI runs every test that is not slow: the default run (neither slow nor e2e nor containers) in
``make test``, then the end-to-end tests in ``make test-e2e``, then the containers test in
``make test-containers`` (with a Docker engine); nothing falls between the steps."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"{target}:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def _marker_expression(command: str) -> str | None:
    """The ``-m`` expression given to pytest (``python -m pytest ... -m EXPR``), if any."""
    args = shlex.split(command)
    args = args[args.index("pytest") + 1 :] if "pytest" in args else args
    return args[args.index("-m") + 1] if "-m" in args else None


def test_the_default_run_leaves_out_slow_and_e2e() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    opts = config["ini_options"]
    assert _marker_expression(opts["addopts"]) == "not slow and not e2e and not containers"
    names = {m.split(":")[0] for m in opts["markers"]}
    assert {"slow", "e2e", "containers"} <= names


def test_ci_runs_the_fast_step_then_the_e2e_step() -> None:
    steps = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("make")
    ]
    assert steps == ["make test", "make test-e2e", "make test-readme"]
    assert _recipe("test-readme") == ["$(BIN)/python tests/readme_runner.py"]
    (fast,) = [c for c in _recipe("test") if "pytest" in c]
    assert _marker_expression(fast.split("||")[0]) is None  # the default: addopts
    (e2e,) = [c for c in _recipe("test-e2e") if "pytest" in c]
    # together with the default run: exactly what `-m 'not slow'` selects
    assert _marker_expression(e2e.split("||")[0]) == "e2e and not slow"
    for command in (fast, e2e):  # pytest's exit 5 = no test selected, not a failure
        assert command.endswith("|| test $$? -eq 5")


def test_type_and_import_checks_see_the_installed_layout() -> None:
    """``make typecheck`` and ``make lint-imports`` run on a mirror in which every folder that
    package-dir maps into ``jacfusion_fed`` (server/, clients/) sits where it is installed;
    mypy checks the whole package there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {
        package.removeprefix("jacfusion_fed."): folder
        for package, folder in config["package-dir"].items()
        if package.startswith("jacfusion_fed.")
    }
    assert mapped == {"clients": "clients", "server": "server"}
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    mirror = next(line for line in text.splitlines() if line.startswith("MIRROR ="))
    for sub, folder in mapped.items():
        assert f'cp -pR {folder} "$$tree/jacfusion_fed/{sub}"' in mirror
    for target in ("typecheck", "lint-imports"):
        assert "$(MIRROR)" in " ".join(_recipe(target))
    (mypy,) = [c for c in " ".join(_recipe("typecheck")).split("&&") if "/mypy" in c]
    assert shlex.split(mypy.split("2>&1")[0])[-2:] == ["-p", "jacfusion_fed"]


def test_ci_runs_the_containers_step_with_a_docker_engine() -> None:
    """Its own step, after the others: ``scripts/with-dockerd.sh`` starts an engine (as root)
    and stops it by PID; ``make test-containers`` runs every test marked ``containers``."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "scripts/with-dockerd.sh make test-containers" in lines
    (containers,) = [c for c in _recipe("test-containers") if "pytest" in c]
    assert _marker_expression(containers) == "containers"
    assert "||" not in containers  # selecting no test is a failure here
    marked = [
        p
        for p in (ROOT / "tests").rglob("test_*.py")
        if "pytest.mark.containers" in p.read_text() and p != Path(__file__).resolve()
    ]
    assert marked and all(
        str(p.parent).startswith(str(ROOT / "tests" / "containers")) for p in marked
    )
