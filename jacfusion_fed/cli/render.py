"""Output of every command: tables, JSON and progress lines, rendered one way.

- Tables go to stdout. When stdout is not a terminal (piped, redirected) they are rendered at
  their natural width, so a cell never wraps in the middle; in a terminal rich fits them to it.
- ``--json`` output uses the same names the tables show (fusion methods, class names, model
  versions).
- Progress and status lines go to stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich loads when something is rendered: `predict --json` never needs it
    from rich.console import Console
    from rich.table import Table

__all__ = ["err", "method_name", "new_table", "out", "print_json", "rich_table", "write_json"]

#: Width used when stdout is not a terminal: wide enough that no table ever wraps.
_UNLIMITED_WIDTH = 10_000


def out() -> Console:
    """The console for stdout (built per call: test runners and pipes swap ``sys.stdout``)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=_UNLIMITED_WIDTH, no_color=True)
    return console


def err() -> Console:
    """The console for status lines on stderr (soft wrap: never split a path)."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


#: Model versions are 16 hex digits; a column of them is never narrower (never cut to "eb4f…").
VERSION_WIDTH = 16


def new_table(title: str, columns: list[str], *, right: tuple[str, ...] = ()) -> Table:
    """A table for :func:`out`: piped, it is never wrapped; in a narrow terminal its cells wrap,
    except model versions, which are always shown whole."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in columns:
        version = name == "model version"
        table.add_column(
            name,
            justify="right" if name in right else "left",
            no_wrap=version,
            min_width=VERSION_WIDTH if version else None,
        )
    return table


def print_json(payload: Any) -> None:
    """JSON on stdout, plain (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def write_json(path: Path, payload: Any, *, indent: int = 2) -> None:
    """Write a command's JSON results atomically (a reader never sees half a file) and say
    where on stderr."""
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=indent) + "\n").encode())
    err().print(f"wrote {path}")


def method_name(proto_name: str) -> str:
    """``FUSION_METHOD_CONFIDENCE_MEAN`` -> ``confidence_mean`` (the name options use)."""
    return proto_name.removeprefix("FUSION_METHOD_").lower()


def rich_table(table: Any) -> Table:
    """A :class:`jacfusion_fed.evaluation.Table` as a rich table (same marks as the Markdown
    reports: an arrow only where a paired interval excludes 0, no bold "best" cell)."""
    import numpy as np
    from rich.table import Table

    from jacfusion_fed.evaluation.tables import arrows

    arrow = arrows(table)
    rendered = Table(title=table.title, title_justify="left", show_lines=False)
    rendered.add_column("UM / MM")
    rendered.add_column("Model")
    for col in table.columns:
        rendered.add_column(col.label, justify="right")
    last_group = None
    for row in table.rows:
        if row.group != last_group and last_group is not None:
            rendered.add_section()
        group = "" if row.group == last_group else ("UM Nets" if row.group == "UM" else row.group)
        last_group = row.group
        cells = []
        for col in table.columns:
            if not row.acc.get(col.key):
                cells.append("–")
                continue
            text = f"{100 * row.mean(col.key):.1f}"
            seeds = row.seed_acc.get(col.key, [])
            if len(seeds) > 1:  # the seed spread
                text += f" ± {100 * float(np.std(seeds, ddof=1)):.1f}"
            elif len(row.acc[col.key]) > 1:
                text += f" ± {100 * row.std(col.key):.1f}"
            if (row.group, row.kind, col.key) in arrow:
                text += f" {arrow[(row.group, row.kind, col.key)]}"
            cells.append(text)
        rendered.add_row(group, row.name, *cells)
    return rendered
