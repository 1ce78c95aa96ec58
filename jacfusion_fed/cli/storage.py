"""``jacfusion-fed owner migrate-store`` and ``jacfusion-fed bench store``: the owner's record
store (SQLite, ``<workspace>/live/records.sqlite3``) and its figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.render import err, out, write_json

__all__ = ["bench_store", "migrate_store", "register"]


def migrate_store(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory.")],
    pseudonym_key: Annotated[
        Path | None,
        typer.Option(help="The deployment's key (only for a store from before key fingerprints)."),
    ] = None,
) -> None:
    """Move an owner's live records from the old one-file-per-record layout into
    WORKSPACE/live/records.sqlite3 (an owner does it when it starts; this does it now, with the
    owner stopped, and says what moved). Every file is verified first; the old files are
    deleted only after the database has committed them all."""
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer
    from jacfusion_fed.store.record_migration import migrate_record_files

    if not workspace.is_dir():
        raise CliError(f"--workspace {workspace}: no such directory")
    fingerprint = (
        None if pseudonym_key is None else Pseudonymizer.from_file(pseudonym_key).fingerprint
    )
    report = migrate_record_files(workspace / "live", fingerprint)
    if report is None:
        out().print(
            f"nothing to migrate: {workspace / 'live'} holds no records in the old layout",
            highlight=False,
        )
        return
    out().print(
        f"migrated {report.records} live record(s), {report.logits} cached logit row(s) and "
        f"{report.retired} retired pseudonym(s) into {report.database} in {report.seconds:.1f} s"
        + (f"; {report.expired} expired record(s) dropped" if report.expired else ""),
        highlight=False,
    )


def bench_store(
    records: Annotated[int, typer.Option(help="Records for the throughput runs.", min=1024)] = (
        100_000
    ),
    batch: Annotated[int, typer.Option(help="Records per batch.", min=1)] = 1024,
    sizes: Annotated[
        str, typer.Option(help="Comma-separated store sizes for disk bytes per record.")
    ] = "10000",
    submit_records: Annotated[
        int, typer.Option(help="Records of the one-file `jacfusion-fed submit` run (0: skip).")
    ] = 100_000,
    services: Annotated[
        bool, typer.Option(help="Also measure through gRPC with mTLS (an owner process).")
    ] = True,
    workdir: Annotated[
        Path | None, typer.Option(help="Keep the stores and files here (default: temporary).")
    ] = None,
    out_file: Annotated[Path, typer.Option("--out", help="JSON results.")] = Path(
        "bench-store.json"
    ),
) -> None:
    """The owner's record store: PutRecords through the store and through gRPC with mTLS,
    `submit` of one file end to end, GetLogits of 1,024 cached ids, disk bytes per record;
    against the old one-file-per-record layout measured in the same run."""
    from jacfusion_fed.bench.store import StoreBenchConfig, print_results, run_store_bench

    try:
        store_sizes = tuple(int(s) for s in sizes.split(",") if s.strip())
    except ValueError as exc:
        raise CliError(f"--sizes must be comma-separated integers, got {sizes!r}") from exc
    if not store_sizes or min(store_sizes) < 1:
        raise CliError("--sizes needs at least one size >= 1")
    cfg = StoreBenchConfig(
        records=records,
        batch=batch,
        sizes=store_sizes,
        submit_records=submit_records,
        services=services,
    )
    results = run_store_bench(cfg, workdir=workdir, progress=lambda m: err().print(m))
    print_results(results, out())
    write_json(out_file, results)


def register(app: typer.Typer) -> None:
    from jacfusion_fed.cli import group

    group(app, "owner", "A modality owner: serve its head and logits.").command("migrate-store")(
        migrate_store
    )
    group(app, "bench", "Benchmarks.").command("store")(bench_store)
