"""What a modality owner does for each message (Flower-example style ``task.py``).

Each handler takes the request content and the owner's `OwnerWorkspace`, calls the library,
and returns the reply records of :mod:`jacfusion_fed.federation.protocol`, or raises
`AppError`, which `respond` turns into a Flower error reply with a code and a clear reason.
Nothing here keeps state in memory: in deployment every message starts a fresh process, so
the workspace (records, content-hashed model store, logit cache) lives on node-local disk.

Node config of an owner (``flower-supernode --node-config`` or the simulation's node
configs): ``modality``, ``data`` (a data source string, see :mod:`jacfusion_fed.owner.source`),
``workdir`` (its workspace folder), ``key-file`` (the pseudonym key, 0600), and optionally
``owner`` (its name) and ``allow-full-head`` (share W and b on request; default false).
The run config (training method, epochs, learning rate, ...) is read as one typed, validated
:class:`~jacfusion_fed.federation.run_config.RunConfig` (`run_config`), whose defaults are
those of ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from jacfusion_fed.federation.calibration import CALIBRATION_RECORD, calibration_record
from jacfusion_fed.federation.protocol import (
    CLEAN,
    AppError,
    AppErrorCode,
    MalformedRequestError,
    arrays_record,
    info_record,
    model_spec_json,
    parse_head_request,
    parse_query_request,
    parse_train_request,
    pvalue_field,
    setting_field,
)
from jacfusion_fed.federation.run_config import RunConfig
from jacfusion_fed.models import model_spec
from jacfusion_fed.owner import Head, OwnerWorkspace, UnknownVersionError
from jacfusion_fed.owner.calibration import workspace_calibration
from jacfusion_fed.owner.perturbation import PerturbationSpec
from jacfusion_fed.privacy import Pseudonymizer

__all__ = [
    "describe",
    "head_reply",
    "query_logits",
    "respond",
    "run_config",
    "train",
    "workspace_from_context",
]

log = logging.getLogger(__name__)

Handler = Callable[[RecordDict, OwnerWorkspace, Context], RecordDict]


# ------------------------------------------------------------------------ node config
def _node_value(context: Context, key: str) -> str:
    value = context.node_config.get(key)
    if not isinstance(value, str) or not value:
        raise RuntimeError(
            f"node config lacks {key!r}: start the owner with --node-config "
            "\"modality='...' data='...' workdir='...' key-file='...'\""
        )
    return value


def workspace_from_context(context: Context) -> OwnerWorkspace:
    """The owner's workspace, from its node config (never from the run config)."""
    modality = _node_value(context, "modality")
    allow_full = context.node_config.get("allow-full-head", False)
    return OwnerWorkspace(
        Path(_node_value(context, "workdir")),
        modality,
        _node_value(context, "data"),
        Pseudonymizer.from_file(Path(_node_value(context, "key-file"))),
        allow_full_head=allow_full is True or str(allow_full).lower() == "true",
    )


def owner_name(context: Context) -> str:
    name = context.node_config.get("owner")
    if isinstance(name, str) and name:
        return name
    return f"{context.node_config.get('modality', 'owner')}-owner"


def run_config(context: Context) -> RunConfig:
    """The run config (defaults in :class:`RunConfig`; `RunConfigError` on a bad value)."""
    return RunConfig.from_mapping(context.run_config)


# ------------------------------------------------------------------------ handlers
def describe(_content: RecordDict, ws: OwnerWorkspace, context: Context) -> RecordDict:
    try:
        version = ws.current_version()
    except UnknownVersionError:
        version = ""
    spec = model_spec(ws.new_model())
    return RecordDict(
        {
            "info": info_record(
                ws.modality,
                owner_name(context),
                version,
                **{"num-classes": int(ws.num_classes), "model-spec": model_spec_json(spec)},
            )
        }
    )


