"""``jacfusion-fed predict``: fused predictions for a batch of samples, as a table or JSON.

Start-up matters here (a requester may call it per patient): this module and what it imports
at start stay free of torch, Flower, numpy and the coordinator (``tests/test_cli_output.py``
checks). It pseudonymizes and calls through the requester's client,
:meth:`jacfusion_fed.requester.Requester.ask`, whose answers the one FusionService codec
(:mod:`jacfusion_fed.rpc.fusion_codec`) decodes into the one answer type,
:class:`jacfusion_fed.answer.FusedAnswer`. The requester, gRPC and the codec are imported by
the command itself, once its options are checked: this is the predict start-up edge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from jacfusion_fed.cli.errors import CliError
from jacfusion_fed.cli.options import (
    FUSION_METHODS,
    CoordinatorOpt,
    InsecureOpt,
    JsonOpt,
    TimeoutOpt,
    TlsOpt,
    check_choice,
    deprecated,
    parse_gamma,
)
from jacfusion_fed.cli.records import print_accuracy
from jacfusion_fed.cli.render import err, new_table, out, print_json
from jacfusion_fed.cli.transport import coordinator_targets, rpc_failure, security

if TYPE_CHECKING:
    from jacfusion_fed.answer import FusedAnswer

__all__ = ["predict", "register"]

_SHOWN_IDS = 10


def _gammas(items: list[str], deprecated_form: list[str]) -> tuple[float | None, dict[str, float]]:
    """``--gamma VALUE`` and ``--modality-gamma MODALITY=VALUE`` (``--gamma M=V``: old form)."""
    plain = [i for i in items if "=" not in i]
    old = [i for i in items if "=" in i]
    if len(plain) > 1:
        raise CliError(f"--gamma takes one value, got {', '.join(plain)}")
    per_modality: dict[str, float] = {}
    for item in deprecated("--gamma MODALITY=VALUE", "--modality-gamma", old, []) + deprecated_form:
        name, _, value = item.partition("=")
        if not name.strip():
            raise CliError(f"--modality-gamma must look like MODALITY=VALUE, got {item!r}")
        per_modality[name.strip()] = parse_gamma(value, option=f"--modality-gamma {name}")
    return (parse_gamma(plain[0]) if plain else None), per_modality


def _read_ids(ids: list[str] | None, ids_file: Path | None) -> list[str]:
    given = list(ids or [])
    if ids_file is not None:
        given += [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not given:
        raise CliError("no sample ids given (arguments or --ids-file)")
    return given


def _unknown_ids(exc: Any, local: dict[str, str], sent: list[str], keyed: bool) -> CliError:
    """``NOT_FOUND`` with the ids as the user typed them (never their HMAC) and what to do."""
    details = exc.details() or ""
    typed = [local.get(s, s) for s in sent if s in details]
    if not typed:  # not the coordinator's unknown-ids answer: say what it said
        return CliError(f"NOT_FOUND: {details}", exit_code=1)
    match = re.match(r"\s*(\d+) unknown", details)
    count = int(match.group(1)) if match else len(typed)
    shown = ", ".join(typed[:_SHOWN_IDS]) + (" ..." if len(typed) > _SHOWN_IDS else "")
    hint = "pass --skip-unknown to predict the others"
    if keyed:
        hint += ", or check that --pseudonym-key is the deployment's key"
    return CliError(f"NOT_FOUND: {count} unknown sample id(s): {shown}; {hint}", exit_code=1)


def predict(
    coordinator: CoordinatorOpt,
    ids: Annotated[
        list[str] | None, typer.Argument(help="Sample ids (local ids with --pseudonym-key).")
    ] = None,
    tls: TlsOpt = None,
    insecure: InsecureOpt = False,
    ids_file: Annotated[Path | None, typer.Option(help="File with one id per line.")] = None,
    pseudonym_key: Annotated[
        Path | None, typer.Option(help="Pseudonymize the given local ids with this key first.")
    ] = None,
    pseudonyms: Annotated[
        bool, typer.Option("--pseudonyms", help="The given ids already are pseudonyms.")
    ] = False,
    method: Annotated[
        str | None, typer.Option(help=f"Fusion method: {', '.join(FUSION_METHODS)}.")
    ] = None,
    gamma: Annotated[
        list[str] | None, typer.Option(help="Gamma in (0, 1] for every modality.")
    ] = None,
    modality_gamma: Annotated[
        list[str] | None, typer.Option(help="MODALITY=VALUE: gamma of one modality (repeat).")
    ] = None,
    default_gamma: Annotated[float | None, typer.Option(hidden=True)] = None,
    regularize: Annotated[
        list[str] | None, typer.Option(help="Modality to regularize (repeat).")
    ] = None,
    iterations: Annotated[int | None, typer.Option(help="Solver iterations.", min=1)] = None,
    center_logits: Annotated[
        bool | None,
        typer.Option(
            "--center-logits/--no-center-logits",
            help="Jacobian fusion: subtract each modality's mean logit first (offset-invariant; "
            "not the paper's method). Unset: the paper's method.",
        ),
    ] = None,
    modality: Annotated[
        list[str] | None,
        typer.Option(
            help="Use only these modalities (repeat). One alone is that modality's own "
            "prediction (its softmax: --method statistical) unless --method says otherwise."
        ),
    ] = None,
    require_all: Annotated[bool, typer.Option(help="Fail unless every owner answers.")] = False,
    skip_unknown: Annotated[
        bool, typer.Option(help="Predict the known ids, list the rest.")
    ] = False,
    owner_timeout: Annotated[float | None, typer.Option(help="Per-owner timeout (s).")] = None,
    stream: Annotated[bool, typer.Option(help="Use PredictStream (large batches).")] = False,
    chunk_size: Annotated[int, typer.Option(help="Ids per streamed response (0: default).")] = 0,
    timeout: TimeoutOpt = 30.0,
    as_json: JsonOpt = False,
    labels: Annotated[
        Path | None, typer.Option(help="Labels file (`deploy labels` or {id: label}): accuracy.")
    ] = None,
) -> None:
    """Fused predictions for a batch of samples, as a table or JSON."""
    given = _read_ids(ids, ids_file)
    if (pseudonym_key is None) == (not pseudonyms):
        raise CliError(
            "pass --pseudonym-key KEY to pseudonymize local patient ids before sending them, or "
            "--pseudonyms if the ids already are pseudonyms (raw patient ids are never sent)"
        )
    if method is not None:
        check_choice("--method", method, FUSION_METHODS)
    elif modality is not None and len(set(modality)) == 1:
        method = "statistical"  # one modality alone: its own softmax, no regularization
    items = list(gamma or [])
    if default_gamma is not None:
        items.append(str(deprecated("--default-gamma", "--gamma", default_gamma, 0.0)))
    common, per_modality = _gammas(items, list(modality_gamma or []))
    sec = security(tls, insecure)
    targets = coordinator_targets(coordinator)
    import grpc

    from jacfusion_fed.requester.requester import Requester
    from jacfusion_fed.rpc.channels import replica_target
    from jacfusion_fed.rpc.fusion_codec import PredictOptions

    try:
        replica_target(targets)
    except ValueError as exc:
        raise CliError(f"--coordinator: {exc}") from None
    opts = PredictOptions(
        method=method,
        default_gamma=common,
        gammas=per_modality,
        regularize=tuple(regularize or []),
        iterations=iterations,
        require_all=require_all,
        modalities=tuple(modality or []),
        owner_timeout_s=owner_timeout,
        skip_unknown_ids=skip_unknown,
        center_logits=center_logits,
    )
    keyed = pseudonym_key is not None
    with Requester(
        targets,
        tls=sec,
        pseudonym_key=pseudonym_key,
        ids_are_pseudonyms=not keyed,
        timeout=timeout,
    ) as client:
        sent = client.pseudonyms(given)  # once: the answer and an error both name them
        try:
            answer = client.ask(given, opts, stream=stream, chunk_size=chunk_size, pseudonyms=sent)
            info = client.model_info()
        except grpc.RpcError as exc:
            local = dict(zip(sent, given, strict=True)) if keyed else {}
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise _unknown_ids(exc, local, sent, keyed) from exc
            raise rpc_failure(exc, coordinator, sec) from exc
    names = list(info.class_names) or [str(k) for k in range(answer.num_classes)]
    if labels is not None:  # to stderr: --json output stays one JSON document
        local = dict(answer.local_ids)
        print_accuracy(answer.sample_ids, answer.predicted_labels, local, labels, err())
    if as_json:
        print_json(answer.to_json(names))
        return
    _print_tables(answer, names)


def _print_tables(answer: FusedAnswer, names: list[str]) -> None:
    console = out()
    local = answer.local_ids
    table = new_table(
        f"fused predictions ({answer.method})",
        ["local id" if local else "sample id", "label", "p(label)", "modalities used"],
        right=("p(label)",),
    )
    rows = answer.probability_rows()
    used = answer.modalities_used
    for i, sid in enumerate(answer.sample_ids):
        label = answer.predicted_labels[i]
        table.add_row(
            local.get(sid, sid),
            names[label] if label < len(names) else str(label),
            f"{rows[i][label]:.4f}",
            ", ".join(used[i]),
        )
    console.print(table)
    if answer.robust is not None:
        _print_robust(answer, names)
    mods = new_table(
        "modalities",
        ["modality", "owner", "model version", "samples", "gamma", "error"],
        right=("samples", "gamma"),
    )
    for c in answer.modalities:
        shown_gamma = f"{c.gamma:g}{' (reg.)' if c.regularized else ''}"
        mods.add_row(
            c.modality,
            c.owner,
            c.model_version,
            str(c.samples_used),
            shown_gamma if answer.method == "jacobian" else "",
            c.error or "; ".join(c.site_errors),
        )
    console.print(mods)
    if answer.unpredicted_sample_ids:
        console.print("not predicted: " + ", ".join(answer.unpredicted), highlight=False)


def _print_robust(answer: FusedAnswer, names: list[str]) -> None:
    """Robust fusion: per sample each used modality's reliability, the conformal prediction
    set and whether to abstain (not trust the label)."""
    assert answer.robust is not None
    local = answer.local_ids
    table = new_table(
        "robust fusion", ["local id" if local else "sample id", "reliability", "set", "abstain"]
    )
    for i, sid in enumerate(answer.sample_ids):
        rel = ", ".join(f"{m} {r:.3f}" for m, r in answer.reliability(i).items())
        members = [names[k] if k < len(names) else str(k) for k in answer.robust.prediction_sets[i]]
        table.add_row(
            local.get(sid, sid),
            rel,
            "{" + ", ".join(members) + "}",
            "yes" if answer.robust.abstain[i] else "no",
        )
    out().print(table)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
