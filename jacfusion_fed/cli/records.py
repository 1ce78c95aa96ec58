"""Bring your own model and live records: ``owner import-model``, ``owner rekey``, ``submit``,
``forget`` and ``rekey-map``.

``submit`` and ``forget`` pseudonymize the local ids with the deployment key before anything
is sent (through :class:`jacfusion_fed.requester.Requester`); raw ids never leave the requester.
A call that cannot get through names its likely cause like ``predict`` does (an owner of
another modality, nothing listening, another CA: :func:`jacfusion_fed.rpc.diagnose.likely_cause`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from jacfusion_fed.cli.audit import local_audit
from jacfusion_fed.cli.errors import EXIT_FAILED, CliError
from jacfusion_fed.cli.options import AuditLogOpt
from jacfusion_fed.cli.render import err, out

TlsOpt = Annotated[Path, typer.Option("--tls", help="Requester certificate directory.")]
KeyOpt = Annotated[Path, typer.Option(help="The deployment's HMAC pseudonym key.")]
AuditTlsOpt = Annotated[
    Path | None, typer.Option("--tls", help="The owner's certificate directory (signs the audit).")
]


def _owner_group(app: typer.Typer) -> typer.Typer:
    """The ``owner`` group (created by the serving commands' module, or here if absent)."""
    for info in app.registered_groups:
        if info.name == "owner" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="A modality owner: serve its head and logits.", no_args_is_help=True)
    app.add_typer(group, name="owner")
    return group


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _owner_failure(exc: Any, target: str, tls: Path, modality: str | None) -> CliError:
    """A failed call to an owner as one line; for ``UNAVAILABLE`` with the likely cause
    checked locally (the same diagnosis as ``predict``'s for the coordinator)."""
    from jacfusion_fed.rpc.diagnose import likely_cause

    code = exc.code().name
    if code == "UNAVAILABLE":
        cause = likely_cause(
            target, tls, expected_role="owner", modality=modality, own_role="requester"
        )
        if cause:
            return CliError(
                f"{code}: cannot call the owner at {target}: {cause}", exit_code=EXIT_FAILED
            )
    return CliError(f"{code}: {exc.details()}", exit_code=EXIT_FAILED)


# --- owner side -----------------------------------------------------------------------------


def import_model_cmd(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory.")],
    modality: Annotated[str, typer.Option(help="The modality this owner serves.")],
    model: Annotated[Path, typer.Option(help="TorchScript, .pt2 export, or safetensors file.")],
    head: Annotated[
        str | None, typer.Option(help="Name of the final nn.Linear (e.g. fc, classifier.2).")
    ] = None,
    factory: Annotated[
        str | None, typer.Option(help="package.module:function building the module (weights).")
    ] = None,
    class_counts: Annotated[
        Path | None, typer.Option(help="JSON list of the K training label counts.")
    ] = None,
    data: Annotated[
        str | None, typer.Option(help="Data source (class counts, input spec and probe).")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option(help="One record's shape, e.g. 1,8,8 (without --data).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Input dtype of a record.")] = "float32",
    value_range: Annotated[
        str | None, typer.Option(help="LOW,HIGH every input value must lie in.")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="Normalisation mean(s), per channel.")] = None,
    std: Annotated[str | None, typer.Option(help="Normalisation std(s), per channel.")] = None,
    audit_log: AuditLogOpt = None,
    tls: AuditTlsOpt = None,
) -> None:
    """Publish an externally trained model as the owner's new current version (no training).

    A ``.pt2`` export records its input shape (``--input-shape`` is then optional); a
    safetensors model's ``--factory`` must be importable here and wherever the owner serves.
    """
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.owner.importing import ModelImportError
    from jacfusion_fed.owner.input_spec import InputSpec
    from jacfusion_fed.owner.model_import import import_model, load_class_counts
    from jacfusion_fed.owner.startup import FACTORY_HINT

    if (class_counts is None) == (data is None):
        raise CliError("pass exactly one of --class-counts FILE.json or --data SOURCE")
    value_range_, mean_, std_ = (
        _floats(value_range, "--value-range"),
        _floats(mean, "--mean"),
        _floats(std, "--std"),
    )

    def spec_for(shape: tuple[int, ...]) -> Any:
        return InputSpec.create(list(shape), dtype, value_range_, mean_, std_)

    try:
        counts = None if class_counts is None else load_class_counts(class_counts)
        spec = None
        if input_shape is not None:
            try:
                shape = tuple(int(d) for d in input_shape.split(","))
            except ValueError:
                raise CliError(f"--input-shape must look like 1,8,8, got {input_shape!r}") from None
            spec = spec_for(shape)
        ws = OwnerWorkspace(workspace, modality, data, None)
        with local_audit(audit_log, tls, modality, "ImportModel") as record:
            report = import_model(
                ws,
                model,
                factory=factory,
                head=head,
                class_counts=counts,
                input_spec=spec,
                spec_from_shape=spec_for,
            )
            record({modality: report.version}, format=report.format)
    except ModelImportError as exc:
        hint = f"; {FACTORY_HINT}" if factory and "cannot be imported" in str(exc) else ""
        raise CliError(f"{exc}{hint}") from None
    console = out()
    console.print(
        f"imported {model.name} ({report.format}) as version {report.version} of {modality!r}: "
        f"head {report.head!r}, K={report.num_classes}, H={report.feature_dim}, input shape "
        f"{','.join(str(d) for d in report.input_spec.shape)}, probe max |logits - "
        f"head(features)| = {report.probe_max_error:.2e}",
        highlight=False,
    )
    if factory:
        err().print(
            f"note: owner serve imports {factory.partition(':')[0]!r} again when it loads this "
            f"version: {FACTORY_HINT}",
            highlight=False,
        )
    for split, acc in report.accuracy.items():
        console.print(f"  {split} accuracy on the owner's data: {acc:.1%}", highlight=False)


