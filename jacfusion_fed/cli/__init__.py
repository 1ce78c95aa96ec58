"""The one ``jacfusion-fed`` command: simulate, owner, coordinator, predict, certs, evaluate,
bench. Each command group lives in its own module and registers itself on :data:`app`; heavy
imports happen inside the commands so ``--help`` stays fast."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="jacfusion-fed",
    help="Privacy-oriented federated late fusion with sample-wise Jacobian regularization.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

_COMMAND_MODULES = (
    "bench", "certs", "serve", "simulate", "deploy", "evaluate", "reliability", "records",
)  # fmt: skip


def _register() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