def _head_records(
    ws: OwnerWorkspace, context: Context, head: Head, metrics: Mapping[str, Any]
) -> RecordDict:
    arrays: dict[str, np.ndarray] = {"class-counts": ws.class_counts().astype(np.int64)}
    if head.weight is not None and head.bias is not None:
        arrays |= {"weight": head.weight, "bias": head.bias}
    else:
        arrays["gram"] = head.gram
    records = RecordDict(
        {
            "head": arrays_record(arrays),
            "metrics": _metric_record(metrics),
            "info": info_record(ws.modality, owner_name(context), head.version),
        }
    )
    cal = workspace_calibration(ws, head.version)  # robust fusion (docs/calibration.md)
    if cal is not None:
        records[CALIBRATION_RECORD] = calibration_record(cal)
    return records


def _metric_record(metrics: Mapping[str, Any]) -> MetricRecord:
    out: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": int(metrics.get("num_examples", metrics.get("num-examples", 0)))
    }
    for src, dst in (
        ("train_loss", "train-loss"),
        ("train_accuracy", "train-accuracy"),
        ("seconds", "seconds"),
    ):
        value = metrics.get(src)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[dst] = float(value)
    return MetricRecord(out)


def _head(ws: OwnerWorkspace, version: str | None, kind: str) -> Head:
    try:
        return ws.head(version or None, kind)  # type: ignore[arg-type]
    except PermissionError as exc:
        raise AppError(AppErrorCode.NOT_PERMITTED, str(exc)) from None
    except UnknownVersionError as exc:
        raise _version_error(ws, version, exc) from None


def _version_error(ws: OwnerWorkspace, version: str | None, exc: Exception) -> AppError:
    try:
        current = ws.current_version()
    except UnknownVersionError:
        return AppError(AppErrorCode.NO_MODEL, f"owner of {ws.modality!r} has no trained model")
    return AppError(
        AppErrorCode.UNKNOWN_VERSION,
        f"model version {version!r} is not in the store of {ws.modality!r} "
        f"(stale or unknown; current version: {current})",
    )


def _train_params(cfg: RunConfig) -> dict[str, Any]:
    return {"method": cfg.training, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}


