"""One error path for every command: a mistake is one ``error: ...`` line on stderr and a
non-zero exit; the traceback only with ``--log-level debug``.

:func:`guarded` wraps each command's callback (done once for all commands in
:mod:`jacfusion_fed.cli`): it adds the shared ``--log-level`` option, sets up logging, and turns
any exception into that one line. Commands raise :class:`CliError` for mistakes they detect;
library exceptions (missing files, loose key permissions, ports in use, gRPC errors, bad
values) are described by :func:`describe`.
"""

from __future__ import annotations

import errno
import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer

from jacfusion_fed.cli import logs
from jacfusion_fed.cli.cli_error import EXIT_FAILED, EXIT_USAGE, CliError

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "CliError", "describe", "fail", "guarded", "print_error"]

LogLevelOpt = Annotated[
    str,
    typer.Option(
        "--log-level",
        help="debug, info, warning or error; debug also shows tracebacks and gRPC/Flower logs.",
    ),
]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is_rpc_error(exc: BaseException) -> bool:
    grpc = sys.modules.get("grpc")  # never import grpc just to check
    return grpc is not None and isinstance(exc, grpc.RpcError) and hasattr(exc, "code")


def describe(exc: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an exception escaping a command."""
    if isinstance(exc, CliError):
        return _one_line(exc.message), exc.exit_code
    if isinstance(exc, click.BadParameter) and exc.param is None and exc.param_hint is None:
        return _one_line(exc.message), EXIT_USAGE  # raised by a command: its message says it all
    if isinstance(exc, click.ClickException):
        return _one_line(exc.format_message()), EXIT_USAGE
    if _is_rpc_error(exc):
        from jacfusion_fed.rpc.status_details import with_details

        said = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        return _one_line(with_details(said, exc)), EXIT_FAILED
    if isinstance(exc, FileNotFoundError):
        name = exc.filename
        return (f"file not found: {name}" if name else _one_line(str(exc))), EXIT_USAGE
    if isinstance(exc, IsADirectoryError):
        return f"{exc.filename} is a directory, expected a file", EXIT_USAGE
    if isinstance(exc, PermissionError):
        if exc.filename is not None:  # the OS refused: name the file
            return f"cannot access {exc.filename}: permission denied", EXIT_USAGE
        return _one_line(str(exc)), EXIT_USAGE  # our own checks (e.g. chmod 600 advice)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return _one_line(f"address in use: {exc.strerror or exc}"), EXIT_USAGE
    atomic = sys.modules.get("jacfusion_fed.store.atomic")
    if atomic is not None and isinstance(exc, atomic.CorruptFileError):
        return _one_line(f"damaged file, not used: {exc}"), EXIT_USAGE
    if isinstance(exc, (ValueError, KeyError)):  # the project's validation errors
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return _one_line(str(text)), EXIT_USAGE
    return _one_line(f"{type(exc).__name__}: {exc}"), EXIT_FAILED


def print_error(message: str) -> None:
    """The one stderr line of a failed command (plain text: no wrapping, no colour)."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def fail(exc: BaseException) -> typer.Exit:
    """Print ``exc`` as one line (after its traceback with ``--log-level debug``); return the
    :class:`typer.Exit` to raise."""
    message, code = describe(exc)
    if logs.current_level() == "debug":
        traceback.print_exception(exc, file=sys.stderr)
    elif code == EXIT_FAILED and not isinstance(exc, CliError) and not _is_rpc_error(exc):
        message += " (--log-level debug shows the traceback)"
    print_error(message)
    return typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the shared ``--log-level`` option and the one-line error path."""
    signature = inspect.signature(fn, eval_str=True)
    declares_level = "log_level" in signature.parameters
    params = list(signature.parameters.values())
    if not declares_level:
        params.append(
            inspect.Parameter(
                "log_level", inspect.Parameter.KEYWORD_ONLY, default="info", annotation=LogLevelOpt
            )
        )

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        level = kwargs["log_level"] if declares_level else kwargs.pop("log_level", "info")
        try:
            logs.setup(level)
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            raise fail(exc) from None

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