def rekey_cmd(
    workspace: Annotated[Path, typer.Option(help="The owner's workspace directory.")],
    modality: Annotated[str, typer.Option(help="The modality this owner serves.")],
    old_key: Annotated[Path, typer.Option(help="The key the workspace holds records of.")],
    new_key: Annotated[Path, typer.Option(help="The deployment's new pseudonym key.")],
    data: Annotated[str | None, typer.Option(help="The owner's data source, if any.")] = None,
    map_file: Annotated[
        Path | None,
        typer.Option("--map", help="JSON {old pseudonym: new pseudonym} from `rekey-map`."),
    ] = None,
    audit_log: AuditLogOpt = None,
    tls: AuditTlsOpt = None,
) -> None:
    """Rotate the pseudonym key of a stopped owner: re-key its live records (by the requester's
    map; unmapped records are erased), drop every logit cache, retire the old pseudonyms."""
    from jacfusion_fed.owner import OwnerWorkspace
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

    mapping = {} if map_file is None else _read_json(map_file, "--map")
    if not isinstance(mapping, dict):
        raise CliError(f"--map {map_file} must hold a JSON object {{old: new}}")
    ws = OwnerWorkspace(workspace, modality, data, Pseudonymizer.from_file(old_key))
    old_fingerprint = ws.key_fingerprint
    with local_audit(audit_log, tls, modality, "Rekey") as record:
        renamed, erased = ws.rekey(Pseudonymizer.from_file(new_key), mapping)
        record(old_key=old_fingerprint, new_key=ws.key_fingerprint, renamed=renamed, erased=erased)
    out().print(
        f"re-keyed {workspace}: {renamed} live record(s) renamed, {erased} erased (no mapping); "
        f"key fingerprint now {ws.key_fingerprint}; the old key's pseudonyms are refused",
        highlight=False,
    )


