"""``jacfusion-fed audit verify`` and ``audit show``: check a service's audit log, and list who
accessed one patient; :func:`open_audit_log`, how the serving commands open theirs.

The log itself is :mod:`jacfusion_fed.audit`; ``--audit-log`` / ``--audit-rotate`` are in the
option glossary (:mod:`jacfusion_fed.cli.options`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from jacfusion_fed.cli.errors import EXIT_FAILED, CliError
from jacfusion_fed.cli.options import JsonOpt
from jacfusion_fed.cli.render import err, new_table, out, print_json

__all__ = ["audit_show", "audit_verify", "local_audit", "open_audit_log", "register"]


def open_audit_log(
    path: Path | None,
    rotate: str,
    sec: Any,
    service: dict[str, str],
    *,
    start: bool = True,
    fsync: str = "entry",
) -> Any:
    """The service's :class:`~jacfusion_fed.audit.AuditLog` (``None`` without ``path``):
    checkpoints signed with its TLS key (unsigned on ``--insecure``), started (a ``start``
    entry and a checkpoint) unless ``start`` is false. Bad values are one-line CLI errors."""
    if path is None:
        return None
    from jacfusion_fed.audit import AuditLog, AuditUnavailable, Rotation, Signer
    from jacfusion_fed.rpc.tls import TlsFiles

    try:
        rotation = Rotation.parse(rotate)
    except ValueError as exc:
        raise CliError(f"--audit-rotate: {exc}") from None
    if fsync not in ("entry", "checkpoint"):
        raise CliError(f"--audit-fsync must be entry or checkpoint, got {fsync!r}")
    signer = Signer.from_files(sec.cert, sec.key) if isinstance(sec, TlsFiles) else None
    try:
        audit = AuditLog(
            path,
            service=service,
            signer=signer,
            rotation=rotation,
            fsync=fsync,  # type: ignore[arg-type]
        )
        return audit.start() if start else audit
    except (AuditUnavailable, OSError) as exc:
        raise CliError(f"--audit-log {path}: {exc}") from None


@contextlib.contextmanager
def local_audit(
    path: Path | None, tls: Path | None, modality: str, event: str
) -> Iterator[Callable[..., None]]:
    """For an owner's workspace command (``import-model``, ``rekey``): yields
    ``record(model_versions=..., **detail)``, which writes the ``event`` entry (peer: the
    operating-system user and host) and a checkpoint, signed with ``--tls``'s key if given.
    A command that fails is logged with status ``FAILED`` and the error's type."""
    if path is None:
        yield lambda *_, **__: None
        return
    from jacfusion_fed.audit import access_fields, local_peer, service_identity
    from jacfusion_fed.rpc.identity import principal_from_certificate
    from jacfusion_fed.rpc.tls import TlsFiles

    sec = TlsFiles.from_dir(tls) if tls is not None else None
    name = principal_from_certificate(sec.cert).name if sec is not None else f"{modality}-owner"
    audit = open_audit_log(
        path, "none", sec, service_identity("owner", name, modality), start=False
    )
    done: list[bool] = []

    def record(model_versions: dict[str, str] | None = None, **detail: Any) -> None:
        fields = access_fields(
            event, peer=local_peer(), model_versions=model_versions, detail=detail
        )
        audit.access(fields)
        done.append(True)

    try:
        yield record
    except BaseException as exc:
        if not done:
            audit.access(
                access_fields(
                    event, peer=local_peer(), status="FAILED", detail={"error": type(exc).__name__}
                )
            )
        raise
    finally:
        audit.checkpoint()
        audit.close(stop_event=False)


def _cert(path: Path | None) -> Any:
    if path is None:
        return None
    from jacfusion_fed.audit import load_cert

    try:
        return load_cert(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"--cert {path}: not a PEM certificate ({exc})") from None


