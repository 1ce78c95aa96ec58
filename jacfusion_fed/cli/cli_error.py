"""The CLI's one exception for mistakes the user can fix, and its exit codes (a module of its
own, so that :mod:`jacfusion_fed.cli.logs` and :mod:`jacfusion_fed.cli.errors` both import it
at the top, without a cycle)."""

from __future__ import annotations

from typing import Final

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "CliError"]

#: Exit codes: 1 the remote side or the run failed, 2 the command line or a local file is wrong.
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class CliError(Exception):
    """A mistake the user can fix, described in one line (``exit_code`` 2 by default)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