def _read_json(path: Path, option: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CliError(f"{option} {path}: not JSON ({exc})") from None


# --- requester side -------------------------------------------------------------------------


def _requester(owners: dict[str, str], tls: Path, key: Path) -> Any:
    from jacfusion_fed.requester import Requester

    return Requester(owners=owners, tls=tls, pseudonym_key=key)


def _modality_of(target: str, tls: Path) -> str:
    """The modality named by the owner certificate the server at ``target`` presents."""
    from jacfusion_fed.rpc.auth import fetch_server_principal
    from jacfusion_fed.rpc.tls import TlsFiles

    principal = fetch_server_principal(target, TlsFiles.from_dir(tls))
    if principal.role != "owner" or principal.modality is None:
        raise ValueError(f"{target} is {principal.describe()}, not a modality owner")
    return principal.modality


def submit(
    owner: Annotated[str, typer.Option(help="HOST:PORT of the owner.")],
    modality: Annotated[str, typer.Option(help="The owner's modality (checked on its cert).")],
    tls: TlsOpt,
    pseudonym_key: KeyOpt,
    inputs: Annotated[Path, typer.Option(help=".npz with `ids` (strings) and `x` (records).")],
    replace: Annotated[bool, typer.Option(help="Overwrite records stored differently.")] = False,
    batch: Annotated[int, typer.Option(help="Records per PutRecords call.", min=1)] = 1024,
) -> None:
    """Send new records to an owner (ids pseudonymized here first), any number of them: in
    batches, each stored whole or not at all; after a failure, rerun the same command."""
    import grpc
    import numpy as np

    try:
        with np.load(inputs, allow_pickle=False) as npz:
            ids = [str(i) for i in npz["ids"]]
            x = npz["x"]
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CliError(f"--inputs {inputs}: needs arrays `ids` (strings) and `x` ({exc})") from None
    try:
        with _requester({modality: owner}, tls, pseudonym_key) as req:
            result = req.submit(modality, ids, x, replace=replace, batch_size=batch)
    except grpc.RpcError as exc:
        raise _owner_failure(exc, owner, tls, modality) from None
    out().print(
        f"{modality}: {result.stored} new, {result.replaced} replaced, {result.unchanged} "
        f"unchanged in {result.batches} batch(es) (model version {result.model_version})",
        highlight=False,
    )


def forget(
    ids: Annotated[list[str], typer.Argument(help="Local patient ids to erase.")],
    owner: Annotated[
        list[str],
        typer.Option(
            help="HOST:PORT or MODALITY=HOST:PORT (repeat: every site that may hold the patients)."
        ),
    ],
    tls: TlsOpt,
    pseudonym_key: KeyOpt,
) -> None:
    """Erase patients' records (inputs and cached logits) at every owner named (all sites)."""
    import grpc

    sites: list[tuple[str, str]] = []
    for item in owner:
        name, sep, target = item.partition("=")
        if not sep:
            try:
                name, target = _modality_of(item, tls), item
            except OSError as exc:  # no TLS handshake: say why, as for a failed call
                from jacfusion_fed.rpc.diagnose import likely_cause

                cause = likely_cause(item, tls, expected_role="owner", own_role="requester")
                raise CliError(
                    f"cannot reach the owner at {item}: {cause or exc}", exit_code=EXIT_FAILED
                ) from None
        sites.append((name, target))
    console = out()
    for name, target in sites:  # one call per site: several sites may serve one modality
        try:
            with _requester({name: target}, tls, pseudonym_key) as req:
                result = req.forget(ids)
        except grpc.RpcError as exc:
            raise _owner_failure(exc, target, tls, name) from None
        gone, unknown = result.deleted[name], result.unknown[name]
        line = f"{name} ({target}): erased {len(gone)}"
        line += f"; not held: {', '.join(unknown)}" if unknown else ""
        console.print(line, highlight=False)


def rekey_map(
    old_key: Annotated[Path, typer.Option(help="The current pseudonym key.")],
    new_key: Annotated[Path, typer.Option(help="The new pseudonym key.")],
    ids_file: Annotated[Path, typer.Option(help="Local ids whose records to keep, one a line.")],
    out: Annotated[Path, typer.Option(help="JSON map to hand to `owner rekey --map`.")],
) -> None:
    """Requester side of a key rotation: old -> new pseudonyms of the patients to keep."""
    from jacfusion_fed.privacy.pseudonyms import Pseudonymizer

    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    old, new = Pseudonymizer.from_file(old_key), Pseudonymizer.from_file(new_key)
    mapping = dict(zip(old.many(ids), new.many(ids), strict=True))
    from jacfusion_fed.atomicio import atomic_write_bytes

    atomic_write_bytes(out, json.dumps(mapping, indent=1, sort_keys=True).encode())
    err().print(f"wrote {len(mapping)} pseudonym pair(s) to {out}", highlight=False)


def print_accuracy(
    sample_ids: list[str], predicted: Any, local: dict[str, str], labels: Path, out: Console
) -> float | None:
    """Print (and return) the accuracy of ``predicted`` against a labels file, keyed by local
    id or pseudonym (see :func:`jacfusion_fed.requester.load_labels`)."""
    from jacfusion_fed.requester import load_labels

    try:
        truth = load_labels(labels)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"--labels {labels}: {exc}") from None
    scored = []
    for sid, label in zip(sample_ids, [int(v) for v in predicted], strict=True):
        key = local.get(sid, sid)
        want = truth.get(key, truth.get(sid))
        if want is not None:
            scored.append(label == int(want))
    if not scored:
        out.print(f"accuracy: no predicted sample has a label in {labels}")
        return None
    accuracy = sum(scored) / len(scored)
    out.print(f"accuracy: {accuracy:.1%} ({sum(scored)} of {len(scored)} labelled samples)")
    return accuracy


def register(app: typer.Typer) -> None:
    group = _owner_group(app)
    group.command("import-model")(import_model_cmd)
    group.command("rekey")(rekey_cmd)
    app.command("submit")(submit)
    app.command("forget")(forget)
    app.command("rekey-map")(rekey_map)
