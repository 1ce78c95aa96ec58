"""The one ``jacfusion-fed`` command.

One module per command group (``simulate``, ``evaluate``, ``owner``, ``coordinator``,
``predict``, ``certs``, ``deploy``, ``bench``, ``proxy``, ``audit``), each registering itself on
:data:`app`; shared options and their one meaning per name in :mod:`.options`, output in
:mod:`.render`, the error path in :mod:`.errors`. Heavy imports (torch, Flower, the
coordinator) happen inside the commands, so ``--help`` and ``predict`` start fast.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator, Sequence

import click
import typer

from jacfusion_fed.cli import logs
from jacfusion_fed.cli.errors import EXIT_USAGE, fail, guarded, print_error

__all__ = ["app", "group", "main"]

app = typer.Typer(
    name="jacfusion-fed",
    help="Privacy-oriented federated late fusion with sample-wise Jacobian regularization.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_COMMAND_MODULES = (
    "simulate",
    "evaluate",
    "owner",
    "coordinator",
    "predict",
    "certs",
    "deploy",
    "bench",
    "proxy",
    "records",
    "audit",
    "storage",
)


def group(parent: typer.Typer, name: str, help_text: str) -> typer.Typer:
    """The sub-command group ``name`` of ``parent``, created unless another module did."""
    for info in parent.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    parent.add_typer(sub, name=name)
    return sub


def plain_help(doc: str | None) -> str | None:
    """A docstring as help text: paragraphs joined into lines, RST roles and literals plain."""
    if not doc:
        return doc
    text = re.sub(
        r":[a-z]+:`(~?)([^`<]+?)(?: <[^>]+>)?`",
        lambda m: m.group(2).rpartition(".")[2] if m.group(1) else m.group(2),
        doc,
    )
    text = text.replace("``", "`")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(p for p in paragraphs if p)


def _commands(typer_app: typer.Typer) -> Iterator[typer.models.CommandInfo]:
    yield from typer_app.registered_commands
    for info in typer_app.registered_groups:
        if info.typer_instance is not None:
            info.typer_instance.info.help = plain_help(info.typer_instance.info.help or None)
            yield from _commands(info.typer_instance)


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
    for info in _commands(app):  # every command: --log-level, one-line errors, plain help
        if info.callback is not None:
            info.help = plain_help(info.help or info.callback.__doc__)
            info.callback = guarded(info.callback)


_register()


def _dedupe(message: str) -> str:
    """Click and typer both append "Did you mean ...?" to an unknown command: keep one."""
    parts = re.split(r"(?<=[.?!]) ", message)
    return " ".join(p for i, p in enumerate(parts) if p not in parts[:i])


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: every mistake is one ``error:`` line and a non-zero exit."""
    args = list(sys.argv[1:] if argv is None else argv)
    logs.configure_environment(logs.peek_level(args))  # before anything imports grpc
    try:
        code = app(args=args, prog_name="jacfusion-fed", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # a group without a command: its help
        text = exc.ctx.get_help() if exc.ctx else ""  # (rich prints it and returns "")
        if text:
            click.echo(text)
        code = EXIT_USAGE
    except click.UsageError as exc:  # bad or missing option values, unknown commands
        where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
        print_error(_dedupe(" ".join(exc.format_message().split())) + where)
        code = EXIT_USAGE
    except click.Abort:
        print_error("aborted")
        code = 130
    except Exception as exc:  # raised outside a command callback (e.g. while registering)
        code = fail(exc).exit_code
    sys.exit(code if isinstance(code, int) else 0)
