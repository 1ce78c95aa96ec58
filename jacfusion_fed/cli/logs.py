"""Logging of every command: one ``--log-level``, quiet gRPC core, Flower without colour codes
when stderr is not a terminal.

gRPC's C core reads ``GRPC_VERBOSITY`` once, when ``grpc`` is first imported, so
:func:`configure_environment` runs in :func:`jacfusion_fed.cli.main` before any command module
imports it: below ``debug`` the core prints its errors only (``ERROR``: no ``I1130 ...`` lines,
no "No match found for server name" floods; a failed call reaches the user as the command's
one ``error:`` line), at ``debug`` it prints its own debug lines.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence

from jacfusion_fed.cli.cli_error import CliError

__all__ = ["configure_environment", "current_level", "peek_level", "quiet_flower", "setup"]

LEVELS = ("debug", "info", "warning", "error")
_state = {"level": "info"}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it).

    Our own INFO lines are a service's status; other libraries' (alembic, Ray, ...) are noise
    to a CLI user, so they pass from WARNING up unless ``--log-level debug``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "jacfusion_fed" or record.name.startswith("jacfusion_fed.")
        if not (ours or record.levelno >= logging.WARNING or _state["level"] == "debug"):
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def peek_level(argv: Sequence[str]) -> str:
    """The ``--log-level`` value in ``argv`` (before parsing), ``info`` if none is given."""
    for i, arg in enumerate(argv):
        if arg == "--log-level" and i + 1 < len(argv):
            return argv[i + 1].lower()
        if arg.startswith("--log-level="):
            return arg.partition("=")[2].lower()
    return "info"


def configure_environment(level: str) -> None:
    """Environment for libraries that read it at import: gRPC core logs (unless set by the
    user) and Python warnings from dependencies below ``debug``."""
    os.environ.setdefault("GRPC_VERBOSITY", "DEBUG" if level == "debug" else "ERROR")
    if level != "debug":
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def setup(level: str) -> None:
    """Log records of ``level`` and above to stderr, one line each (other libraries' records
    from WARNING up, unless ``debug``: see :class:`_StderrHandler`)."""
    name = level.lower()
    if name not in LEVELS:
        raise CliError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
    _state["level"] = name
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.getLevelNamesMapping()[name.upper()])


def current_level() -> str:
    """The ``--log-level`` of the running command."""
    return _state["level"]


def quiet_flower() -> None:
    """Flower's console handler: INFO lines only at ``debug`` (they are progress noise for a
    CLI user), and no ANSI colour codes unless stderr is a terminal."""
    from flwr.common.logger import update_console_handler

    root = logging.getLogger().level
    level = root if current_level() == "debug" else max(root, logging.WARNING)
    flwr = logging.getLogger("flwr")
    flwr.setLevel(level)
    flwr.propagate = False  # Flower prints through its own handler: no second copy of a line
    update_console_handler(level=level, colored=sys.stderr.isatty())