def _state_from(ws: OwnerWorkspace, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The global model's parameters, checked against this owner's own architecture."""
    expected = ws.new_model().state_dict()
    if set(arrays.keys()) != set(expected):
        raise MalformedRequestError("the global model's parameter names do not match")
    state = {}
    for name, ref in expected.items():
        value = torch.from_numpy(np.array(arrays[name].numpy()))
        if tuple(value.shape) != tuple(ref.shape):
            raise MalformedRequestError(f"global parameter {name!r} has the wrong shape")
        state[name] = value.to(ref.dtype)
    return state


def train(content: RecordDict, ws: OwnerWorkspace, context: Context) -> RecordDict:
    req = parse_train_request(content)
    cfg = run_config(context)
    params = _train_params(cfg)
    epochs = cfg.epochs
    if req.stage == "local":
        _, metrics = ws.train(params.pop("method"), epochs, publish=True, **params)
        return _head_records(ws, context, _head(ws, None, req.head_kind), metrics)
    assert req.global_arrays is not None or req.stage == "round"
    initial = _state_from(ws, req.global_arrays) if req.global_arrays is not None else None
    if req.stage == "round":
        rounds = cfg.fedavg_rounds
        local_epochs = cfg.local_epochs or max(1, round(epochs / rounds))
        params["seed"] = params["seed"] + 1000 * req.round
        model, metrics = ws.train(
            params.pop("method"), local_epochs, initial_state=initial, publish=False, **params
        )
        return RecordDict(
            {
                "model": ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()}),
                "metrics": _metric_record(metrics),
                "info": info_record(ws.modality, owner_name(context), ""),
            }
        )
    # publish: store the FedAvg model as this site's current version
    from jacfusion_fed.training import evaluate_accuracy

    model = ws.new_model()
    model.load_state_dict(initial)  # type: ignore[arg-type]
    train_split = ws.records["train"]
    accuracy = evaluate_accuracy(model, train_split.modalities[ws.modality], train_split.labels)
    metrics = {"num_examples": len(train_split), "train_accuracy": accuracy}
    version = ws.publish(model, {"fedavg": True, "rounds": req.round, **metrics})
    return _head_records(ws, context, _head(ws, version, req.head_kind), metrics)


def head_reply(content: RecordDict, ws: OwnerWorkspace, context: Context) -> RecordDict:
    req = parse_head_request(content)
    head = _head(ws, req.version or None, req.head_kind)
    _, _, metadata = ws.store.load(head.version)  # what was recorded at training time
    return _head_records(ws, context, head, dict(metadata))


def _generator(seed: int, spec: PerturbationSpec, modality: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{modality}|{spec.to_json()}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def query_logits(content: RecordDict, ws: OwnerWorkspace, context: Context) -> RecordDict:
    req = parse_query_request(content)
    specs: list[PerturbationSpec | None] = []
    for text in req.settings:
        if text == CLEAN:
            specs.append(None)
            continue
        try:
            specs.append(PerturbationSpec.parse(text))
        except ValueError as exc:
            raise MalformedRequestError(f"bad perturbation setting {text[:120]!r}: {exc}") from None
    version = req.version or None
    try:
        clean = ws.logits(req.sample_ids, version)
    except UnknownVersionError as exc:
        raise _version_error(ws, version, exc) from None
    if clean.unknown_ids and not req.allow_partial:
        sample = ", ".join(s[:12] + "..." for s in clean.unknown_ids[:3])
        raise AppError(
            AppErrorCode.UNKNOWN_IDS,
            f"owner of {ws.modality!r} holds no record for {len(clean.unknown_ids)} of "
            f"{len(req.sample_ids)} requested ids (e.g. {sample})",
        )
    n, k = len(req.sample_ids), ws.num_classes
    position = {sid: i for i, sid in enumerate(req.sample_ids)}
    rows = np.array([position[sid] for sid in clean.sample_ids], dtype=np.int64)
    known = np.zeros(n, dtype=bool)
    known[rows] = True
    arrays: dict[str, np.ndarray] = {"known": known}
    for i, spec in enumerate(specs):
        if spec is None:
            answer = clean
        else:
            try:
                answer = ws.perturbed_logits(
                    clean.sample_ids,
                    spec.build(),
                    clean.version,
                    generator=_generator(req.seed, spec, ws.modality),
                )
            except ValueError as exc:  # e.g. inputs outside [0, 1] for an attack
                raise AppError(
                    AppErrorCode.BAD_INPUT_RANGE,
                    f"owner of {ws.modality!r} cannot apply {spec.label}: {exc}",
                ) from None
        full = np.zeros((n, k), dtype=np.float64)
        full[rows] = answer.logits
        arrays[setting_field(i)] = full
        # the detector's p-value per row (issue 20): of the input the logits came from
        pvalues = (
            ws.detection_pvalues(clean.sample_ids, clean.version)
            if spec is None
            else answer.pvalues
        )
        if pvalues is not None:
            column = np.ones(n, dtype=np.float64)  # unknown rows: 1 (and ``known`` false)
            column[rows] = pvalues
            arrays[pvalue_field(i)] = column
    return RecordDict(
        {
            "logits": arrays_record(arrays),
            "info": info_record(ws.modality, owner_name(context), clean.version),
        }
    )


# ------------------------------------------------------------------------ reply wrapper
def respond(msg: Message, context: Context, handler: Handler) -> Message:
    """Run ``handler``; an `AppError` becomes a Flower error reply (code, reason), so a bad
    request never crashes the owner. Other exceptions are left to Flower, which reports them
    as ``CLIENT_APP_RAISED_EXCEPTION``."""
    try:
        ws = workspace_from_context(context)
        content = handler(msg.content, ws, context)
    except AppError as exc:
        log.warning("%s refused: %s", msg.metadata.message_type, exc)
        return Message(Error(code=exc.code, reason=str(exc)), reply_to=msg)
    return Message(content, reply_to=msg)