def audit_verify(
    path: Annotated[Path, typer.Argument(help="The audit log (its rotated files are found).")],
    cert: Annotated[
        Path | None,
        typer.Option(help="The service's certificate (file or --tls directory): check signatures."),
    ] = None,
    expect_head: Annotated[
        str | None,
        typer.Option(help="A head hash recorded earlier: fail if the log no longer holds it."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the hash chain (and with --cert the signed checkpoints): exit 0 when intact, 1
    naming the first edited, deleted, inserted or reordered line; says what it cannot detect."""
    from jacfusion_fed.audit import verify

    report = verify(path, cert=_cert(cert), expect_head=expect_head)
    if as_json:
        print_json(report.to_json())
    else:
        console = out()
        if report.ok:
            signed = (
                f", {report.signatures_checked} signatures verified"
                if cert is not None
                else ", signatures not checked (no --cert)"
            )
            console.print(
                f"intact: {path} ({len(report.files)} file(s), {report.entries} entries, "
                f"{report.checkpoints} checkpoints{signed})",
                highlight=False,
            )
            console.print(f"head: seq {report.head_seq} hash {report.head_hash}", highlight=False)
        else:
            console.print(f"NOT INTACT: {report.problem}", highlight=False)
        console.print("cannot detect:", highlight=False)
        for line in report.limits:
            console.print(f"  - {line}", highlight=False)
    if not report.ok:
        raise CliError(f"audit log altered: {report.problem}", exit_code=EXIT_FAILED)


def audit_show(
    path: Annotated[Path, typer.Argument(help="The audit log (its rotated files are read too).")],
    pseudonym_key: Annotated[
        Path | None, typer.Option(help="The deployment's HMAC pseudonym key (with --id).")
    ] = None,
    patient_id: Annotated[
        str | None,
        typer.Option("--id", help='The patient\'s local id, e.g. "Jane Doe 1970-01-01".'),
    ] = None,
    pseudonym: Annotated[str | None, typer.Option(help="The patient's pseudonym.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Who accessed this patient: every logged call whose ids include the patient's pseudonym
    (computed here from --pseudonym-key and --id; the id is never written anywhere)."""
    from jacfusion_fed.audit import accesses, pseudonyms_of, verify
    from jacfusion_fed.privacy.pseudonyms import is_pseudonym

    if (pseudonym is None) == (patient_id is None):
        raise CliError("pass either --pseudonym-key K --id ID, or --pseudonym P")
    if patient_id is not None:
        if pseudonym_key is None:
            raise CliError("--id needs --pseudonym-key (the key the pseudonyms were made with)")
        wanted = pseudonyms_of(pseudonym_key, patient_id)
        label = "the patient"
    else:
        assert pseudonym is not None
        if not is_pseudonym(pseudonym):
            raise CliError("--pseudonym must be 64 hex digits or 52 base32 characters")
        wanted, label = {pseudonym}, f"pseudonym {pseudonym[:12]}..."
    if not Path(path).exists():
        raise CliError(f"no such audit log: {path}")
    rows = list(accesses(path, wanted))
    intact = verify(path)
    if as_json:
        print_json({"accesses": rows, "log_intact": intact.ok})
        return
    table = new_table(
        f"{len(rows)} logged access(es) to {label} in {path}",
        ["time (UTC)", "service", "call", "by", "status", "model versions", "ids", "trace"],
        right=("ids",),
    )
    for row in rows:
        peer = row.get("peer") or {}
        who = peer.get("cn") or peer.get("user") or "?"
        table.add_row(
            str(row["time"])[:23],
            str((row.get("service") or {}).get("name", "")),
            str(row.get("event", "")),
            f"{who} ({peer.get('role', '?')})",
            str(row.get("status", "")),
            " ".join(f"{m}={v}" for m, v in (row.get("model_versions") or {}).items()) or "-",
            str(row.get("n_ids", "")),
            str(row.get("trace_id") or "-"),
        )
    out().print(table)
    if not intact.ok:
        err().print(f"warning: the log is not intact ({intact.problem}); see `audit verify`")


def register(app: typer.Typer) -> None:
    from jacfusion_fed.cli import group

    audit = group(app, "audit", "Audit logs: verify their integrity, see who accessed a patient.")
    audit.command("verify")(audit_verify)
    audit.command("show")(audit_show)
